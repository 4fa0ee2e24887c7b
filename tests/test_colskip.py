"""The column-skipping GEMV of activation sparsity (kernels/colskip.py, _colskip.h): equal to the masked dense
reference on every ISA path the CPU has, odd sizes, all-zero and no-zero activations, batches; the fused threshold
is exactly the activation hooks' comparison; a model's hooked input sites swapped for ColumnSkipLinear give the
hooked model's outputs and greedy tokens; torch.compile sees one custom op."""

from __future__ import annotations

import pytest
import torch

import sparsecraft.kernels as sk
from conftest import build_model
from sparsecraft.activation import activate, installed, installed_sites
from sparsecraft.activation.hooks import ThresholdMask
from sparsecraft.errors import KernelError
from sparsecraft.kernels.colskip import ColumnSkipLinear, apply_column_skip, effective_threshold

pytestmark = pytest.mark.skipif(not sk.available(), reason="sparsecraft's C kernels are not built here")

_FACTS = sk.info() if sk.available() else {}
PATHS = ["scalar"] + [p for p in ("avx2", "avx512") if _FACTS.get(p)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SHAPES = [(1, 1), (7, 5), (17, 33), (64, 128), (19, 300), (130, 70)]  # (out, in): odd, < and > one vector


def _reference_check(y, xm, w, b):
    """|y - ref| <= output rounding + float32 accumulation error, ref in float64 from the same rounded inputs."""
    xd, wd = xm.double(), w.double()
    ref, bound = xd @ wd.t(), xd.abs() @ wd.abs().t()
    if b is not None:
        ref, bound = ref + b.double(), bound + b.double().abs()
    tol = UNIT_ROUNDOFF[y.dtype] * ref.abs() + 4 * (w.shape[1] + 2) * 2.0**-24 * bound + 1e-30
    err = (y.double() - ref).abs()
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g}"


def _thresholds(x: torch.Tensor, k: int, g: torch.Generator):
    per = x.float().abs().reshape(-1, k)[0] * torch.rand(k, generator=g) * 2  # about half of each row dropped
    return {"none": torch.tensor(0.0), "scalar": x.float().abs().median(), "per-feature": per,
            "all dropped": torch.tensor(float("inf")), "tie": x.float().abs().reshape(-1)[0].clone()}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_matches_masked_reference(path, dtype):
    g = torch.Generator().manual_seed(4)
    with sk.use_path(path):
        for out_f, in_f in SHAPES:
            w = torch.randn(out_f, in_f, generator=g).to(dtype)
            for bias in (None, torch.randn(out_f, generator=g).to(dtype)):
                for rows in (1, 2, 5):
                    x = torch.randn(rows, in_f, generator=g).to(dtype)
                    for name, t in _thresholds(x, in_f, g).items():
                        layer = ColumnSkipLinear(w, bias, t)
                        xm = ThresholdMask(t, "input").mask(x)  # the hooks' own masking
                        y = layer(x)
                        assert y.dtype == dtype and y.shape == (rows, out_f)
                        _reference_check(y, xm, w, bias)
                        if rows == 1:
                            assert layer.kept[-1] == int((xm != 0).sum()), name
            x0 = torch.zeros(1, in_f, dtype=dtype)  # all-zero activations: y = b exactly
            b = torch.randn(out_f, generator=g).to(dtype)
            assert torch.equal(ColumnSkipLinear(w, b, torch.tensor(0.0))(x0), b.reshape(1, -1))


@pytest.mark.parametrize("path", PATHS)
def test_float32_activations_over_bf16_weights(path):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(33, 70, generator=g).bfloat16()
    x = torch.randn(1, 70, generator=g)
    t = torch.rand(70, generator=g)
    with sk.use_path(path):
        y = ColumnSkipLinear(w, None, t)(x)
    _reference_check(y, x.masked_fill(x.abs() < t, 0), w.float(), None)


