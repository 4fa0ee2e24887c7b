"""Evolutionary per-block sparsity search: budget, exactness, fitness, replay as a recipe."""

from __future__ import annotations

import json

import pytest
import torch

import sparsecraft
from conftest import build_model
from sparsecraft.cli import main
from sparsecraft.errors import ConfigError
from sparsecraft.recipe import Recipe
from sparsecraft.search import parse_budget, search_levels, searched_recipe


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("20m", 1200), ("1.5h", 5400), (30, 30)])
def test_parse_budget(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("bad", ["", "ten minutes", "0", "-5m", "5d"])
def test_parse_budget_rejects(bad):
    with pytest.raises(ConfigError):
        parse_budget(bad)


def test_search_within_budget_exact_and_no_worse(tiny_llama, calib_ids):
    recipe = Recipe(method="sparsegpt", sparsity=0.6)
    fitness_windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(9))
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    result = search_levels(tiny_llama, calib_ids, fitness_windows, recipe, budget_s=30, progress=False)
    assert result.seconds <= 30
    assert result.generations >= 1 and result.evaluations >= result.generations
    assert result.fitness <= result.uniform_fitness
    assert set(result.levels) == {0, 1}
    assert sum(result.levels.values()) / 2 == pytest.approx(0.6, abs=1e-9)  # equal-size blocks: exact mean
    assert all(0.45 - 1e-9 <= v <= 0.75 + 1e-9 for v in result.levels.values())
    for key, value in tiny_llama.state_dict().items():  # the search leaves the model dense
        assert torch.equal(value, before[key]), key
    replay = searched_recipe(recipe, result, "model.layers")
    _, report = sparsecraft.prune(tiny_llama, calib_ids, replay, progress=False)
    for r in report.layers:
        assert r.target_sparsity == result.levels[int(r.name.split(".")[2])]


def test_search_rejects_nm_and_tight_budget(tiny_llama, calib_ids):
    windows = calib_ids[:2]
    with pytest.raises(ConfigError, match="unstructured"):
        search_levels(tiny_llama, calib_ids, windows, Recipe(method="wanda", pattern="2:4"), budget_s=5,
                      progress=False)
    with pytest.raises(ConfigError, match="larger --budget"):
        search_levels(tiny_llama, calib_ids, windows, Recipe(method="wanda", sparsity=0.5), budget_s=1e-3,
                      progress=False)


