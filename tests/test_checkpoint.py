"""Saving and loading pruned models: bit-identical round trips, metadata, atomic and safe writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sparsecraft
from conftest import build_model
from sparsecraft.checkpoint import METADATA_FILE, read_metadata
from sparsecraft.errors import ModelError, OutputError


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` (relative name -> content)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture
def pruned(calib_ids):
    model = build_model("llama")
    _, report = sparsecraft.prune(model, calib_ids, method="wanda", sparsity=0.5, progress=False)
    return model, report


def test_round_trip_bit_identical(tmp_path, pruned, byte_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model, report = pruned
    out = tmp_path / "out"
    assert sparsecraft.save(model, out, report=report, tokenizer=byte_tokenizer, source="tiny") == out
    assert (out / "config.json").is_file()
    assert list(out.glob("*.safetensors"))
    assert not list(out.glob("*.bin"))

    loaded = sparsecraft.load(out)
    assert isinstance(loaded, LlamaForCausalLM)
    assert_same_state(model, loaded)
    assert loaded.sparsecraft == read_metadata(out)
    assert loaded.tokenizer is not None
    assert loaded.tokenizer("abc", add_special_tokens=False).input_ids == \
        byte_tokenizer("abc", add_special_tokens=False).input_ids

    plain = AutoModelForCausalLM.from_pretrained(out)  # a plain transformers checkpoint, no sparsecraft needed
    assert_same_state(model, plain)
    # the zeros survived
    w = plain.model.layers[1].mlp.down_proj.weight
    assert ((w == 0).sum(1) == w.shape[1] // 2).all()
    # and the loaded model computes the same thing
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain.eval()(ids).logits)


def test_metadata(tmp_path, pruned):
    model, report = pruned
    out = tmp_path / "out"
    evaluation = {"perplexity": 123.0, "dense_perplexity": 100.0}
    sparsecraft.save(model, out, report=report, evaluation=evaluation, source="somewhere")
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["sparsecraft_version"] == sparsecraft.__version__
    assert meta["source_model"] == "somewhere"
    assert meta["recipe"]["method"] == "wanda"
    assert meta["recipe"]["sparsity"] == 0.5
    assert meta["recipe"]["pattern"] == "unstructured"
    assert meta["evaluation"] == evaluation
    assert set(meta["layers"]) == {r.name for r in report.layers}
    assert len(meta["layers"]) == 14
    for r in report.layers:
        entry = meta["layers"][r.name]
        assert entry["shape"] == list(r.shape)
        assert entry["pruned"] == r.pruned == r.shape[0] * (r.shape[1] // 2)
        assert entry["zeros"] == r.zeros
        assert entry["sparsity"] == pytest.approx(0.5)
    assert meta["sparsity"] == pytest.approx(0.5)


def test_save_without_report(tmp_path):
    model = build_model("gpt2")  # tied embeddings round-trip too
    out = tmp_path / "dense"
    sparsecraft.save(model, out)
    meta = read_metadata(out)
    assert meta["sparsecraft_version"] == sparsecraft.__version__
    assert "layers" not in meta and "recipe" not in meta
    loaded = sparsecraft.load(out)
    assert_same_state(model, loaded)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_existing_output_refused_and_untouched(tmp_path, pruned):
    model, report = pruned
    parent = tmp_path / "parent"
    out = parent / "out"
    sparsecraft.save(model, out, report=report)
    before = tree(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    other = build_model("llama", seed=1)
    with pytest.raises(OutputError, match="already exists"):
        sparsecraft.save(other, out)
    assert tree(out) == before
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    assert sorted(p.name for p in parent.iterdir()) == ["out"]


def test_force_replaces(tmp_path, pruned):
    model, report = pruned
    parent = tmp_path / "parent"
    out = parent / "out"
    sparsecraft.save(model, out, report=report)
    (out / "stale.txt").write_text("left from an older run")
    other = build_model("llama", seed=1)
    sparsecraft.save(other, out, force=True)
    assert not (out / "stale.txt").exists()
    assert_same_state(other, sparsecraft.load(out))
    assert "recipe" not in read_metadata(out)
    assert sorted(p.name for p in parent.iterdir()) == ["out"]  # no hidden temp/old directories left


def test_output_is_a_file(tmp_path, pruned):
    model, _ = pruned
    target = tmp_path / "file"
    target.write_text("not a directory")
    with pytest.raises(OutputError, match="not a directory"):
        sparsecraft.save(model, target, force=True)
    assert target.read_text() == "not a directory"


def test_output_permissions_are_normal(tmp_path, pruned):
    model, _ = pruned
    out = tmp_path / "out"
    sparsecraft.save(model, out)
    ref = tmp_path / "ref"
    ref.mkdir()
    assert out.stat().st_mode & 0o777 == ref.stat().st_mode & 0o777


def test_failed_save_leaves_nothing(tmp_path, pruned, monkeypatch):
    model, report = pruned
    parent = tmp_path / "parent"
    parent.mkdir()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        sparsecraft.save(model, parent / "out", report=report)
    assert list(parent.iterdir()) == []


def test_failed_forced_save_keeps_existing(tmp_path, pruned, monkeypatch):
    model, report = pruned
    parent = tmp_path / "parent"
    out = parent / "out"
    sparsecraft.save(model, out, report=report)
    before = tree(out)
    other = build_model("llama", seed=1)

    def half_written(path, *args, **kwargs):
        (Path(path) / "partial.safetensors").write_bytes(b"\0" * 10)
        raise KeyboardInterrupt

    monkeypatch.setattr(other, "save_pretrained", half_written)
    with pytest.raises(KeyboardInterrupt):
        sparsecraft.save(other, out, force=True)
    assert tree(out) == before
    assert sorted(p.name for p in parent.iterdir()) == ["out"]


def test_load_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        sparsecraft.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        sparsecraft.load(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelError, match="neither a model directory nor a .gguf"):
        sparsecraft.load(tmp_path / "file.txt")
    with pytest.raises(ModelError, match="does not exist"):
        sparsecraft.load(tmp_path / "missing.gguf")


def test_corrupt_metadata(tmp_path):
    (tmp_path / METADATA_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        read_metadata(tmp_path)
    assert read_metadata(tmp_path / "nothing-here") == {}
