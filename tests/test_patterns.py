"""Sparsity patterns, sparsity resolution and exact masks."""

from __future__ import annotations

import pytest
import torch

from conftest import floor_count
from sparsecraft.errors import ConfigError, SparsecraftError
from sparsecraft.patterns import Pattern, check_columns, is_nm_valid, mask_from_scores, prune_count, resolve_sparsity
from sparsecraft.recipe import Recipe


def scores(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))


# --- Pattern.parse ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["unstructured", "UNSTRUCTURED", " unstructured ", "", None, "none"])
def test_parse_unstructured(text):
    p = Pattern.parse(text)
    assert p == Pattern()
    assert not p.is_nm
    assert str(p) == "unstructured"


@pytest.mark.parametrize("text, n, m, implied", [("2:4", 2, 4, 0.5), ("4:8", 4, 8, 0.5), (" 1 : 4 ", 1, 4, 0.75),
                                                 ("3:4", 3, 4, 0.25)])
def test_parse_nm(text, n, m, implied):
    p = Pattern.parse(text)
    assert (p.n, p.m) == (n, m)
    assert p.is_nm
    assert str(p) == f"{n}:{m}"
    assert p.nm_sparsity == pytest.approx(implied)
    assert Pattern.parse(p) is p  # a Pattern passes through


@pytest.mark.parametrize("text", ["4:2", "2:2", "0:4", "foo", "2:", ":4", "2-4", "2:4:8", "-1:4", "2.0:4"])
def test_parse_errors(text):
    with pytest.raises(ConfigError) as info:
        Pattern.parse(text)
    assert isinstance(info.value, SparsecraftError)
    assert repr(text) in str(info.value)


# --- resolve_sparsity ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, implied", [("2:4", 0.5), ("4:8", 0.5), ("1:4", 0.75), ("1:8", 0.875)])
def test_nm_implies_sparsity(pattern, implied):
    p = Pattern.parse(pattern)
    assert resolve_sparsity(p, None) == pytest.approx(implied)
    assert resolve_sparsity(p, implied) == pytest.approx(implied)


@pytest.mark.parametrize("pattern, sparsity", [("2:4", 0.7), ("2:4", 0.25), ("1:4", 0.5), ("4:8", 0.0)])
def test_nm_sparsity_mismatch(pattern, sparsity):
    with pytest.raises(ConfigError, match="always gives sparsity"):
        resolve_sparsity(Pattern.parse(pattern), sparsity)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.99])
def test_unstructured_sparsity_in_range(sparsity):
    assert resolve_sparsity(Pattern(), sparsity) == sparsity


@pytest.mark.parametrize("sparsity", [1.0, 1.5, -0.1, -1, float("nan"), "abc"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsity_out_of_range(sparsity, pattern):
    with pytest.raises(ConfigError):
        resolve_sparsity(Pattern.parse(pattern), sparsity)


def test_unstructured_needs_sparsity():
    with pytest.raises(ConfigError, match="needs --sparsity"):
        resolve_sparsity(Pattern(), None)


def test_recipe_resolves_sparsity():
    assert Recipe().sparsity == 0.5 and Recipe().pattern == "unstructured"
    assert Recipe(pattern="2:4").sparsity == 0.5
    # An N:M pattern alone implies its sparsity (no stale default of 0.5 may conflict with it).
    assert Recipe(pattern="1:4").sparsity == pytest.approx(0.75)
    assert Recipe.from_dict({"pattern": "3:4"}).sparsity == pytest.approx(0.25)
    with pytest.raises(ConfigError):
        Recipe(pattern="2:4", sparsity=0.7)
    with pytest.raises(ConfigError):
        Recipe(sparsity=1.0)
    with pytest.raises(ConfigError, match="unknown method"):
        Recipe(method="nope")
    with pytest.raises(ConfigError, match="nsamples"):
        Recipe(nsamples=0)
    with pytest.raises(ConfigError, match="regex"):
        Recipe(targets=["("])
    with pytest.raises(ConfigError, match="unknown recipe keys"):
        Recipe.from_dict({"sparsty": 0.5})


# --- masks -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("cols", [10, 64, 100, 129])
def test_row_mask_exact_per_row(sparsity, cols):
    s = scores(17, cols)
    keep = mask_from_scores(s, sparsity, Pattern(), scope="row")
    assert keep.dtype == torch.bool and keep.shape == s.shape
    expected = floor_count(cols, sparsity)
    assert ((~keep).sum(1) == expected).all()
    # The pruned entries are the lowest scores of their row.
    for r in range(s.shape[0]):
        if 0 < expected < cols:
            assert s[r][~keep[r]].max() < s[r][keep[r]].min()


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.7, 0.95])
@pytest.mark.parametrize("shape", [(16, 64), (7, 13), (32, 100)])
def test_layer_mask_exact_per_layer(sparsity, shape):
    s = scores(*shape, seed=3)
    keep = mask_from_scores(s, sparsity, Pattern(), scope="layer")
    assert keep.shape == s.shape
    expected = floor_count(s.numel(), sparsity)
    assert int((~keep).sum()) == expected
    if 0 < expected < s.numel():
        assert s[~keep].max() < s[keep].min()


