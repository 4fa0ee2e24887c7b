"""Calibration statistics of a layer's inputs, collected by forward hooks.

One collector serves every method: per-feature first and second moments always (cheap), the input
Hessian H = 2 X^T X / tokens only when a method or refinement needs it, and, when the dense model's inputs
X_dense are streamed alongside, the cross term X_dense^T X used to aim at the dense model's outputs.
"""

from __future__ import annotations

import torch


class InputStats:
    """Running statistics of the inputs X (tokens x columns) a layer sees during calibration."""

    def __init__(self, columns: int, device: torch.device, hessian: bool = False, cross: bool = False):
        self.sum = torch.zeros(columns, dtype=torch.float64, device=device)
        self.sq = torch.zeros(columns, dtype=torch.float64, device=device)
        self.xtx = torch.zeros(columns, columns, dtype=torch.float32, device=device) if hessian or cross else None
        self.dtx = torch.zeros(columns, columns, dtype=torch.float32, device=device) if cross else None
        self.cross_tokens = 0
        self.tokens = 0

    def add_batch(self, x: torch.Tensor, dense: torch.Tensor | None = None) -> None:
        """Add the inputs `x` of one batch; `dense`: the same positions' inputs in the dense model."""
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device, torch.float32)
        self.sum += x.sum(0, dtype=torch.float64)
        self.sq += (x * x).sum(0, dtype=torch.float64)
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)
        if self.dtx is not None and dense is not None:
            self.dtx.addmm_(dense.reshape(-1, dense.shape[-1]).to(x.device, torch.float32).t(), x)
            self.cross_tokens += x.shape[0]
        self.tokens += x.shape[0]

    @property
    def has_cross(self) -> bool:
        """True when every batch came with its dense-model inputs."""
        return self.dtx is not None and self.cross_tokens == self.tokens > 0

    def dense_target(self, weight: torch.Tensor, damp: float) -> torch.Tensor:
        """W' = argmin_V ||W X_dense - V X||^2 (+ ridge damp * mean diag): the weight that, fed the pruned
        model's inputs X, best reproduces the dense model's outputs. Pruning W' towards X then minimises
        the error against the dense outputs, correcting what earlier blocks' pruning changed."""
        H = self.xtx.double()
        H = H + damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        rhs = weight.double().to(H.device) @ self.dtx.double()  # W X_dense^T X
        return torch.linalg.solve(H, rhs.t()).t().to(weight.dtype)

    @property
    def norms(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens, per input feature (Wanda's activation norm)."""
        return self.sq.sqrt().to(torch.float32)

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.tokens, 1)).to(torch.float32)

    @property
    def var(self) -> torch.Tensor:
        mean = self.sum / max(self.tokens, 1)
        return (self.sq / max(self.tokens, 1) - mean * mean).clamp_min(0).to(torch.float32)

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / tokens, the Hessian of the layer-wise squared reconstruction error."""
        if self.xtx is None:
            raise RuntimeError("these statistics were collected without the Hessian")
        return self.xtx * (2.0 / max(self.tokens, 1))


def reconstruction_error(dense: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row (W - What) H (W - What)^T: the layer's squared output error on the calibration inputs."""
    delta = (dense - pruned).double()
    return ((delta @ hessian.double()) * delta).sum(1)
