"""RIA (Zhang et al. 2024, "Plug-and-Play"): relative importance x activation^a, compared across the layer.

RI_ij = |W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik| (its share of its input channel plus its share of its
output row), times ||X_j||_2 ** a with a = 0.5 as in the paper.
"""

from __future__ import annotations

import torch

from ..patterns import Pattern, mask_from_scores
from ..registry import register
from ..stats import InputStats

RIA_POWER = 0.5


def ria_scores(weight: torch.Tensor, stats: InputStats, power: float = RIA_POWER) -> torch.Tensor:
    a = weight.abs()
    relative = a / a.sum(0, keepdim=True).clamp_min(1e-12) + a / a.sum(1, keepdim=True).clamp_min(1e-12)
    return relative * stats.norms.to(weight.device).unsqueeze(0) ** power


@register("ria", needs="norms", summary="relative importance x input-norm^0.5, compared across the layer")
def prune_ria(weight: torch.Tensor, stats: InputStats, sparsity: float, pattern: Pattern, recipe):
    keep = mask_from_scores(ria_scores(weight, stats), sparsity, pattern, scope="layer")
    return weight * keep, keep