def test_threshold_comparison_is_the_hooks():
    """A 0-d float32 threshold meets bf16 x in bf16 (torch's type promotion), a per-feature one in float32; ties
    |x| == t are kept, NaN is kept (as the hooks keep it)."""
    t = torch.tensor(0.30078125 + 2**-12)  # between two bf16 values: rounds down to 0.30078125 in bf16
    assert effective_threshold(t, torch.bfloat16).item() == t.bfloat16().float().item() == 0.30078125
    x = torch.tensor([[0.30078125, -0.30078125, 0.302734375, 0.2998046875, 0.0]]).bfloat16()
    w = torch.eye(5).bfloat16()
    for thr in (t, torch.full((5,), 0.30078125 + 2**-12)):  # scalar: ties kept; per feature: float32, dropped
        layer = ColumnSkipLinear(w, None, thr)
        ref = ThresholdMask(thr, "input").mask(x)
        assert torch.equal(layer(x), ref)
        assert layer.kept[-1] == int((ref != 0).sum())
    assert torch.equal(ColumnSkipLinear(w, None, t)(x)[0, :3], x[0, :3])  # the tie and the larger ones kept
    nan = torch.tensor([[0.1, float("nan"), 0.5, 0.0, 0.0]]).bfloat16()
    layer = ColumnSkipLinear(w, None, t)
    layer(nan)
    assert layer.kept[-1] == 2 == int(ThresholdMask(t, "input").mask(nan).isnan().sum() + 1)


def test_bad_threshold_shape():
    with pytest.raises(KernelError, match="one value per input feature"):
        ColumnSkipLinear(torch.randn(4, 6), None, torch.rand(5))


def test_model_swap_matches_hooks():
    """Input sites replaced by ColumnSkipLinear: the same logits (prefill: masked matmul; decode: the kernel) and
    the same greedy tokens as the hooked model."""
    torch.manual_seed(0)
    model = build_model("llama")
    ids = torch.randint(3, 200, (4, 32), generator=torch.Generator().manual_seed(2))
    activate(model, ids, method="teal", sparsity=0.5, progress=False)
    sites = installed_sites(model)
    inputs = [n for n, s in sites.items() if s == "input"]
    assert inputs, sites
    prompt = ids[:1, :8]
    with torch.no_grad():
        hooked_logits = model(input_ids=prompt).logits
        hooked = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    swapped = apply_column_skip(model)
    assert sorted(swapped) == sorted(n for n in inputs if isinstance(
        dict(model.named_modules())[n], ColumnSkipLinear))
    assert set(installed(model)) == set(sites) - set(swapped)  # their hooks are gone
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=prompt).logits, hooked_logits, rtol=1e-4, atol=1e-4)
        out = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(out, hooked)
    kept = [k for n in swapped for k in dict(model.named_modules())[n].kept]
    assert kept and all(0 <= k <= model.config.hidden_size * 4 for k in kept)


def test_compile_sees_the_op():
    layer = ColumnSkipLinear(torch.randn(16, 24), torch.randn(16), torch.tensor(0.5))
    x = torch.randn(1, 24)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize("policy", ["all", "decode"])
def test_saved_model_on_kernels_decodes_like_hooks(tmp_path, byte_tokenizer, policy):
    """An activation-sparse directory loaded with kernels=True runs its thresholded dense layers as
    ColumnSkipLinear; the lean loop (fast decoder: the native step refuses thresholds) gives the hooked model's
    greedy tokens."""
    import sparsecraft
    from sparsecraft.activation import save_activation
    from sparsecraft.runtime.decode import decoder_for
    from sparsecraft.runtime.native import native_problem

    model = build_model("llama")
    ids = torch.randint(3, 200, (4, 32), generator=torch.Generator().manual_seed(2))
    activate(model, ids, method="teal", sparsity=0.5, progress=False, policy=policy)
    assert "activation thresholds" in native_problem(model)
    prompt = ids[0, :8]
    with torch.no_grad():
        hooked = model.generate(prompt[None], max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 8:].tolist()
    out = save_activation(model, tmp_path / "act", tokenizer=byte_tokenizer)
    loaded = sparsecraft.load(out, kernels=True)
    skips = [m for m in loaded.modules() if isinstance(m, ColumnSkipLinear)]
    assert skips and all(m.policy == policy for m in skips)
    assert not any(installed_sites(loaded)[n] == "input" for n in installed_sites(loaded))
    decoder = decoder_for(loaded)
    assert decoder.name == "fast"
    with torch.no_grad():
        assert decoder.generate(prompt, 10, stop_at_eos=False).tokens == hooked
