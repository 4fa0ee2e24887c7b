"""Calibration statistics collected from a layer's inputs by forward hooks."""

from __future__ import annotations

import torch


class ColumnNorms:
    """Squared L2 norm of every input feature over all calibration tokens (Wanda's ||X_j||^2)."""

    def __init__(self, columns: int, device: torch.device):
        self.sq = torch.zeros(columns, dtype=torch.float64, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sq.device, torch.float32)
        self.sq += (x * x).sum(0, dtype=torch.float64)
        self.tokens += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        """||X_j||_2 per input feature, float32."""
        return self.sq.sqrt().to(torch.float32)


class Hessian:
    """H = 2 X X^T / tokens, the layer-wise reconstruction Hessian used by SparseGPT."""

    def __init__(self, columns: int, device: torch.device):
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device, torch.float32)
        self.sum.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    @property
    def matrix(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.tokens, 1))
