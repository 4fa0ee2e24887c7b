"""DSnoT (Zhang et al. 2023, "Dynamic Sparse No Training"), guarded by the exact reconstruction error.

DSnoT refines a mask by swapping, in each output row, one pruned weight (regrown) for one kept weight
(pruned), so the row's count (or the N:M group) is unchanged. As in the paper, the regrown weight is the one
that best cancels the row's expected output shift e = sum_j (W_j - What_j) E[x_j], scaled by 1 / Var[x_j]; the
pruned one is the kept weight of lowest Wanda score |W_j| ||x_j|| whose removal moves e towards zero (for N:M:
the lowest in the regrown weight's group). sparsecraft adds one guard: a swap is applied only if it lowers the
row's true reconstruction error (W - What) H (W - What)^T, computed exactly from the Hessian, so refinement can
never make a layer worse. A row stops when |e| <= threshold, when its best swap would not help, or after
`cycles` swaps.
"""

from __future__ import annotations

import torch

from ..patterns import Pattern
from ..registry import register_refiner
from ..stats import InputStats


def dsnot_refine(dense: torch.Tensor, pruned: torch.Tensor, keep: torch.Tensor, stats: InputStats,
                 pattern: Pattern, cycles: int = 50, threshold: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    W0 = dense.double()
    W = pruned.double().clone()
    keep = keep.clone()
    H = stats.hessian.to(W.device).double()
    mu = stats.mean.to(W.device).double()
    var = stats.var.to(W.device).double().clamp_min(1e-12)
    norms = stats.norms.to(W.device).double()
    rows, cols = W.shape
    arange = torch.arange(rows, device=W.device)
    delta = W0 - W
    G = delta @ H  # gradient of the row errors (up to a factor 2)
    shift = delta @ mu  # expected output shift per row
    grow_score = W0 * mu / var  # what regrowing a weight removes from the shift, variance-scaled
    active = torch.ones(rows, dtype=torch.bool, device=W.device)
    inf = torch.tensor(float("inf"), dtype=W.dtype, device=W.device)
    for _ in range(cycles):
        active &= shift.abs() > threshold
        if not active.any():
            break
        sign = torch.sign(shift).unsqueeze(1)
        wanda = W.abs() * norms
        # regrow: the pruned weight whose (scaled) contribution best cancels the shift
        candidates = torch.where(keep, -inf, grow_score * sign)
        g = candidates.argmax(1)
        has_grow = torch.isfinite(candidates[arange, g]) & (candidates[arange, g] > 0)
        # prune: the kept weight of lowest Wanda score that moves the shift towards zero
        if pattern.is_nm:
            start = (g // pattern.m) * pattern.m
            group = start.unsqueeze(1) + torch.arange(pattern.m, device=W.device)
            in_group = torch.where(keep.gather(1, group), wanda.gather(1, group), inf)
            p = group.gather(1, in_group.argmin(1, keepdim=True)).squeeze(1)
        else:
            helps = (W * mu.unsqueeze(0)) * sign < 0
            pool = torch.where(keep & helps, wanda, inf)
            fallback = torch.where(keep, wanda, inf)
            p = torch.where(torch.isfinite(pool.min(1).values), pool.argmin(1), fallback.argmin(1))
        d_p = -W[arange, p]  # pruned weight goes to zero
        # What_new = What + d (d_g at g, d_p at p) changes the row error by -2 d.G + d H d^T; the regrown weight
        # takes the value that minimises it (an OBS step), which is its dense value when nothing compensated yet
        h_gg = H[g, g]
        d_g = torch.where(h_gg > 0, (G[arange, g] - d_p * H[g, p]) / h_gg.clamp_min(1e-30), torch.zeros_like(d_p))
        change = (-2 * (d_g * G[arange, g] + d_p * G[arange, p])
                  + d_g**2 * h_gg + d_p**2 * H[p, p] + 2 * d_g * d_p * H[g, p])
        ok = active & has_grow & (g != p) & (change < 0)
        active &= ok
        if not ok.any():
            break
        r, g, p, d_g, d_p = arange[ok], g[ok], p[ok], d_g[ok], d_p[ok]
        W[r, g] += d_g
        W[r, p] += d_p
        keep[r, g] = True
        keep[r, p] = False
        G[r] -= d_g.unsqueeze(1) * H[g] + d_p.unsqueeze(1) * H[p]
        shift[r] -= d_g * mu[g] + d_p * mu[p]
    return W.to(pruned.dtype), keep


@register_refiner("dsnot", needs="hessian", summary="prune-and-grow swaps per row that lower the output error")
def refine_dsnot(dense, pruned, keep, stats, sparsity, pattern, recipe):
    return dsnot_refine(dense, pruned, keep, stats, pattern, recipe.dsnot_cycles, recipe.dsnot_threshold)
