"""Refit: with the mask fixed, solve for the kept weights that minimise the layer's output error.

Each output row's kept weights w_S solve H_SS w_S = (W H)_S — least squares of the row's output on the
calibration inputs. SparseGPT's lazy OBS updates only approximate this; Wanda and magnitude do not update
at all. Solved for all rows at once by conjugate gradients on the masked (dampened) Hessian, started from
the current weights.

Fitting the calibration inputs' second moments exactly also fits their domain (issue 14): the refit that lowers
in-domain perplexity most can raise it on other text. Three knobs make the fit more conservative, each off (0, or
50 iterations) by default so that the plain refit is bit for bit what it always was:

* ``shrink`` a in [0, 1]: the Hessian's off-diagonal part is scaled by 1 - a (shrinkage towards its diagonal,
  Ledoit-Wolf style): correlations between input channels the calibration text shows are trusted less;
* ``ridge`` l >= 0: adds l * mean(diag H) * ||w - w0||^2 to each row's objective, pulling the refit towards the
  one-shot weights w0 it starts from (l -> inf: no refit at all);
* ``iters``: conjugate-gradient steps (early stopping fits the dominant directions of H first);
* ``damp`` (the recipe's, or ``refit_damp``): the usual diagonal loading, here a pull towards the dense weights.

Whatever the settings, a row whose refit would raise its calibration-set error (W - What) H (W - What)^T (the
undampened, unshrunk H) above the one-shot weights' keeps the one-shot row, so refit never makes a layer worse on
its calibration data.
"""

from __future__ import annotations

import torch

from ..registry import register_refiner


def row_errors(target: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """(target - weight) H (target - weight)^T for each row (float32)."""
    delta = target - weight
    return ((delta @ hessian) * delta).sum(1)


def refit_weights(target: torch.Tensor, pruned: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor,
                  damp: float = 0.01, iters: int = 50, tol: float = 1e-5, ridge: float = 0.0,
                  shrink: float = 0.0) -> torch.Tensor:
    """Minimise (target - What) H (target - What)^T [+ ridge * mean(diag H) * ||What - pruned||^2] over What
    supported on `keep`, row by row, with H's off-diagonal part scaled by 1 - shrink; never above `pruned`'s
    error on the undampened H."""
    H0 = hessian.to(pruned.device, torch.float32)
    H = H0.clone()
    if shrink:
        diagonal = H.diagonal().clone()
        H.mul_(1.0 - shrink)
        H.diagonal().copy_(diagonal)
    scale = H.diagonal().mean()
    H.diagonal().add_(damp * scale)
    mask = keep.to(torch.float32)
    start = pruned.to(torch.float32) * mask
    x = start.clone()
    b = (target.to(torch.float32) @ H) * mask
    if ridge:  # (H + l m I) w = W H + l m w0 on the support
        H.diagonal().add_(ridge * scale)
        b += (ridge * scale) * start
    r = b - (x @ H) * mask
    p = r.clone()
    rs = (r * r).sum(1)
    stop = (tol * b.norm(dim=1)) ** 2
    for _ in range(iters):
        if (rs <= stop).all():
            break
        Ap = (p @ H) * mask
        pAp = (p * Ap).sum(1)
        alpha = torch.where(pAp > 0, rs / pAp.clamp_min(1e-30), torch.zeros_like(rs))
        x += alpha.unsqueeze(1) * p
        r -= alpha.unsqueeze(1) * Ap
        rs_new = (r * r).sum(1)
        p = r + (rs_new / rs.clamp_min(1e-30)).unsqueeze(1) * p
        rs = rs_new
    dense = target.to(torch.float32)
    worse = row_errors(dense, x, H0) > row_errors(dense, start, H0)
    if worse.any():
        x[worse] = start[worse]
    return x.to(pruned.dtype) * keep


@register_refiner("refit", needs="hessian", summary="least-squares refit of the kept weights, mask unchanged")
def refine_refit(dense, pruned, keep, stats, sparsity, pattern, recipe):
    damp = recipe.damp if recipe.refit_damp is None else recipe.refit_damp
    return refit_weights(dense, pruned, keep, stats.hessian, damp=damp, iters=recipe.refit_iters,
                         ridge=recipe.refit_ridge, shrink=recipe.refit_shrink), keep
