"""Bad and hostile input on every command (issue 19): each is exit code 2, exactly one line on stderr, no
traceback, and nothing written where the command would write. Plus: unforeseen errors are one line (--debug shows
the traceback), SIGTERM during a save and SIGKILL-then-rerun leave nothing behind, --force keeps the old output
until the new one is complete. Tiny random models; the CLI runs in-process except where a signal needs a child."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_text
from sparsecraft.cli import main

ERROR_PREFIX = "sparsecraft: error:"
COMMON = ["--nsamples", "4", "--seqlen", "32", "--max-eval-windows", "2", "--quiet"]


def _tree(root: Path) -> set[str]:
    """Every path under `root` (hidden ones included), with sizes and modification times: a change shows."""
    out = set()
    for p in root.rglob("*"):
        st = p.lstat()
        out.add(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory, llama_dir, text_file):
    """Inputs shared by the cases: a pruned directory, a bidirectional encoder, damaged copies of the model."""
    from transformers import BertConfig, BertForMaskedLM

    from conftest import make_byte_tokenizer

    root = tmp_path_factory.mktemp("bad-input")
    pruned = root / "pruned"
    assert main(["prune", "--model", str(llama_dir), "--method", "magnitude", "--data", str(text_file), "--no-eval",
                 "--quiet", "--out", str(pruned)]) == 0
    encoder = root / "encoder"
    BertForMaskedLM(BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, max_position_embeddings=128)).save_pretrained(encoder)
    make_byte_tokenizer().save_pretrained(encoder)

    def copy_of(src: Path, name: str) -> Path:
        import shutil

        dst = root / name
        shutil.copytree(src, dst)
        return dst

    truncated = copy_of(llama_dir, "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    garbage = copy_of(llama_dir, "garbage-header")
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    config_list = copy_of(llama_dir, "config-list")
    (config_list / "config.json").write_text("[1, 2, 3]\n")
    bad_field = copy_of(llama_dir, "config-field")
    config = json.loads((bad_field / "config.json").read_text())
    (bad_field / "config.json").write_text(json.dumps({**config, "hidden_size": "abc"}))
    gguf = root / "broken.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 4)
    meta_list = copy_of(pruned, "meta-list")
    (meta_list / "sparsecraft.json").write_text('["not", "metadata"]\n')
    meta_layers = copy_of(pruned, "meta-layers")
    meta = json.loads((meta_layers / "sparsecraft.json").read_text())
    meta["layers"] = {"model.layers.0.mlp.up_proj": 0.5}
    (meta_layers / "sparsecraft.json").write_text(json.dumps(meta))
    return {"root": root, "model": llama_dir, "pruned": pruned, "encoder": encoder, "truncated": truncated,
            "garbage": garbage, "config_list": config_list, "config_field": bad_field, "gguf": gguf,
            "meta_list": meta_list, "meta_layers": meta_layers,
            "text": text_file}


class Case:
    """A bad command line: `build(w, d)` (w: the shared inputs, d: a fresh directory) returns argv; `out` names,
    relative to d, where the command would have written."""

    def __init__(self, name: str, fragment: str, build, out: str | None = "out"):
        self.name, self.fragment, self.build, self.out = name, fragment, build, out


def _file(d: Path, name: str, data: bytes | str) -> str:
    path = d / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def prune(w, d, *extra, model=None, data=None):
    return ["prune", "--model", str(model or w["model"]), "--data", str(data or w["text"]), *COMMON,
            "--out", str(d / "out"), *extra]


def recipe(w, d, text: str | bytes):
    return prune(w, d, "--recipe", _file(d, "recipe.yaml", text))


def finetune(w, d, *extra):
    return ["finetune", str(w["pruned"]), "--data", str(w["text"]), "--seqlen", "16", "--steps", "2",
            "--distill", "none", "--quiet", "--out", str(d / "out"), *extra]


def ft_config(w, d, text: str | bytes):
    return finetune(w, d, "--config", _file(d, "ft.yaml", text))


def sweep(w, d, *extra):
    return ["sweep", "--model", str(w["model"]), "--data", str(w["text"]), "--methods", "magnitude", *COMMON,
            "--json", str(d / "out"), *extra]


def table(d, data) -> str:
    return _file(d, "sweep.json", data if isinstance(data, str | bytes) else json.dumps(data))


GOOD_ROW = {"key": "magnitude@0.5", "method": "magnitude", "pattern": "unstructured", "sparsity": 0.5,
            "reached": 0.5, "perplexity": 300.0, "ratio": 1.2, "seconds": 0.1, "layers": {}}
GOOD_DENSE = {"perplexity": 250.0, "sparsity": 0.0, "windows": 2, "tokens": 64}


def _sweep_table(**changes) -> dict:
    return {"format": 1, "rows": [GOOD_ROW], "dense": GOOD_DENSE, **changes}


def _symlink(d: Path) -> Path:
    link = d / "out"
    link.symlink_to(d / "nowhere")
    return link


def _parent_is_file(d: Path) -> str:
    (d / "file").write_text("a regular file")
    return str(d / "file" / "out")


CASES = [
    # ---- prune: the model
    Case("config-not-object", "not an object", lambda w, d: prune(w, d, model=w["config_list"])),
    Case("truncated-safetensors", "truncated", lambda w, d: prune(w, d, model=w["truncated"])),
    Case("garbage-safetensors", "not a safetensors file", lambda w, d: prune(w, d, model=w["garbage"])),
    Case("encoder-model", "attends to later tokens", lambda w, d: prune(w, d, model=w["encoder"])),
    Case("config-field-wrong-type", "could not load model", lambda w, d: prune(w, d, model=w["config_field"])),
    Case("gguf-corrupt", "incomplete or corrupt", lambda w, d: prune(w, d, model=w["gguf"])),
    # ---- prune: recipes
    Case("recipe-malformed-yaml", "not valid YAML at line", lambda w, d: recipe(w, d, "method: [wanda\n")),
    Case("recipe-not-mapping", "mapping of keys to values", lambda w, d: recipe(w, d, "- wanda\n- 0.5\n")),
    Case("recipe-scalar", "mapping of keys to values", lambda w, d: recipe(w, d, "just some words\n")),
    Case("recipe-not-utf8", "not UTF-8", lambda w, d: recipe(w, d, b"method: \xff\xfewanda\n")),
    Case("recipe-damp-lots", "key 'damp' must be a number", lambda w, d: recipe(w, d, "damp: lots\n")),
    Case("recipe-refine-int", "key 'refine'", lambda w, d: recipe(w, d, "refine: 5\n")),
    Case("recipe-method-list", "key 'method' must be a string", lambda w, d: recipe(w, d, "method: [wanda]\n")),
    Case("recipe-seed-abc", "key 'seed' must be an integer", lambda w, d: recipe(w, d, "seed: abc\n")),
    Case("recipe-nan", "not finite", lambda w, d: recipe(w, d, "dsnot_threshold: .nan\n")),
    Case("recipe-overrides-list", "key 'overrides'", lambda w, d: recipe(w, d, "overrides: [mlp]\n")),
    Case("recipe-bool-as-int", "key 'nsamples' must be an integer", lambda w, d: recipe(w, d, "nsamples: true\n")),
    Case("recipe-is-directory", "does not exist (it is a directory)",
         lambda w, d: prune(w, d, "--recipe", str(d))),
    # ---- prune: numbers
    Case("eval-batch-size-0", "--eval-batch-size must be >= 1", lambda w, d: prune(w, d, "--eval-batch-size", "0")),
    Case("max-eval-windows-0", "--max-eval-windows", lambda w, d: prune(w, d, "--max-eval-windows", "0")),
    Case("seqlen-beyond-context", "longer than the model's context",
         lambda w, d: prune(w, d, "--seqlen", "4096", "--no-eval")),
    Case("seed-too-large", "seed", lambda w, d: prune(w, d, "--seed", str(2**70))),
    Case("dsnot-threshold-nan", "not a finite number",
         lambda w, d: prune(w, d, "--refine", "dsnot", "--dsnot-threshold", "nan")),
    Case("refit-shrink-above-1", "refit_shrink must be in [0, 1]",
         lambda w, d: prune(w, d, "--refine", "refit", "--refit-shrink", "1.5")),
    Case("refit-ridge-negative", "refit_ridge must be >= 0",
         lambda w, d: prune(w, d, "--refine", "refit", "--refit-ridge", "-1")),
    Case("refit-iters-0", "refit_iters must be a positive integer",
         lambda w, d: prune(w, d, "--refine", "refit", "--refit-iters", "0")),
    Case("sparsity-inf", "not a finite number", lambda w, d: prune(w, d, "--sparsity", "inf")),
    Case("damp-not-a-number", "is not a number", lambda w, d: prune(w, d, "--damp", "abc")),
    Case("nsamples-float", "invalid int value", lambda w, d: prune(w, d, "--nsamples", "2.5")),
    Case("unknown-flag", "unrecognized arguments", lambda w, d: prune(w, d, "--sparsityy", "0.5")),
    # ---- prune: data
    Case("nul-bytes-calibration", "control characters",
         lambda w, d: prune(w, d, data=_file(d, "nul.txt", b"\x00" * 20000))),
    Case("non-utf8-calibration", "not UTF-8", lambda w, d: prune(w, d, data=_file(d, "bin.txt", bytes(range(256))))),
    # ---- prune: the output
    Case("out-parent-is-file", "is not a directory", lambda w, d: prune(w, d)[:-1] + [_parent_is_file(d)],
         out="file/out"),
    Case("out-parent-missing", "does not exist", lambda w, d: prune(w, d)[:-1] + [str(d / "no" / "dir" / "out")],
         out="no"),
    Case("out-dangling-symlink", "symlink", lambda w, d: (_symlink(d), prune(w, d))[1], out="nowhere"),
    Case("out-name-too-long", "too long", lambda w, d: prune(w, d)[:-1] + [str(d / ("x" * 250))], out=None),
    Case("out-empty", "is empty", lambda w, d: prune(w, d)[:-1] + [""], out=None),
    Case("out-exists", "already exists", lambda w, d: ((d / "out").mkdir(), prune(w, d))[1], out=None),
    # ---- search
    Case("search-max-steps-huge", "sane bound",
         lambda w, d: ["search", "--model", str(w["model"]), "--data", str(w["text"]), *COMMON, "--max-steps",
                       "1000", "--out", str(d / "out")]),
    Case("search-budget-huge", "sane bound",
         lambda w, d: ["search", "--model", str(w["model"]), "--data", str(w["text"]), *COMMON, "--budget",
                       "1000h", "--out", str(d / "out")]),
    # ---- eval
    Case("eval-batch-0", "--eval-batch-size", lambda w, d: ["eval", str(w["model"]), "--eval-batch-size", "0"]),
    Case("eval-seqlen-beyond-context", "longer than the model's context",
         lambda w, d: ["eval", str(w["model"]), "--data", str(w["text"]), "--seqlen", "1000", "--quiet"]),
    Case("eval-json-missing-dir", "does not exist",
         lambda w, d: ["eval", str(w["model"]), "--quiet", "--json", str(d / "missing" / "r.json")], out="missing"),
    Case("eval-json-is-dir", "is a directory", lambda w, d: ["eval", str(w["model"]), "--quiet", "--json", str(d)],
         out=None),
    Case("eval-encoder", "attends to later tokens",
         lambda w, d: ["eval", str(w["encoder"]), "--data", str(w["text"]), "--seqlen", "32", "--quiet"]),
    Case("eval-encoder-no-quiet", "attends to later tokens",  # found after the model loaded: no loading bar
         lambda w, d: ["eval", str(w["encoder"]), "--data", str(w["text"]), "--seqlen", "32"]),
    Case("eval-metadata-list", "not an object",
         lambda w, d: ["eval", str(w["meta_list"]), "--seqlen", "32", "--quiet"]),
    Case("eval-truncated", "truncated", lambda w, d: ["eval", str(w["truncated"]), "--quiet"]),
    Case("eval-nul-data", "control characters",
         lambda w, d: ["eval", str(w["model"]), "--data", _file(d, "nul.txt", b"\x00\x01" * 9000), "--seqlen", "32",
                       "--quiet"]),
    # ---- export
    Case("export-truncated", "truncated", lambda w, d: ["export", str(w["truncated"]), "--out", str(d / "out")]),
    Case("export-config-list", "not an object",
         lambda w, d: ["export", str(w["config_list"]), "--out", str(d / "out")]),
    Case("export-out-parent-file", "is not a directory",
         lambda w, d: ["export", str(w["pruned"]), "--out", _parent_is_file(d)], out="file/out"),
    Case("export-out-symlink", "symlink",
         lambda w, d: (_symlink(d), ["export", str(w["pruned"]), "--out", str(d / "out")])[1], out="nowhere"),
    # ---- report
    Case("report-sweep-row-types", "rows[0].key must be a string",
         lambda w, d: ["report", table(d, _sweep_table(rows=[{**GOOD_ROW, "key": 1}]))], out=None),
    Case("report-sweep-dense-string", "dense.perplexity must be a number",
         lambda w, d: ["report", table(d, _sweep_table(dense={**GOOD_DENSE, "perplexity": "low"}))], out=None),
    Case("report-sweep-rows-not-list", "rows must be a list",
         lambda w, d: ["report", table(d, _sweep_table(rows={"a": 1}))], out=None),
    Case("report-sweep-layers", "layers must be an object",
         lambda w, d: ["report", table(d, _sweep_table(rows=[{**GOOD_ROW, "layers": [1, 2]}]))], out=None),
    Case("report-sweep-not-utf8", "not valid JSON", lambda w, d: ["report", table(d, b"\xff\xfe{}")], out=None),
    Case("report-sweep-array", "not a sparsecraft sweep table", lambda w, d: ["report", table(d, "[1]")], out=None),
    Case("report-metadata-list", "not an object", lambda w, d: ["report", str(w["meta_list"])], out=None),
    Case("report-metadata-layers", "every entry of 'layers'", lambda w, d: ["report", str(w["meta_layers"])],
         out=None),
    Case("report-html-is-dir", "is a directory", lambda w, d: ["report", str(w["pruned"]), "--html", str(d)],
         out=None),
    Case("report-json-missing-dir", "does not exist",
         lambda w, d: ["report", str(w["pruned"]), "--json", str(d / "missing" / "r.json")], out="missing"),
    Case("report-truncated", "truncated", lambda w, d: ["report", str(w["truncated"])], out=None),
    # ---- sweep
    Case("sweep-millions-of-rows", "sane bound", lambda w, d: sweep(w, d, "--sparsities", "0.1:0.9:0.0000001")),
    Case("sweep-too-many-rows", "sane bound",
         lambda w, d: sweep(w, d, "--sparsities", ",".join(f"{i / 1000:g}" for i in range(1, 200)))),
    Case("sweep-json-missing-dir", "does not exist",
         lambda w, d: sweep(w, d, "--sparsities", "0.5", "--json", str(d / "missing" / "s.json")), out="missing"),
    Case("sweep-report-is-dir", "is a directory", lambda w, d: sweep(w, d, "--sparsities", "0.5", "--report", str(d))),
    Case("sweep-sparsity-nan", "sparsit", lambda w, d: sweep(w, d, "--sparsities", "nan,0.5")),
    Case("sweep-knee-nan", "not a finite number", lambda w, d: sweep(w, d, "--sparsities", "0.5",
                                                                      "--knee-tolerance", "nan")),
    Case("sweep-encoder", "attends to later tokens",
         lambda w, d: ["sweep", "--model", str(w["encoder"]), "--data", str(w["text"]), "--methods", "magnitude",
                       "--sparsities", "0.5", *COMMON, "--json", str(d / "out")]),
    # ---- finetune
    Case("ft-config-malformed", "not valid YAML", lambda w, d: ft_config(w, d, "lr: [1\n")),
    Case("ft-config-not-mapping", "mapping of keys to values", lambda w, d: ft_config(w, d, "[1, 2]\n")),
    Case("ft-config-seed-abc", "key 'seed' must be an integer", lambda w, d: ft_config(w, d, "seed: abc\n")),
    Case("ft-config-lr-string", "key 'lr' must be a number", lambda w, d: ft_config(w, d, "lr: fast\n")),
    Case("ft-config-not-utf8", "not UTF-8", lambda w, d: ft_config(w, d, b"steps: \xff\n")),
    Case("ft-lr-nan", "not a finite number", lambda w, d: finetune(w, d, "--lr", "nan")),
    Case("ft-seed-negative", "seed -1 is out of range", lambda w, d: finetune(w, d, "--seed", "-1")),
    Case("ft-seqlen-beyond-context", "longer than the model's context",
         lambda w, d: finetune(w, d, "--seqlen", "1000")),
    Case("ft-eval-batch-0", "eval_batch_size", lambda w, d: finetune(w, d, "--eval-batch-size", "0")),
    Case("ft-encoder-student", "attends to later tokens",
         lambda w, d: ["finetune", str(w["encoder"]), "--data", str(w["text"]), "--seqlen", "16", "--steps", "2",
                       "--schedule", "dense", "--distill", "none", "--quiet", "--out", str(d / "out")]),
    Case("ft-checkpoint-dir-is-file", "--checkpoint-dir",
         lambda w, d: finetune(w, d, "--checkpoint-dir", _file(d, "ckpt", "a file"))),
    Case("ft-out-parent-file", "is not a directory", lambda w, d: finetune(w, d)[:-1] + [_parent_is_file(d)],
         out="file/out"),
    Case("ft-diverges", "fine-tuning diverged",
         lambda w, d: finetune(w, d, "--lr", "1e9", "--schedule", "dense", "--no-eval", "--max-grad-norm", "0",
                               "--warmup-steps", "0", "--checkpoint-every", "1")),
    # ---- generate and bench
    Case("generate-seed-huge", "seed", lambda w, d: ["generate", str(w["model"]), "--prompt", "hi", "--seed",
                                                     str(2**70)], out=None),
    Case("generate-temperature-nan", "not a finite number",
         lambda w, d: ["generate", str(w["model"]), "--prompt", "hi", "--temperature", "nan"], out=None),
    Case("generate-empty-prompt", "--prompt is empty", lambda w, d: ["generate", str(w["model"]), "--prompt", ""],
         out=None),
    Case("generate-truncated", "truncated", lambda w, d: ["generate", str(w["truncated"]), "--prompt", "hi"],
         out=None),
    Case("generate-max-new-tokens-negative", "--max-new-tokens",
         lambda w, d: ["generate", str(w["model"]), "--prompt", "hi", "--max-new-tokens", "-5"], out=None),
    Case("bench-json-missing-dir", "does not exist",
         lambda w, d: ["bench", str(w["model"]), "--json", str(d / "missing" / "b.json")], out="missing"),
    Case("bench-min-sparsity", "--min-sparsity", lambda w, d: ["bench", str(w["model"]), "--min-sparsity", "2"],
         out=None),
    Case("bench-tokens-beyond-context", "exceed the model's context",
         lambda w, d: ["bench", str(w["model"]), "--tokens", "1000", "--quiet"], out=None),
]


def test_enough_kinds(work, tmp_path):
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
    commands = set()
    for i, case in enumerate(CASES):
        d = tmp_path / str(i)
        d.mkdir()
        commands.add(case.build(work, d)[0])
    assert commands == {"prune", "search", "eval", "export", "report", "sweep", "finetune", "generate", "bench"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, work, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = case.build(work, tmp_path)
    before = _tree(tmp_path)
    shared = _tree(work["root"])
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert len(lines) == 1, f"expected one line on stderr, got: {captured.err!r}"
    assert lines[0].startswith(ERROR_PREFIX), lines[0]
    assert case.fragment in lines[0], lines[0]
    if case.out is not None:
        assert not (tmp_path / case.out).exists()
    assert _tree(tmp_path) == before, "something was written"
    assert _tree(work["root"]) == shared, "an input was changed"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_out_parent_read_only(work, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc = main(prune(work, ro))
        err = capsys.readouterr().err
        assert rc == 2 and "not writable" in err and len(err.strip().splitlines()) == 1
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# ----------------------------------------------------------------------------------------- unforeseen errors


def test_unforeseen_error_is_one_line_and_debug_shows_the_traceback(work, capsys, monkeypatch):
    import sparsecraft.cli as cli

    def boom(args):
        raise RuntimeError("something nobody foresaw\nsecond line")

    monkeypatch.setattr(cli, "cmd_eval", boom)
    rc = main(["eval", str(work["model"])])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "unexpected RuntimeError: something nobody foresaw" in err and "run with --debug" in err
    rc = main(["eval", str(work["model"]), "--debug"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" in err and "boom" in err


def test_disk_errors_are_one_line(work, tmp_path, capsys, monkeypatch):
    """An OSError at write time (disk full, ...) is one line naming the file, exit 2, and no temporary is left."""
    import sparsecraft.checkpoint as checkpoint

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "model.safetensors"))

    monkeypatch.setattr(checkpoint, "write_json_atomic", full)
    rc = main(prune(work, tmp_path, "--method", "magnitude", "--no-eval"))
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "No space left on device" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------- outputs and kills


def test_force_keeps_the_old_output_until_the_new_one_is_complete(work, tmp_path, capsys, monkeypatch):
    import sparsecraft.checkpoint as checkpoint

    out = tmp_path / "out"
    assert main(prune(work, tmp_path, "--method", "magnitude", "--no-eval")) == 0
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    real = checkpoint.write_json_atomic

    def fail_midway(path, data):
        real(path, data)
        raise KeyboardInterrupt  # Ctrl-C after the weights are written, before the directory is complete

    monkeypatch.setattr(checkpoint, "write_json_atomic", fail_midway)
    assert main(prune(work, tmp_path, "--method", "magnitude", "--no-eval", "--sparsity", "0.7", "--force")) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_temporaries_are_removed_and_a_lost_original_restored(work, tmp_path, capsys):
    from sparsecraft.checkpoint import clean_stale

    dead = _dead_pid()
    out = tmp_path / "out"
    (tmp_path / f".out.tmp-{dead}-abc").mkdir()
    (tmp_path / f".out.tmp-{dead}-abc" / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".out.tmp-{os.getpid()}-mine").mkdir()  # a live run's own: kept
    (tmp_path / f".other.tmp-{dead}-x").mkdir()  # another output's: not ours to touch
    with pytest.warns(UserWarning, match="removed 1 temporary output"):
        clean_stale(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".out.tmp-{os.getpid()}-mine",
                                                                  f".other.tmp-{dead}-x"])
    # killed between the two renames of a --force replacement: the original is only in .out.old-PID-*/replaced
    kept = tmp_path / f".out.old-{dead}-xyz" / "replaced"
    kept.mkdir(parents=True)
    (kept / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match="restored"), pytest.warns(UserWarning, match="removed 1"):
        clean_stale(out)
    assert (out / "config.json").read_text() == "{}" and not kept.parent.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


SLOW_SAVE = """
import sys, time
from pathlib import Path
import transformers
real = transformers.PreTrainedModel.save_pretrained
def slow(self, path, *args, **kwargs):
    real(self, path, *args, **kwargs)
    Path(sys.argv[1]).write_text(str(path))  # the weights are in the temporary directory: now kill me
    time.sleep(60)
