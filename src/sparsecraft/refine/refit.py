"""Refit: with the mask fixed, solve for the kept weights that minimise the layer's output error.

Each output row's kept weights w_S solve H_SS w_S = (W H)_S — least squares of the row's output on the
calibration inputs. SparseGPT's lazy OBS updates only approximate this; Wanda and magnitude do not update
at all. Solved for all rows at once by conjugate gradients on the masked (dampened) Hessian, started from
the current weights, so the error can only go down.
"""

from __future__ import annotations

import torch

from ..registry import register_refiner


def refit_weights(target: torch.Tensor, pruned: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor,
                  damp: float = 0.01, iters: int = 50, tol: float = 1e-5) -> torch.Tensor:
    """Minimise (target - What) H (target - What)^T over What supported on `keep`, row by row."""
    H = hessian.to(pruned.device, torch.float32).clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    mask = keep.to(torch.float32)
    x = pruned.to(torch.float32) * mask
    b = (target.to(torch.float32) @ H) * mask
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
    return x.to(pruned.dtype) * keep


@register_refiner("refit", needs="hessian", summary="least-squares refit of the kept weights, mask unchanged")
def refine_refit(dense, pruned, keep, stats, sparsity, pattern, recipe):
    return refit_weights(dense, pruned, keep, stats.hessian, damp=recipe.damp), keep
