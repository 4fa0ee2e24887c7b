"""Beyond uniform one-shot pruning: OWL allocation, per-layer overrides, DSnoT refinement, YAML recipes."""

from __future__ import annotations

import pytest
import torch

import sparsecraft
from conftest import correlated_inputs
from sparsecraft.allocation import outlier_ratio, spread
from sparsecraft.cli import main
from sparsecraft.errors import ConfigError
from sparsecraft.models import weight_matrix
from sparsecraft.patterns import Pattern, is_nm_valid, mask_from_scores
from sparsecraft.recipe import Recipe
from sparsecraft.refine.dsnot import dsnot_refine
from sparsecraft.solvers.sparsegpt import sparsegpt_prune
from sparsecraft.stats import InputStats, reconstruction_error


def layer_stats(x: torch.Tensor) -> InputStats:
    stats = InputStats(x.shape[1], torch.device("cpu"), hessian=True)
    for chunk in x.split(256):
        stats.add_batch(chunk)
    return stats


def shifted_inputs(seed: int = 0) -> torch.Tensor:
    """Correlated features with a non-zero mean per feature, as real activations have."""
    x = correlated_inputs(2048, 64, seed=seed)
    return x + torch.randn(64, generator=torch.Generator().manual_seed(seed + 7))


# --- OWL ---------------------------------------------------------------------------------------------------

def test_outlier_ratio_counts_entries_above_m_times_mean():
    scores = [torch.tensor([[1.0, 1.0, 1.0, 13.0]]), torch.tensor([[1.0, 1.0]])]  # mean 3 -> threshold 6
    assert outlier_ratio(scores, 2.0) == pytest.approx(1 / 6)
    assert outlier_ratio(scores, 5.0) == 0.0


def test_spread_is_exact_and_bounded():
    ratios = {0: 0.01, 1: 0.05, 2: 0.02, 3: 0.03}
    sizes = {0: 100, 1: 300, 2: 200, 3: 100}
    out = spread(ratios, sizes, 0.7, 0.08)
    weighted = sum(out[k] * sizes[k] for k in out) / sum(sizes.values())
    assert weighted == pytest.approx(0.7, abs=1e-12)
    assert max(out.values()) - min(out.values()) == pytest.approx(0.16)
    assert out[1] == min(out.values()) and out[0] == max(out.values())  # more outliers -> pruned less
    assert spread({0: 0.1, 1: 0.1}, {0: 1, 1: 1}, 0.5, 0.08) == {0: 0.5, 1: 0.5}
    with pytest.raises(ConfigError, match="lower --owl-lambda"):
        spread({0: 0.0, 1: 1.0}, {0: 1, 1: 1}, 0.95, 0.08)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_keeps_overall_sparsity_exact(tiny_llama, calib_ids, method):
    s, lam = 0.6, 0.1
    _, report = sparsecraft.prune(tiny_llama, calib_ids, method=method, sparsity=s, allocation="owl",
                                  owl_lambda=lam, progress=False)
    targets = {r.name: r.target_sparsity for r in report.layers}
    per_block = {n.split(".")[2]: v for n, v in targets.items()}
    assert len(set(per_block.values())) == 2  # the two blocks get different sparsities
    assert all(s - lam - 1e-9 <= v <= s + lam + 1e-9 for v in targets.values())
    sizes = {r.name: r.shape[0] * r.shape[1] for r in report.layers}
    weighted = sum(targets[n] * sizes[n] for n in targets) / sum(sizes.values())
    assert weighted == pytest.approx(s, abs=1e-12)
    pruned = sum(r.pruned for r in report.layers) / sum(sizes.values())
    assert abs(pruned - s) < 1 / 64  # within rounding of one weight per row/group
    for r in report.layers:  # each layer exact at its own sparsity
        w = weight_matrix(tiny_llama.get_submodule(r.name))
        if method == "wanda":
            assert ((w == 0).sum(1) == int(w.shape[1] * r.target_sparsity + 1e-9)).all()


def test_overrides_pin_matching_layers(tiny_llama, calib_ids):
    _, report = sparsecraft.prune(tiny_llama, calib_ids, method="wanda", sparsity=0.5,
                                  overrides={r"down_proj": 0.8, r"layers\.0\.self_attn\.q_proj": 0.0},
                                  progress=False)
    for r in report.layers:
        want = 0.8 if "down_proj" in r.name else 0.0 if r.name == "model.layers.0.self_attn.q_proj" else 0.5
        assert r.target_sparsity == want
        w = weight_matrix(tiny_llama.get_submodule(r.name))
        assert ((w == 0).sum(1) == int(w.shape[1] * want)).all()