transformers.PreTrainedModel.save_pretrained = slow
from sparsecraft.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _run_until_saving(marker: Path, argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(marker), *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "timed out"
    return proc


@pytest.mark.parametrize("signum, command", [(signal.SIGTERM, "prune"), (signal.SIGHUP, "export")],
                         ids=["SIGTERM-prune", "SIGHUP-export"])
def test_sigterm_during_save_leaves_nothing(work, tmp_path, signum, command):
    out = tmp_path / "models" / "out"
    out.parent.mkdir()
    argv = (prune(work, out.parent, "--method", "magnitude", "--no-eval") if command == "prune"
            else ["export", str(work["pruned"]), "--out", str(out), "--quiet"])
    proc = _run_until_saving(tmp_path / "saving", argv)
    assert any(p.name.startswith(".out.tmp-") for p in out.parent.iterdir())  # mid-save
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    lines = err.strip().splitlines()
    assert lines == [f"sparsecraft: terminated ({signal.Signals(signum).name}); nothing was written"], err
    assert list(out.parent.iterdir()) == []


def test_sigkill_then_rerun_cleans_up(work, tmp_path, capsys):
    out = tmp_path / "out"
    argv = prune(work, tmp_path, "--method", "magnitude", "--no-eval")
    proc = _run_until_saving(tmp_path.parent / f"{tmp_path.name}-saving", argv)
    proc.kill()
    proc.communicate(timeout=60)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(stale) == 1 and not out.exists()  # SIGKILL cannot be cleaned up after ...
    capsys.readouterr()
    assert main(argv) == 0  # ... but the next run on the same output does
    err = capsys.readouterr().err
    assert "removed 1 temporary output(s) left beside" in err and stale[0].name in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "model.safetensors").is_file()


