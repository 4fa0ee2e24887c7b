"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

import torch

from ..patterns import Pattern, mask_from_scores
from ..registry import register
from ..stats import InputStats


def wanda_scores(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    return weight.abs() * stats.norms.to(weight.device).unsqueeze(0)


@register("wanda", needs="norms", summary="|W| x input-column norm, compared per output row")
def prune_wanda(weight: torch.Tensor, stats: InputStats, sparsity: float, pattern: Pattern, recipe):
    keep = mask_from_scores(wanda_scores(weight, stats), sparsity, pattern, scope="row")
    return weight * keep, keep