def test_cli_search_then_replay_recipe(capsys, llama_dir, text_file, tmp_path):
    out = tmp_path / "searched"
    common = ["--model", str(llama_dir), "--data", str(text_file), "--nsamples", "4", "--seqlen", "32",
              "--method", "wanda", "--max-eval-windows", "2", "--quiet"]
    rc = main(["search", *common, "--sparsity", "0.6", "--budget", "15s", "--fitness-samples", "2",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((out / "sparsecraft.json").read_text())
    assert meta["search"]["seconds"] <= 15 and meta["search"]["generations"] >= 1
    recipe = Recipe.from_yaml(out / "recipe.yaml")
    assert len(recipe.overrides) == 2 and recipe.allocation == "uniform"
    replay = tmp_path / "replay"
    rc = main(["prune", "--model", str(llama_dir), "--recipe", str(out / "recipe.yaml"), "--out", str(replay),
               "--max-eval-windows", "2", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    a = build_model("llama").from_pretrained(out).state_dict()
    b = build_model("llama").from_pretrained(replay).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = json.loads((replay / "sparsecraft.json").read_text())
    assert again["evaluation"]["perplexity"] == meta["evaluation"]["perplexity"]


def test_allocation_search_in_recipe(tiny_llama, calib_ids):
    """allocation=search is an allocation like owl: sparsecraft.prune searches, prunes, and reports the recipe
    that replays the result (uniform + per-block overrides), which prunes to the same weights."""
    from conftest import build_model

    _, report = sparsecraft.prune(tiny_llama, calib_ids, method="sparsegpt", sparsity=0.6, allocation="search",
                                  search_budget="20s", search_fitness_samples=2, progress=False)
    assert report.search["seconds"] <= 20 and report.search["generations"] >= 1
    replay = Recipe.from_dict(report.recipe)
    assert replay.allocation == "uniform" and len(replay.overrides) == 2
    assert report.sparsity == pytest.approx(0.6, abs=0.01)
    again = build_model("llama")
    sparsecraft.prune(again, calib_ids, replay, progress=False)
    for key, value in tiny_llama.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_cli_prune_allocation_search(capsys, llama_dir, text_file, tmp_path):
    out = tmp_path / "p"
    rc = main(["prune", "--model", str(llama_dir), "--data", str(text_file), "--nsamples", "4", "--seqlen", "32",
               "--method", "wanda", "--sparsity", "0.5", "--allocation", "search", "--search-budget", "10s",
               "--max-eval-windows", "2", "--quiet", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((out / "sparsecraft.json").read_text())
    assert meta["search"]["budget_s"] == 10 and meta["recipe"]["allocation"] == "uniform"
    rc = main(["prune", "--model", str(llama_dir), "--allocation", "search", "--search-budget", "soon",
               "--out", str(tmp_path / "q")])
    assert rc == 2 and "soon" in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_prune_model_refuses_unresolved_search(tiny_llama, calib_ids):
    from sparsecraft.pruning import prune_model

    with pytest.raises(ConfigError, match="sparsecraft.prune"):
        prune_model(tiny_llama, calib_ids, Recipe(method="wanda", allocation="search"), progress=False)


def test_fitness_windows_come_from_the_fitness_source_minus_calibration_text(byte_tokenizer, tmp_path):
    """search_fitness_data (issue 14, part 5): the candidates are scored on the named source's calibration part,
    with every paragraph the calibration text also has removed, drawn with seed + 1."""
    from conftest import make_text
    from sparsecraft.data import calibration_batch, load_text, tokenize
    from sparsecraft.search import fitness_windows

    shared = make_text(10, 300, seed=1).split("\n\n")
    calib, other = tmp_path / "calib.txt", tmp_path / "other.txt"
    calib.write_text("\n\n".join(shared[:5]) + "\n\n" + make_text(10, 300, seed=2))
    other.write_text("\n\n".join(shared[:5]) + "\n\n" + make_text(10, 300, seed=3).upper())
    recipe = Recipe(method="sparsegpt", sparsity=0.6, seqlen=32, search_fitness_samples=3, seed=4,
                    search_fitness_data=str(other))
    calibration_text = load_text(calib).calibration
    windows = fitness_windows(byte_tokenizer, recipe, calibration_text)
    kept = [p for p in load_text(other).calibration.split("\n\n")
            if " ".join(p.split()) not in {" ".join(q.split()) for q in calibration_text.split("\n\n")}]
    assert 0 < len(kept) < len(load_text(other).calibration.split("\n\n"))  # some shared paragraphs were dropped
    expected = calibration_batch(tokenize(byte_tokenizer, "\n\n".join(kept)), 3, 32, 5)
    assert torch.equal(windows, expected)
    assert not torch.equal(windows, calibration_batch(tokenize(byte_tokenizer, calibration_text), 3, 32, 5))


def test_cli_search_scores_on_the_fitness_data(capsys, llama_dir, text_file, tmp_path):
    from conftest import make_text

    other = tmp_path / "other.txt"
    other.write_text(make_text(20, 300, seed=5).upper())
    common = ["--model", str(llama_dir), "--data", str(text_file), "--nsamples", "4", "--seqlen", "32",
              "--method", "wanda", "--sparsity", "0.6", "--budget", "10s", "--fitness-samples", "2",
              "--max-eval-windows", "2", "--quiet"]
    assert main(["search", *common, "--fitness-data", str(other), "--out", str(tmp_path / "a")]) == 0
    assert main(["search", *common, "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / n / "sparsecraft.json").read_text()) for n in "ab")
    assert a["recipe"]["search_fitness_data"] == str(other) and b["recipe"]["search_fitness_data"] is None
    assert a["search"]["uniform_kl"] != b["search"]["uniform_kl"]  # the same uniform model, scored on other text
    capsys.readouterr()
    rc = main(["search", *common, "--fitness-data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()