def test_text_mostly_control_characters_warns_below_the_error_bound(tmp_path):
    from sparsecraft.data import load_text

    text = make_text(10, 400)
    noisy = "".join(c + ("\x07" if i % 20 == 0 else "") for i, c in enumerate(text))
    path = tmp_path / "noisy.txt"
    path.write_text(noisy)
    with pytest.warns(UserWarning, match="control characters"):
        load_text(str(path))


def _sigterm_after_first_checkpoint(half_write: bool):
    """(class, name, replacement) for monkeypatch.setattr: Accelerator.save_state writes the first checkpoint, then
    raises SIGTERM's exception (where the handler would raise it) on the second, after writing a stub file into it
    when `half_write`."""
    import accelerate

    from sparsecraft.cli import Terminated

    real = accelerate.Accelerator.save_state
    calls = []

    def save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 1:
            return real(self, output_dir, **kwargs)
        if half_write:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"half")
        raise Terminated(signal.SIGTERM)

    return accelerate.Accelerator, "save_state", save_state


def test_sigterm_while_checkpointing_keeps_the_finished_checkpoints_only(work, tmp_path, capsys, monkeypatch):
    """SIGTERM (here raised where the handler would raise it) in the middle of writing a fine-tuning checkpoint: the
    half-written one is removed, the finished ones stay for --resume, and the message says so."""
    from sparsecraft.recovery.trainer import checkpoints

    monkeypatch.setattr(*_sigterm_after_first_checkpoint(half_write=True))
    out = tmp_path / "out"
    rc = main(finetune(work, tmp_path, "--steps", "4", "--checkpoint-every", "1", "--no-eval"))
    err = capsys.readouterr().err
    ckpt = tmp_path / "out.checkpoints"
    assert rc == 143 and len(err.strip().splitlines()) == 1, err
    assert "terminated (SIGTERM)" in err and "checkpoints are kept in" in err and "--resume" in err
    assert [p.name for p in checkpoints(ckpt)] == ["checkpoint-000001"]
    assert not list(ckpt.glob(".checkpoint-*")) and not out.exists()


def test_resume_from_a_corrupt_checkpoint_is_a_one_line_error(work, tmp_path, capsys, monkeypatch):
    """A run stopped (SIGTERM) after its first checkpoint, whose files are then truncated: --resume says which
    checkpoint and what to do, exit 2, and leaves the checkpoints as they were (and writes no output)."""
    from sparsecraft.recovery.trainer import checkpoints

    argv = finetune(work, tmp_path, "--steps", "4", "--checkpoint-every", "1", "--no-eval")
    with monkeypatch.context() as m:
        m.setattr(*_sigterm_after_first_checkpoint(half_write=False))
        assert main(argv) == 143
    capsys.readouterr()
    saved = checkpoints(tmp_path / "out.checkpoints")
    assert [p.name for p in saved] == ["checkpoint-000001"]
    victims = sorted(p for p in saved[0].rglob("*") if p.is_file() and p.stat().st_size > 64)
    assert victims
    for p in victims:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    before = {p: p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()}
    rc = main([*argv, "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"checkpoint {saved[0]} cannot be read" in err and "delete it" in err
    assert {p: p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "out").exists()
