"""Calibration statistics of a layer's inputs, collected by forward hooks.

One collector serves every method: per-feature first and second moments always (cheap), and the
input Hessian H = 2 X X^T / tokens only when a method or refinement needs it.
"""

from __future__ import annotations

import torch


class InputStats:
    """Running statistics of the inputs X (tokens x columns) a layer sees during calibration."""

    def __init__(self, columns: int, device: torch.device, hessian: bool = False):
        self.sum = torch.zeros(columns, dtype=torch.float64, device=device)
        self.sq = torch.zeros(columns, dtype=torch.float64, device=device)
        self.xtx = torch.zeros(columns, columns, dtype=torch.float32, device=device) if hessian else None
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device, torch.float32)
        self.sum += x.sum(0, dtype=torch.float64)
        self.sq += (x * x).sum(0, dtype=torch.float64)
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)
        self.tokens += x.shape[0]

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
