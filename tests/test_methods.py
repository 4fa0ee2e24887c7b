"""Pruning methods on tiny Llama / OPT / GPT-2 models: exact sparsity, target selection, reconstruction quality
and the sequential (block-by-block) calibration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsecraft
from conftest import build_model, correlated_inputs, floor_count
from sparsecraft.errors import ConfigError, ModelError, SparsecraftError
from sparsecraft.models import find_blocks, weight_matrix
from sparsecraft.patterns import Pattern
from sparsecraft.recipe import Recipe
from sparsecraft.registry import get_method, method_names
from sparsecraft.solvers.sparsegpt import sparsegpt_prune
from sparsecraft.stats import InputStats

METHODS = ["magnitude", "wanda", "ria", "sparsegpt"]
PATTERNS = [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None), ("4:8", None)]
PATTERN_IDS = ["u50", "u70", "2:4", "4:8"]

BLOCK_PREFIX = {"llama": "model.layers", "opt": "model.decoder.layers", "gpt2": "transformer.h"}
BLOCK_LAYERS = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"],
    "opt": ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}


def default_targets(arch: str, layers: int = 2) -> set[str]:
    return {f"{BLOCK_PREFIX[arch]}.{i}.{name}" for i in range(layers) for name in BLOCK_LAYERS[arch]}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def weight_keys(model: nn.Module, names) -> set[str]:
    return {f"{n}.weight" for n in names}


def assert_untouched_except(model: nn.Module, before: dict[str, torch.Tensor], changed: set[str]) -> None:
    """Every state-dict tensor other than the `changed` weights is bit-identical to `before`."""
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in after.items():
        if key not in changed:
            assert torch.equal(value, before[key]), f"{key} changed although it was not a target"


def original_matrix(before: dict, model: nn.Module, name: str) -> torch.Tensor:
    w = before[f"{name}.weight"]
    return w if isinstance(model.get_submodule(name), nn.Linear) else w.t()


def check_nm(w: torch.Tensor, pattern: Pattern, name: str) -> None:
    rows, cols = w.shape
    zeros = (w.reshape(rows, cols // pattern.m, pattern.m) == 0).sum(-1)
    assert (zeros >= pattern.m - pattern.n).all(), f"{name}: a group of {pattern.m} has too few zeros"
    assert (zeros == pattern.m - pattern.n).all(), f"{name}: random weights should have exactly M-N zeros/group"


def check_layer(method: str, w: torch.Tensor, orig: torch.Tensor, sparsity: float, pattern: Pattern,
                blocksize: int, name: str) -> int:
    """Assert the method's exactness contract on one [out, in] weight; returns the expected pruned count."""
    rows, cols = w.shape
    zero = w == 0
    assert not (orig == 0).any(), "random init should have no zeros"
    if pattern.is_nm:
        check_nm(w, pattern, name)
        expected = rows * cols * (pattern.m - pattern.n) // pattern.m
    elif method in ("magnitude", "ria"):  # compared across the whole layer
        expected = floor_count(w.numel(), sparsity)
        assert int(zero.sum()) == expected, name
        if expected > 0 and method == "magnitude":  # the smallest |W| of the whole layer were removed
            assert orig.abs()[zero].max() <= orig.abs()[~zero].min()
    elif method == "wanda":
        expected = rows * floor_count(cols, sparsity)
        assert (zero.sum(1) == floor_count(cols, sparsity)).all(), f"{name}: a row has the wrong zero count"
    else:
        expected = 0
        for i1 in range(0, cols, blocksize):
            i2 = min(i1 + blocksize, cols)
            want = floor_count(rows * (i2 - i1), sparsity)
            assert int(zero[:, i1:i2].sum()) == want, f"{name}: column block {i1}:{i2}"
            expected += want
    if method in ("magnitude", "wanda", "ria"):  # criteria only mask: kept weights keep their values
        assert torch.equal(w[~zero], orig[~zero]), name
    elif expected:  # SparseGPT updates the kept weights to compensate
        assert not torch.equal(w[~zero], orig[~zero]), name
    return expected


