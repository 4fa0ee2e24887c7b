"""The `sparsecraft` command line, run in-process: one-line errors with exit code 2, and an end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from sparsecraft.checkpoint import read_metadata
from sparsecraft.cli import main

ERROR_PREFIX = "sparsecraft: error:"


def assert_one_line_error(capsys, rc: int, *fragments: str) -> str:
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {captured.err!r}"
    assert lines[0].startswith(ERROR_PREFIX)
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.fixture
def prune_args(llama_dir, text_file, tmp_path):
    out = tmp_path / "out"

    def make(*extra: str, model: str | Path = llama_dir) -> list[str]:
        return ["prune", "--model", str(model), "--data", str(text_file), "--nsamples", "4", "--seqlen", "32",
                "--max-eval-windows", "2", "--quiet", "--out", str(out), *extra]

    make.out = out
    return make


@pytest.mark.parametrize("extra, fragment", [
    (["--method", "prune-everything"], "unknown method 'prune-everything'"),
    (["--pattern", "diagonal"], "unknown pattern 'diagonal'"),
    (["--pattern", "4:2"], "impossible pattern '4:2'"),
    (["--pattern", "2:2"], "impossible pattern"),
    (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
    (["--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
    (["--pattern", "2:4", "--sparsity", "0.7"], "pattern 2:4 always gives sparsity 0.5"),
    (["--nsamples", "0"], "nsamples must be a positive integer"),
    (["--seqlen", "0"], "seqlen must be a positive integer"),
    (["--blocksize", "0"], "blocksize"),
    (["--targets", "("], "invalid regex"),
    (["--device", "cuda:7"] if not __import__("torch").cuda.is_available() else ["--device", "nonsense"], "device"),
])
def test_config_errors(capsys, prune_args, extra, fragment):
    rc = main(prune_args(*extra))
    assert_one_line_error(capsys, rc, fragment)
    assert not prune_args.out.exists()


def test_model_path_missing(capsys, prune_args, tmp_path):
    rc = main(prune_args(model=tmp_path / "no-such-model"))
    assert_one_line_error(capsys, rc, "does not exist")
    assert not prune_args.out.exists()


def test_model_dir_without_config(capsys, prune_args, tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "README.md").write_text("hello")
    rc = main(prune_args(model=empty))
    assert_one_line_error(capsys, rc, "no config.json")
    assert not prune_args.out.exists()


def test_model_dir_with_broken_weights(capsys, prune_args, tmp_path, llama_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((llama_dir / "config.json").read_text())
    rc = main(prune_args(model=broken))
    assert_one_line_error(capsys, rc, "could not load model")
    assert not prune_args.out.exists()


def test_calibration_text_too_short(capsys, prune_args, tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("only a few words here\n")
    args = prune_args("--seqlen", "100")
    args[args.index("--data") + 1] = str(tiny)
    rc = main(args)
    captured = capsys.readouterr()
    warning, error = captured.err.strip().splitlines()  # the text is too small to hold any out, then too short
    assert rc == 2 and warning.startswith("sparsecraft: warning: ") and "too small to hold text out" in warning
    assert error.startswith(ERROR_PREFIX) and "shorter than one window of 100" in error
    assert not prune_args.out.exists()


def test_missing_data_file(capsys, prune_args, tmp_path):
    args = prune_args()
    args[args.index("--data") + 1] = str(tmp_path / "nothing.txt")
    rc = main(args)
    assert_one_line_error(capsys, rc, "does not exist")
    assert not prune_args.out.exists()


def test_existing_out_without_force(capsys, prune_args):
    prune_args.out.mkdir()
    (prune_args.out / "keep.txt").write_text("precious")
    rc = main(prune_args())
    assert_one_line_error(capsys, rc, "already exists", "--force")
    assert [p.name for p in prune_args.out.iterdir()] == ["keep.txt"]
    assert (prune_args.out / "keep.txt").read_text() == "precious"


def test_everything_ignored(capsys, prune_args):
    rc = main(prune_args("--ignore", ".", "--no-eval"))
    assert_one_line_error(capsys, rc, "no prunable layers")
    assert not prune_args.out.exists()
    assert not list(prune_args.out.parent.glob(".out*"))


def test_tied_lm_head_target(capsys, prune_args, tmp_path, byte_tokenizer):
    from conftest import build_model

    gpt2 = tmp_path / "gpt2"
    build_model("gpt2").save_pretrained(gpt2)
    byte_tokenizer.save_pretrained(gpt2)
    capsys.readouterr()  # drop save_pretrained's own progress output
    rc = main(prune_args("--targets", "lm_head", "--no-eval", model=gpt2))
    assert_one_line_error(capsys, rc, "tied")
    assert not prune_args.out.exists()


def test_eval_errors(capsys, tmp_path, llama_dir, text_file):
    rc = main(["eval", str(tmp_path / "missing"), "--quiet"])
    assert_one_line_error(capsys, rc, "does not exist")
    rc = main(["eval", str(llama_dir), "--data", str(text_file), "--seqlen", "32", "--max-eval-windows", "0",
               "--quiet"])
    assert_one_line_error(capsys, rc, "--max-eval-windows")
    rc = main(["eval", str(llama_dir), "--data", str(text_file), "--seqlen", "100000", "--quiet"])
    assert_one_line_error(capsys, rc, "longer than the model's context")


def test_warnings_are_one_line(capsys, tmp_path, llama_dir):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("the model weights are pruned with calibration data " * 20, encoding="utf-8")
    rc = main(["eval", str(llama_dir), "--data", str(tiny), "--seqlen", "16", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err.startswith("sparsecraft: warning: ") and "too small to hold text out" in captured.err
    assert captured.err.count("\n") == 1  # no file:line, no source line


def test_prune_and_eval_end_to_end(capsys, prune_args, text_file, tmp_path):
    out = prune_args.out
    rc = main(prune_args("--method", "wanda", "--sparsity", "0.5"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.err == ""  # --quiet: no progress bars, no warnings
    assert "wanda" in captured.out and "dense" in captured.out and str(out) in captured.out
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not list(out.parent.glob(".out*"))

    meta = read_metadata(out)
    assert meta["recipe"]["method"] == "wanda" and meta["recipe"]["sparsity"] == 0.5
    assert meta["recipe"]["nsamples"] == 4 and meta["recipe"]["seqlen"] == 32
    assert meta["recipe"]["data"] == str(text_file)
    assert len(meta["layers"]) == 14
    assert meta["sparsity"] == pytest.approx(0.5)
    evaluation = meta["evaluation"]
    assert evaluation["windows"] == 2 and evaluation["seqlen"] == 32
    for key in ("perplexity", "dense_perplexity"):
        assert math.isfinite(evaluation[key]) and evaluation[key] > 1

    report = tmp_path / "eval.json"
    rc = main(["eval", str(out), "--data", str(text_file), "--seqlen", "32", "--json", str(report),
               "--max-eval-windows", "2", "--layers", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "model.layers.0.mlp.down_proj" in captured.out  # --layers table
    result = json.loads(report.read_text())
    assert result["model"] == str(out)
    assert result["recipe"]["method"] == "wanda"
    assert result["windows"] == 2 and result["tokens"] == 64 and result["seqlen"] == 32
    assert result["sparsity"] == pytest.approx(0.5)
    assert len(result["layers"]) == 14
    assert all(v["sparsity"] == pytest.approx(0.5) for v in result["layers"].values())
    # the saved model reproduces the perplexity measured right after pruning
    assert result["perplexity"] == pytest.approx(evaluation["perplexity"], rel=1e-5)
    assert not list(tmp_path.glob(".eval.json*"))


def test_eval_dense_model_has_no_recipe(capsys, llama_dir, text_file, tmp_path):
    report = tmp_path / "dense.json"
    rc = main(["eval", str(llama_dir), "--data", str(text_file), "--seqlen", "32", "--max-eval-windows", "3",
               "--json", str(report), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(report.read_text())
    assert result["recipe"] == {} and result["sparsity"] == 0.0 and result["windows"] == 3
    assert 1 < result["perplexity"] < 10 * 256  # random tiny model: near-uniform over 256 tokens


def test_nm_pattern_alone_implies_sparsity(capsys, prune_args):
    rc = main(prune_args("--method", "magnitude", "--pattern", "1:4", "--no-eval"))
    assert rc == 0, capsys.readouterr().err
    meta = read_metadata(prune_args.out)
    assert meta["recipe"]["pattern"] == "1:4"
    assert meta["recipe"]["sparsity"] == pytest.approx(0.75)
    assert meta["sparsity"] == pytest.approx(0.75)
    assert "evaluation" not in meta


def test_recipe_file_and_flag_overrides(capsys, prune_args, tmp_path, text_file):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "sparsegpt", "sparsity": 0.6, "data": str(text_file),
                                      "nsamples": 2, "seqlen": 16, "blocksize": 32}))
    args = prune_args("--recipe", str(recipe), "--sparsity", "0.7", "--no-eval")
    i = args.index("--data")
    del args[i : i + 2]  # the recipe's data must be used when --data is not given
    for flag in ("--nsamples", "--seqlen"):
        i = args.index(flag)
        del args[i : i + 2]
    rc = main(args)
    assert rc == 0, capsys.readouterr().err
    meta = read_metadata(prune_args.out)["recipe"]
    assert meta["method"] == "sparsegpt"
    assert meta["sparsity"] == 0.7  # flag beats recipe
    assert meta["data"] == str(text_file)
    assert (meta["nsamples"], meta["seqlen"], meta["blocksize"]) == (2, 16, 32)


def test_recipe_file_errors(capsys, prune_args, tmp_path):
    rc = main(prune_args("--recipe", str(tmp_path / "missing.yaml")))
    assert_one_line_error(capsys, rc, "does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("methd: wanda\n")
    rc = main(prune_args("--recipe", str(bad)))
    assert_one_line_error(capsys, rc, "unknown recipe keys ['methd']")
    assert not prune_args.out.exists()
