"""Channel permutation for N:M: exact folding into producer layers, and more kept importance."""

from __future__ import annotations

import pytest
import torch

import sparsecraft
from sparsecraft import permute
from sparsecraft.api import make_recipe
from sparsecraft.errors import ConfigError
from sparsecraft.models import select_targets, weight_matrix
from sparsecraft.patterns import Pattern, is_nm_valid

FOLDED = {"llama": ("mlp.down_proj", 2), "opt": ("fc2", 1), "gpt2": ("mlp.c_proj", 1)}


def foldable(model) -> list[str]:
    modules = dict(model.named_modules())
    return [t.name for t in select_targets(model, [], []) if permute.producers(modules, t.name) is not None]


def test_foldable_layers_per_architecture(arch, tiny_model):
    suffix, producers = FOLDED[arch]
    names = foldable(tiny_model)
    assert names and all(n.endswith(suffix) for n in names)
    assert len(names) == tiny_model.config.num_hidden_layers
    modules = dict(tiny_model.named_modules())
    assert len(permute.producers(modules, names[0])) == producers
    # attention output projections are not foldable (their inputs come from attention, not elementwise)
    assert not any("attn" in n or "o_proj" in n or "out_proj" in n for n in names)


def test_fold_leaves_dense_outputs_unchanged(arch, tiny_model, calib_ids):
    model = tiny_model
    with torch.no_grad():
        before = model(input_ids=calib_ids).logits
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(0)
    for name in foldable(model):
        cols = weight_matrix(modules[name]).shape[1]
        perm = torch.randperm(cols, generator=g)
        w = weight_matrix(modules[name]).detach().clone()
        permute.fold(modules, name, perm)
        assert not torch.equal(weight_matrix(modules[name]), w)  # really moved
        assert torch.equal(weight_matrix(modules[name]), w[:, perm])
    with torch.no_grad():
        after = model(input_ids=calib_ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_permutation_keeps_more_importance(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    # heavy-tailed, column-correlated importance (like |W| * ||X||): some input channels matter much more
    scores = torch.randn(96, 256, generator=g).abs() * torch.rand(1, 256, generator=g) ** 3
    identity = torch.arange(256)
    init = permute.nm_permutation(scores, n, m, rounds=0)
    perm = permute.nm_permutation(scores, n, m)
    assert sorted(perm.tolist()) == list(range(256))  # a permutation
    kept = [permute.kept_importance(scores, p, n, m) for p in (identity, init, perm)]
    assert kept[1] > kept[0] * 1.01  # the snake start already helps on skewed columns
    assert kept[2] >= kept[1]  # assignment rounds never lose importance
    bound = float(scores.topk(256 * n // m, dim=1).values.sum())  # unstructured keeps at least as much
    assert kept[2] <= bound + 1e-3


def test_permutation_windowed_assignment(monkeypatch):
    """Layers with more groups than one assignment window still give a valid, improving permutation."""
    monkeypatch.setattr(permute, "ASSIGN_WINDOW", 8)
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(32, 256, generator=g).abs() * torch.rand(1, 256, generator=g) ** 3
    init = permute.nm_permutation(scores, 2, 4, rounds=0)
    perm = permute.nm_permutation(scores, 2, 4)
    assert sorted(perm.tolist()) == list(range(256))
    assert permute.kept_importance(scores, perm, 2, 4) >= permute.kept_importance(scores, init, 2, 4)


@pytest.mark.parametrize("method", ["ria", "wanda", "sparsegpt", "magnitude"])
def test_prune_with_permute(arch, tiny_model, calib_ids, method):
    model = tiny_model
    _, report = sparsecraft.prune(model, calib_ids, method=method, pattern="2:4", permute=True, progress=False)
    pattern = Pattern.parse("2:4")
    expected = set(foldable(build_fresh(arch)))
    assert {r.name for r in report.layers if r.permuted} == expected
    for r in report.layers:
        w = weight_matrix(model.get_submodule(r.name))
        assert is_nm_valid(w, pattern), r.name
        assert r.zeros == w.numel() // 2
    assert report.recipe["permute"] is True


def build_fresh(arch):
    from conftest import build_model

    return build_model(arch)


def test_permute_keeps_more_magnitude(tiny_llama):
    """Magnitude 2:4 with permutation keeps at least as much |W| in every permuted layer as without (the
    permutation maximises exactly that), and strictly more in total; other layers are pruned identically."""
    from conftest import build_model

    plain = build_model("llama")
    sparsecraft.prune(plain, None, method="magnitude", pattern="2:4", progress=False)
    _, report = sparsecraft.prune(tiny_llama, None, method="magnitude", pattern="2:4", permute=True,
                                  progress=False)
    gained = 0.0
    for r in report.layers:
        kept_plain = weight_matrix(plain.get_submodule(r.name)).detach().abs().sum()
        kept_perm = weight_matrix(tiny_llama.get_submodule(r.name)).detach().abs().sum()
        if r.permuted:
            assert kept_perm >= kept_plain * (1 - 1e-6), r.name
            gained += float(kept_perm - kept_plain)
        elif r.name.endswith(("gate_proj", "up_proj")):  # producers: the same rows, reordered
            a = weight_matrix(plain.get_submodule(r.name))
            b = weight_matrix(tiny_llama.get_submodule(r.name))
            assert torch.equal(a.sum(1).sort().values, b.sum(1).sort().values), r.name
        else:
            assert torch.equal(weight_matrix(plain.get_submodule(r.name)),
                               weight_matrix(tiny_llama.get_submodule(r.name))), r.name
    assert gained > 0


def test_identity_when_nothing_to_gain():
    scores = torch.ones(4, 16)
    assert torch.equal(permute.nm_permutation(scores, 2, 4), torch.arange(16))


def test_permute_needs_nm():
    with pytest.raises(ConfigError, match="N:M"):
        make_recipe(method="wanda", sparsity=0.5, permute=True)


def test_permute_recipe_round_trip(tmp_path):
    recipe = make_recipe(method="ria", pattern="2:4", permute=True)
    recipe.to_yaml(tmp_path / "r.yaml")
    assert sparsecraft.Recipe.from_yaml(tmp_path / "r.yaml") == recipe