@pytest.mark.parametrize("pattern, sparsity", PATTERNS, ids=PATTERN_IDS)
@pytest.mark.parametrize("method", METHODS)
def test_exact_sparsity(arch, tiny_model, calib_ids, method, pattern, sparsity):
    model = tiny_model
    before = snapshot(model)
    _, report = sparsecraft.prune(model, calib_ids, method=method, sparsity=sparsity, pattern=pattern,
                                  progress=False)
    p = Pattern.parse(pattern)
    s = p.nm_sparsity if p.is_nm else sparsity
    names = [r.name for r in report.layers]
    assert set(names) == default_targets(arch)
    assert len(names) == len(set(names))
    assert report.recipe["method"] == method and report.recipe["pattern"] == str(p)
    blocksize = Recipe().blocksize
    assert report.recipe["blocksize"] == blocksize
    total = zeros = 0
    for r in report.layers:
        w = weight_matrix(model.get_submodule(r.name)).detach()
        expected = check_layer(method, w, original_matrix(before, model, r.name), s, p, blocksize, r.name)
        assert r.shape == tuple(w.shape)
        assert r.pruned == expected
        assert r.zeros == int((w == 0).sum()) >= r.pruned
        assert r.target_sparsity == pytest.approx(s)
        total += w.numel()
        zeros += r.zeros
    assert report.sparsity == pytest.approx(zeros / total)
    # embeddings, lm_head, norms, biases: all untouched
    assert_untouched_except(model, before, weight_keys(model, names))


@pytest.mark.parametrize("pattern, sparsity", PATTERNS, ids=PATTERN_IDS)
def test_sparsegpt_several_column_blocks(arch, tiny_model, calib_ids, pattern, sparsity):
    """blocksize=32 splits every layer (64..256 inputs) into 2-8 column blocks, each exactly sparse."""
    model = tiny_model
    before = snapshot(model)
    _, report = sparsecraft.prune(model, calib_ids, method="sparsegpt", sparsity=sparsity, pattern=pattern,
                                  blocksize=32, progress=False)
    assert report.recipe["blocksize"] == 32
    p = Pattern.parse(pattern)
    s = p.nm_sparsity if p.is_nm else sparsity
    for r in report.layers:
        w = weight_matrix(model.get_submodule(r.name)).detach()
        assert w.shape[1] // 32 >= 2
        assert r.pruned == check_layer("sparsegpt", w, original_matrix(before, model, r.name), s, p, 32, r.name)
    assert_untouched_except(model, before, weight_keys(model, [r.name for r in report.layers]))


def test_sparsegpt_blocksize_must_fit_nm(tiny_llama, calib_ids):
    before = snapshot(tiny_llama)
    with pytest.raises(SparsecraftError, match="multiple of M=8"):
        sparsecraft.prune(tiny_llama, calib_ids, method="sparsegpt", pattern="4:8", blocksize=12, progress=False)
    assert_untouched_except(tiny_llama, before, set())


def test_method_registry():
    assert method_names() == sorted(METHODS)
    assert get_method("magnitude").needs == "weights" and not get_method("magnitude").needs_data
    assert get_method("wanda").needs == "norms" and get_method("ria").needs == "norms"
    assert get_method("sparsegpt").needs == "hessian"


# --- target selection ------------------------------------------------------------------------------------------

def test_outside_layers_not_targeted_by_default(arch, tiny_model):
    names = {t.name for t in sparsecraft.select_targets(tiny_model)}
    assert names == default_targets(arch)
    assert not any("lm_head" in n or "embed" in n or n.startswith("wte") for n in names)