@pytest.mark.parametrize("bad", [dict(allocation="owl", pattern="2:4"), dict(overrides={"mlp": 0.5}, pattern="2:4"),
                                 dict(allocation="bogus"), dict(refine="nope"), dict(owl_lambda=0.6),
                                 dict(overrides={"mlp": 1.0}), dict(overrides={"(": 0.5}), dict(dsnot_cycles=-1)])
def test_bad_quality_options(bad):
    with pytest.raises(ConfigError):
        Recipe(**{"method": "wanda", **bad})


def test_cli_rejects_owl_with_nm(tmp_path, capsys):
    code = main(["prune", "--model", str(tmp_path / "missing"), "--pattern", "2:4", "--allocation", "owl",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unstructured" in err[0]
    assert not (tmp_path / "out").exists()


# --- DSnoT -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("start", ["wanda", "sparsegpt"])
def test_dsnot_never_worse_and_keeps_pattern(seed, pattern, start):
    x = shifted_inputs(seed)
    stats = layer_stats(x)
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(seed + 1))
    p = Pattern.parse(pattern)
    s = p.nm_sparsity if p.is_nm else 0.6
    if start == "wanda":
        keep = mask_from_scores(w.abs() * stats.norms, s, p, "row")
        pruned = w * keep
    else:
        pruned, keep = sparsegpt_prune(w, stats.hessian, s, p)
    refined, new_keep = dsnot_refine(w, pruned, keep, stats, p, cycles=50, threshold=0.0)
    before = reconstruction_error(w, pruned, stats.hessian)
    after = reconstruction_error(w, refined, stats.hessian)
    assert (after <= before * (1 + 1e-9) + 1e-9).all()  # no row gets worse
    assert torch.equal(new_keep.sum(1), keep.sum(1))  # per-row counts preserved
    assert torch.equal(refined == 0, ~new_keep)
    if p.is_nm:
        assert is_nm_valid(refined, p)
    if start == "wanda":
        assert after.sum() < before.sum() * 0.99  # and it does improve a one-pass mask



def test_dsnot_zero_cycles_is_identity():
    x = shifted_inputs()
    stats = layer_stats(x)
    w = torch.randn(16, 64)
    keep = mask_from_scores(w.abs() * stats.norms, 0.5, Pattern(), "row")
    refined, new_keep = dsnot_refine(w, w * keep, keep, stats, Pattern(), cycles=0)
    assert torch.equal(refined, w * keep) and torch.equal(new_keep, keep)


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.6), ("2:4", None)])
def test_dsnot_in_pipeline(arch, tiny_model, calib_ids, pattern, sparsity):
    _, base = sparsecraft.prune(build(arch), calib_ids, method="wanda", sparsity=sparsity, pattern=pattern,
                                refine="none", progress=False)
    _, refined = sparsecraft.prune(tiny_model, calib_ids, method="wanda", sparsity=sparsity, pattern=pattern,
                                   refine="dsnot", progress=False)
    assert [r.pruned for r in refined.layers] == [r.pruned for r in base.layers]
    assert all(r.error is not None for r in refined.layers)
    p = Pattern.parse(pattern)
    for r in refined.layers:
        w = weight_matrix(tiny_model.get_submodule(r.name))
        if p.is_nm:
            assert is_nm_valid(w, p)
        else:
            assert ((w == 0).sum(1) == int(w.shape[1] * sparsity)).all()


def build(arch):
    from conftest import build_model

    return build_model(arch)


# --- recipes -----------------------------------------------------------------------------------------------

def test_recipe_yaml_round_trip(tmp_path):
    recipe = Recipe(method="sparsegpt", sparsity=0.7, allocation="owl", owl_lambda=0.05, refine="dsnot",
                    overrides={"lm_head": 0.3, r"layers\.0\.": 0.5}, targets=["proj"], ignore=["q_proj"],
                    nsamples=16, seqlen=128, seed=3, dsnot_cycles=20)
    path = tmp_path / "r.yaml"
    recipe.to_yaml(path)
    again = Recipe.from_yaml(path)
    assert again == recipe
    assert again.to_dict() == recipe.to_dict()
    nm = Recipe(method="wanda", pattern="2:4")
    nm.to_yaml(path)
    assert Recipe.from_yaml(path) == nm


def test_recipe_replays_identically(tiny_llama, calib_ids, tmp_path):
    from conftest import build_model

    recipe = Recipe(method="sparsegpt", sparsity=0.6, allocation="owl", refine="dsnot")
    recipe.to_yaml(tmp_path / "r.yaml")
    a, _ = sparsecraft.prune(tiny_llama, calib_ids, recipe, progress=False)
    b, _ = sparsecraft.prune(build_model("llama"), calib_ids, tmp_path / "r.yaml", progress=False)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# --- refit and dense targets -------------------------------------------------------------------------------

