"""Per-layer sparsity: uniform, or OWL (Yin et al. 2023, "Outlier Weighed Layerwise Sparsity").

OWL measures, per transformer block, the fraction of outlier weights — Wanda scores |W_ij| ||X_j|| above
M times the block's mean score — on the dense model, and prunes blocks with more outliers less: block
sparsities span [s - lambda, s + lambda] linearly in the outlier ratio. sparsecraft centres them on the
parameter-weighted mean, so the targeted weights as a whole keep exactly the requested sparsity.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .calibrate import columns, run_sequential
from .errors import ConfigError
from .models import Target, weight_matrix
from .stats import InputStats

ALLOCATIONS = ("uniform", "owl", "search")  # search: resolved by api.prune (search.py) into overrides


def uniform(targets: list[Target], sparsity: float) -> dict[str, float]:
    return {t.name: sparsity for t in targets}


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of entries above m x the mean over all of `scores` together (OWL's layerwise outlier ratio)."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    return float((flat > m * flat.mean()).sum()) / flat.numel()


def spread(ratios: dict, sizes: dict, sparsity: float, lam: float) -> dict:
    """Map outlier ratios to sparsities in [s - lam, s + lam], parameter-weighted mean exactly s."""
    keys = list(ratios)
    r = torch.tensor([ratios[k] for k in keys], dtype=torch.float64)
    n = torch.tensor([sizes[k] for k in keys], dtype=torch.float64)
    if r.max() - r.min() <= 0:
        return {k: sparsity for k in keys}
    d = (r - r.min()) / (r.max() - r.min()) * (2 * lam)
    s = sparsity - (d - (d * n).sum() / n.sum())
    if s.min() < 0 or s.max() >= 1:
        raise ConfigError(
            f"OWL with lambda={lam} would need layer sparsities in [{float(s.min()):.3f}, {float(s.max()):.3f}], "
            "outside [0, 1): lower --owl-lambda"
        )
    return {k: float(v) for k, v in zip(keys, s)}


def owl(model: nn.Module, blocks: list[nn.Module], batches: list[torch.Tensor], targets: list[Target],
        sparsity: float, lam: float, m: float, device: torch.device, progress: bool = True) -> dict[str, float]:
    """OWL layer sparsities from one calibration pass over the dense model."""
    ratios: dict[object, float] = {}
    sizes: dict[object, int] = {}

    def group(t: Target):
        return t.block if t.block is not None else t.name

    def on_block(index: int, block_targets: list[Target], stats: dict) -> None:
        by_group: dict[object, list[Target]] = {}
        for t in block_targets:
            by_group.setdefault(group(t), []).append(t)
        for key, members in by_group.items():
            scores = [weight_matrix(t.module).detach().abs().float().to(device)
                      * stats[t.name].norms.to(device).unsqueeze(0) for t in members]
            ratios[key] = outlier_ratio(scores, m)
            sizes[key] = sum(s.numel() for s in scores)

    run_sequential(model, blocks, batches, targets, lambda t: InputStats(columns(t), device), on_block, device,
                   progress, modifies=False, desc="OWL outlier ratios")
    per_group = spread(ratios, sizes, sparsity, lam)
    return {t.name: per_group[group(t)] for t in targets}


def apply_overrides(alloc: dict[str, float], overrides: dict[str, float]) -> dict[str, float]:
    """Per-layer sparsity overrides {regex: sparsity}; the last matching regex wins."""
    out = dict(alloc)
    for name in out:
        for regex, value in overrides.items():
            if re.search(regex, name):
                out[name] = float(value)
    return out