@pytest.mark.parametrize("arch_name, expected", [
    ("llama", {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
               "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}),
    ("gpt2", {"transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc",
              "transformer.h.1.mlp.c_proj"}),
])
def test_targets_regex(arch_name, expected, calib_ids):
    model = build_model(arch_name)
    before = snapshot(model)
    _, report = sparsecraft.prune(model, calib_ids, method="wanda", sparsity=0.5, targets=["mlp"], progress=False)
    assert {r.name for r in report.layers} == expected
    for r in report.layers:
        w = weight_matrix(model.get_submodule(r.name))
        assert ((w == 0).sum(1) == w.shape[1] // 2).all()
    assert_untouched_except(model, before, weight_keys(model, expected))


def test_targets_matching_nothing(tiny_opt):
    # OPT's MLP layers are called fc1/fc2: nothing matches 'mlp'
    with pytest.raises(ModelError, match="no prunable layers"):
        sparsecraft.prune(tiny_opt, None, method="magnitude", sparsity=0.5, targets=["mlp"], progress=False)


def test_ignore_regex(arch, tiny_model, calib_ids):
    before = snapshot(tiny_model)
    _, report = sparsecraft.prune(tiny_model, calib_ids, method="sparsegpt", sparsity=0.5, ignore=["q_proj"],
                                  progress=False)
    expected = {n for n in default_targets(arch) if "q_proj" not in n}
    assert {r.name for r in report.layers} == expected
    if arch != "gpt2":  # GPT-2 has a fused c_attn and no q_proj
        assert len(expected) == len(default_targets(arch)) - 2
    assert_untouched_except(tiny_model, before, weight_keys(tiny_model, expected))


def test_ignore_everything(tiny_llama):
    with pytest.raises(ModelError, match="no prunable layers"):
        sparsecraft.prune(tiny_llama, None, method="magnitude", sparsity=0.5, ignore=["."], progress=False)


@pytest.mark.parametrize("arch_name", ["gpt2", "opt"])
def test_tied_lm_head_refused(arch_name, calib_ids):
    model = build_model(arch_name)
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    before = snapshot(model)
    for method in METHODS:
        with pytest.raises(SparsecraftError, match="tied"):
            sparsecraft.prune(model, calib_ids, method=method, sparsity=0.5, targets=["lm_head"], progress=False)
    assert_untouched_except(model, before, set())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_untied_lm_head_outside_blocks(tiny_llama, calib_ids, method):
    """An untied lm_head (outside the blocks) can be targeted; it is calibrated on the model's forward."""
    model = tiny_llama
    assert not model.config.tie_word_embeddings
    before = snapshot(model)
    _, report = sparsecraft.prune(model, calib_ids, method=method, sparsity=0.5, targets=["lm_head", "mlp.down"],
                                  progress=False)
    names = [r.name for r in report.layers]
    assert set(names) == {"lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    w = model.lm_head.weight
    if method == "wanda":
        assert ((w == 0).sum(1) == w.shape[1] // 2).all()
    else:
        assert int((w == 0).sum()) == w.numel() // 2
    assert_untouched_except(model, before, weight_keys(model, names))


def test_nm_on_incompatible_width_fails_before_work(calib_ids):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=60, n_layer=2, n_head=4, n_positions=64)).eval()
    before = snapshot(model)
    with pytest.raises(ConfigError, match="transformer.h.0.attn.c_attn has 60 input columns"):
        sparsecraft.prune(model, calib_ids, method="wanda", pattern="4:8", progress=False)
    assert_untouched_except(model, before, set())


def test_data_methods_need_calibration(tiny_llama):
    for bad in (torch.zeros(0, 8, dtype=torch.long), torch.zeros(16, dtype=torch.long)):
        with pytest.raises(SparsecraftError, match="calibration"):
            sparsecraft.prune(tiny_llama, bad, method="wanda", sparsity=0.5, progress=False)
    with pytest.raises(SparsecraftError, match="integer tensor"):
        sparsecraft.prune(tiny_llama, torch.rand(4, 8), method="wanda", sparsity=0.5, progress=False)


# --- sparsity 0 --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_sparsity_zero_changes_nothing(arch, tiny_model, calib_ids, method):
    before = snapshot(tiny_model)
    _, report = sparsecraft.prune(tiny_model, calib_ids, method=method, sparsity=0.0, progress=False)
    assert len(report.layers) == len(default_targets(arch))
    assert all(r.pruned == 0 and r.zeros == 0 for r in report.layers)
    after = tiny_model.state_dict()
    for key, value in after.items():
        if method == "sparsegpt":
            torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)
        else:
            assert torch.equal(value, before[key]), key


# --- statistics and reconstruction ------------------------------------------------------------------------------

def test_statistics_collectors():
    x = correlated_inputs(300, 16)
    h, c = InputStats(16, torch.device("cpu"), hessian=True), InputStats(16, torch.device("cpu"))
    for chunk in x.reshape(3, 100, 16):  # batched input [batch, tokens, features] is flattened
        h.add_batch(chunk.reshape(2, 50, 16))
        c.add_batch(chunk.reshape(2, 50, 16))
    assert h.tokens == c.tokens == 300
    torch.testing.assert_close(h.hessian, 2 * x.T @ x / 300, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(c.norms, x.norm(dim=0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.mean, x.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.var, x.var(0, unbiased=False), rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError):
        _ = c.hessian


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.5), ("2:4", None), ("4:8", None),
                                               ("unstructured", 0.7)])
def test_sparsegpt_reconstructs_better(pattern, sparsity):
    x = correlated_inputs()
    torch.manual_seed(0)
    layer = nn.Linear(64, 48, bias=False)
    w = layer.weight.detach().clone()
    p = Pattern.parse(pattern)
    s = p.nm_sparsity if p.is_nm else sparsity
    recipe = Recipe(method="sparsegpt", sparsity=sparsity, pattern=pattern)

    hessian = norms = InputStats(64, torch.device("cpu"), hessian=True)
    for chunk in x.split(256):
        hessian.add_batch(chunk)
    w_sgpt, keep_sgpt = sparsegpt_prune(w, hessian.hessian, s, p, blocksize=128, damp=0.01)
    w_mag, keep_mag = get_method("magnitude").prune(w.clone(), None, s, p, recipe)
    w_wanda, keep_wanda = get_method("wanda").prune(w.clone(), norms, s, p, recipe)

    def error(w_hat: torch.Tensor) -> float:
        return float(torch.linalg.norm(w @ x.T - w_hat @ x.T))

    assert int((~keep_sgpt).sum()) == int((~keep_mag).sum()) == floor_count(w.numel(), s)
    assert ((~keep_wanda).sum(1) == floor_count(64, s)).all()  # wanda: per output row
    for w_hat, keep in ((w_sgpt, keep_sgpt), (w_mag, keep_mag), (w_wanda, keep_wanda)):
        assert torch.equal(w_hat == 0, ~keep)
    e_sgpt, e_mag, e_wanda = error(w_sgpt), error(w_mag), error(w_wanda)
    # measured ratios are 0.4-0.6; the margin keeps the test meaningful and robust
    assert e_sgpt < 0.8 * e_mag
    assert e_sgpt < 0.8 * e_wanda
    # the OBS update matters: SparseGPT's own mask without the update is worse
    assert e_sgpt < 0.8 * error(w * keep_sgpt)
    assert torch.equal(w, layer.weight)  # sparsegpt_prune does not modify its input


def reference_fasterprune(W, H, sparsity, prunen=0, prunem=0, blocksize=128, percdamp=0.01):
    """SparseGPT's reference `fasterprune` (IST-DASLab/sparsegpt), ported minus logging/quantisation.
    As in the reference, `prunen` is the number of weights *pruned* per group of `prunem`.
    One deliberate change: the reference thresholds at `sorted[int(numel * sparsity)]` with `<=`, which prunes
    one weight more than `sparsity` per block; sparsecraft prunes exactly int(numel * sparsity), so the port
    thresholds at the k-th smallest score (index k - 1)."""
    W, H = W.clone().float(), H.clone()
    columns = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            k = int(tmp.numel() * sparsity)
            mask1 = tmp <= torch.sort(tmp.flatten())[0][k - 1] if k else torch.zeros_like(tmp, dtype=torch.bool)
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


@pytest.mark.parametrize("blocksize", [16, 128])
@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None),
                                               ("4:8", None), ("1:4", None)])
