"""Magnitude pruning: remove the smallest |W| in each layer (per group for N:M)."""

from __future__ import annotations

import torch

from ..patterns import Pattern, mask_from_scores
from ..registry import register


@register("magnitude", needs="weights", summary="|W|, compared across the whole layer; no data needed")
def prune_magnitude(weight: torch.Tensor, stats, sparsity: float, pattern: Pattern, recipe):
    keep = mask_from_scores(weight.abs(), sparsity, pattern, scope="layer")
    return weight * keep, keep