def exact_refit(target: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Row-by-row solve of H_SS w_S = (target H)_S, the closed form refit_weights iterates towards."""
    H = hessian.double().clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    out = torch.zeros_like(target, dtype=torch.float64)
    for i in range(target.shape[0]):
        s = keep[i]
        out[i, s] = torch.linalg.solve(H[s][:, s], (target[i].double() @ H)[s])
    return out


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_refit_solves_least_squares_and_keeps_mask(pattern):
    from sparsecraft.refine.refit import refit_weights

    x = shifted_inputs(3)
    stats = layer_stats(x)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    p = Pattern.parse(pattern)
    keep = mask_from_scores(w.abs() * stats.norms, 0.5, p, "row")
    fitted = refit_weights(w, w * keep, keep, stats.hessian, damp=0.01, iters=200, tol=1e-10)
    assert bool((fitted[~keep] == 0).all())
    torch.testing.assert_close(fitted.double(), exact_refit(w, keep, stats.hessian, 0.01), rtol=1e-3, atol=1e-3)
    before = reconstruction_error(w, w * keep, stats.hessian)
    after = reconstruction_error(w, fitted, stats.hessian)
    assert (after <= before * (1 + 1e-6)).all() and after.sum() < 0.8 * before.sum()


def test_dense_target_is_least_squares_against_dense_outputs():
    g = torch.Generator().manual_seed(5)
    x_dense = shifted_inputs(5)
    x_pruned = x_dense + 0.3 * torch.randn(x_dense.shape, generator=g)  # what a pruned model feeds this layer
    stats = InputStats(64, torch.device("cpu"), cross=True)
    for a, b in zip(x_pruned.split(256), x_dense.split(256)):
        stats.add_batch(a, dense=b)
    assert stats.has_cross
    w = torch.randn(16, 64, generator=g)
    v = stats.dense_target(w, damp=0.0)
    ls = torch.linalg.lstsq(x_pruned.double(), (x_dense.double() @ w.double().t())).solution.t()
    torch.testing.assert_close(v.double(), ls, rtol=1e-3, atol=1e-3)
    # W' fed the pruned inputs reproduces the dense outputs better than W does
    err = lambda m: ((x_dense @ w.t()) - (x_pruned @ m.t())).norm()  # noqa: E731
    assert err(v) < 0.9 * err(w)


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.6), ("2:4", None)])
def test_dense_targets_and_refit_in_pipeline(arch, tiny_model, calib_ids, pattern, sparsity):
    _, report = sparsecraft.prune(tiny_model, calib_ids, method="sparsegpt", sparsity=sparsity, pattern=pattern,
                                  dense_targets=True, refine="dsnot,refit", progress=False)
    assert report.recipe["refine"] == ["dsnot", "refit"] and report.recipe["dense_targets"] is True
    p = Pattern.parse(pattern)
    for r in report.layers:
        w = weight_matrix(tiny_model.get_submodule(r.name))
        if p.is_nm:
            assert is_nm_valid(w, p)
        else:  # SparseGPT's per-block counts are not kept by DSnoT's row swaps, the layer total is
            assert int((w == 0).sum()) >= r.pruned
            assert abs(r.pruned - w.numel() * sparsity) <= w.shape[1] // 128 + 1
        assert r.error is not None and 0 <= r.error < 1


def test_dense_stream_statistics_match_a_manual_two_stream_run(tiny_llama, calib_ids):
    """Block 0 sees identical dense and pruned inputs, so its cross term equals its own X^T X."""
    from sparsecraft.calibrate import columns, run_sequential
    from sparsecraft.models import find_blocks, select_targets

    _, blocks = find_blocks(tiny_llama)
    targets = [t for t in select_targets(tiny_llama) if t.block == 0]
    seen = {}

    def on_block(index, block_targets, stats):
        seen.update(stats)

    run_sequential(tiny_llama, blocks, list(calib_ids.split(4)), targets,
                   lambda t: InputStats(columns(t), torch.device("cpu"), cross=True), on_block,
                   torch.device("cpu"), progress=False, dense_stream=True)
    assert len(seen) == 7
    for stats in seen.values():
        assert stats.has_cross
        torch.testing.assert_close(stats.dtx, stats.xtx)


def test_ria_scores_match_the_paper_formula():
    from sparsecraft.criteria.ria import ria_scores

    w = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    stats = InputStats(2, torch.device("cpu"))
    stats.add_batch(torch.tensor([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [1.0, 2.0]]))  # ||x|| = (2, 4)
    col = torch.tensor([[1 / 4, 2 / 6], [3 / 4, 4 / 6]])
    row = torch.tensor([[1 / 3, 2 / 3], [3 / 7, 4 / 7]])
    torch.testing.assert_close(ria_scores(w, stats), (col + row) * torch.tensor([2.0, 4.0]) ** 0.5)