def test_sparsegpt_matches_reference(pattern, sparsity, blocksize):
    x = correlated_inputs(512, 64, seed=1)
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(2))
    hessian = InputStats(64, torch.device("cpu"), hessian=True)
    hessian.add_batch(x)
    p = Pattern.parse(pattern)
    s = p.nm_sparsity if p.is_nm else sparsity
    ours, keep = sparsegpt_prune(w, hessian.hessian, s, p, blocksize=blocksize, damp=0.01)
    prunen, prunem = (p.m - p.n, p.m) if p.is_nm else (0, 0)
    ref = reference_fasterprune(w, hessian.hessian, s, prunen, prunem, blocksize=blocksize)
    assert torch.equal(ours == 0, ref == 0)  # same masks (the scores are distinct, so no ties)
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-4)


def test_sparsegpt_dead_inputs():
    w = torch.randn(8, 16)
    h = torch.zeros(16, 16)  # all inputs dead: weights of dead inputs are zeroed, nothing fails
    out, keep = sparsegpt_prune(w, h, 0.5, Pattern(), blocksize=8)
    assert (out == 0).all()
    assert int((~keep).sum()) == 64
    assert not (w == 0).any()


# --- sequential calibration -------------------------------------------------------------------------------------

def _hidden_states(args, kwargs) -> torch.Tensor:
    return (args[0] if args else kwargs["hidden_states"]).detach().clone()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_block1_calibrated_on_pruned_block0(arch, tiny_model, calib_ids, method):
    model = tiny_model
    _, blocks = find_blocks(model)
    assert len(blocks) == 2
    seen: list[torch.Tensor] = []
    handle = blocks[1].register_forward_pre_hook(lambda m, a, k: seen.append(_hidden_states(a, k)),
                                                 with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=calib_ids, use_cache=False)
        dense_input = seen.pop()
        assert not seen
        sparsecraft.prune(model, calib_ids, method=method, sparsity=0.5, batch_size=4, progress=False)
        during = torch.cat(seen)  # block 1 ran once per calibration batch, to collect its statistics
        assert len(seen) == 2
        seen.clear()
        with torch.no_grad():
            model(input_ids=calib_ids, use_cache=False)
        pruned_input = seen.pop()
    finally:
        handle.remove()
    assert during.shape == pruned_input.shape == dense_input.shape
    torch.testing.assert_close(during, pruned_input, rtol=1e-4, atol=1e-5)
    assert (during - dense_input).abs().max() > 1e-3  # and those were not the dense model's activations


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_pruning_is_deterministic(calib_ids, method):
    weights = []
    for _ in range(2):
        model = build_model("llama")
        sparsecraft.prune(model, calib_ids, method=method, sparsity=0.5, progress=False)
        weights.append(model.state_dict())
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    other = build_model("llama")
    other_ids = torch.randint(0, 256, calib_ids.shape, generator=torch.Generator().manual_seed(99))
    sparsecraft.prune(other, other_ids, method=method, sparsity=0.5, progress=False)
    key = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(other.state_dict()[key] == 0, weights[0][key] == 0)  # the data matters


def test_magnitude_needs_no_data(tiny_llama):
    _, report = sparsecraft.prune(tiny_llama, None, method="magnitude", sparsity=0.5, progress=False)
    assert report.sparsity == pytest.approx(0.5)
