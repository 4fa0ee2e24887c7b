"""SparseGPT (Frantar & Alistarh 2023): blocked OBS updates with a Cholesky-factored inverse Hessian.

Follows the reference `fasterprune`: H = 2XX^T, dampening `damp * mean(diag H)`, upper Cholesky factor
of H^-1, column blocks of `blocksize`; unstructured masks are chosen once per column block (exactly
`sparsity` of the block's weights, by w^2 / [H^-1]_jj^2), N:M masks once per group of M columns.
"""

from __future__ import annotations

import torch

from ..errors import SparsecraftError
from ..patterns import Pattern, check_columns, keep_lowest_pruned, prune_count
from ..registry import register
from ..stats import InputStats


def inverse_hessian_cholesky(hessian: torch.Tensor, weight: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*mean(diag H) I)^-1; zeroes weights of dead inputs in place."""
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    weight[:, dead] = 0
    diag = torch.arange(H.shape[0], device=H.device)
    H[diag, diag] += damp * torch.mean(torch.diag(H))
    try:
        L = torch.linalg.cholesky(H)
        H = torch.cholesky_inverse(L)
        return torch.linalg.cholesky(H, upper=True)
    except torch.linalg.LinAlgError:
        raise SparsecraftError(
            "SparseGPT's Hessian is not positive definite even after dampening: "
            "raise --damp (e.g. 0.1) or use more calibration samples"
        ) from None


def sparsegpt_prune(
    weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Pattern,
    blocksize: int = 128, damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    W = weight.clone().to(torch.float32)
    columns = W.shape[1]
    Hinv = inverse_hessian_cholesky(hessian.to(W.device, torch.float32), W, damp)
    keep = torch.ones_like(W, dtype=torch.bool)
    check_columns(columns, pattern)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if pattern.is_nm:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        else:
            scores = (W1**2 / d.unsqueeze(0) ** 2).reshape(1, -1)
            keep1 = keep_lowest_pruned(scores, prune_count(scores.shape[1], sparsity)).reshape(W1.shape)
        for i in range(count):
            w = W1[:, i]
            if pattern.is_nm and (i1 + i) % pattern.m == 0:
                scores = W1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m].unsqueeze(0) ** 2
                keep1[:, i : i + pattern.m] = keep_lowest_pruned(scores, pattern.m - pattern.n)
            q = w * keep1[:, i]
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = keep1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, keep


@register("sparsegpt", needs="hessian", summary="OBS weight reconstruction from the input Hessian")
def prune_sparsegpt(weight: torch.Tensor, stats: InputStats, sparsity: float, pattern: Pattern, recipe):
    if pattern.is_nm and recipe.blocksize % pattern.m:
        raise SparsecraftError(
            f"blocksize {recipe.blocksize} must be a multiple of M={pattern.m} for pattern {pattern}"
        )
    return sparsegpt_prune(weight, stats.hessian, sparsity, pattern, recipe.blocksize, recipe.damp)