def test_layer_and_row_masks_differ():
    # Rows with very different scales: the per-layer mask prunes whole rows, the per-row mask cannot.
    s = scores(4, 16) * torch.tensor([[1e-3], [1.0], [1.0], [1.0]])
    layer = mask_from_scores(s, 0.25, Pattern(), scope="layer")
    row = mask_from_scores(s, 0.25, Pattern(), scope="row")
    assert not layer[0].any()
    assert ((~row).sum(1) == 4).all()


def test_unknown_scope():
    with pytest.raises(ConfigError, match="scope"):
        mask_from_scores(scores(4, 8), 0.5, Pattern(), scope="column")


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8", "1:2"])
def test_nm_mask_every_group(pattern):
    p = Pattern.parse(pattern)
    s = scores(12, 64, seed=5)
    keep = mask_from_scores(s, 0.123, p)  # the sparsity argument is irrelevant for N:M
    groups_keep = keep.reshape(12, 64 // p.m, p.m)
    assert ((~groups_keep).sum(-1) == p.m - p.n).all()
    groups_scores = s.reshape(12, 64 // p.m, p.m)
    pruned_max = torch.where(~groups_keep, groups_scores, torch.full_like(groups_scores, -1)).amax(-1)
    kept_min = torch.where(groups_keep, groups_scores, torch.full_like(groups_scores, 2)).amin(-1)
    assert (pruned_max < kept_min).all()
    assert is_nm_valid(s * keep, p)


def test_prune_count_floors():
    assert prune_count(64, 0.7) == 44
    assert prune_count(10, 0.3) == 3  # 10 * 0.3 = 2.9999999999999996 in floating point
    assert prune_count(100, 0.29) == 29
    assert prune_count(5, 0.0) == 0
    for total in range(1, 300):
        for s in (0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.9):
            assert prune_count(total, s) == floor_count(total, s)


# --- is_nm_valid / check_columns ---------------------------------------------------------------------------------

def test_is_nm_valid():
    p = Pattern.parse("2:4")
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert is_nm_valid(w, p)  # groups with 2 and 1 non-zeros
    assert is_nm_valid(torch.zeros(3, 8), p)
    w_bad = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert not is_nm_valid(w_bad, p)
    # Misaligned 2:4 (valid in a shifted grouping only) is not valid.
    w_shift = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    assert not is_nm_valid(w_shift, p)
    assert not is_nm_valid(torch.ones(4, 8), p)
    assert not is_nm_valid(torch.ones(4, 8), Pattern.parse("3:4"))
    dense_48 = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    assert is_nm_valid(dense_48, Pattern.parse("4:8"))
    assert not is_nm_valid(dense_48, p)


def test_check_columns():
    check_columns(64, Pattern.parse("2:4"))
    check_columns(64, Pattern.parse("4:8"))
    check_columns(6, Pattern())  # unstructured takes any width
    with pytest.raises(ConfigError, match="not a multiple of 8") as info:
        check_columns(12, Pattern.parse("4:8"), layer="model.fc")
    assert "model.fc" in str(info.value) and "--ignore" in str(info.value)
    with pytest.raises(ConfigError, match="not a multiple of 4"):
        check_columns(6, Pattern.parse("2:4"))
    with pytest.raises(ConfigError):
        mask_from_scores(scores(3, 6), 0.5, Pattern.parse("2:4"))
