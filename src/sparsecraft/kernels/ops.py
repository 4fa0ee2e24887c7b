"""The kernels as a PyTorch custom op, `torch.ops.sparsecraft.linear`, so that torch.compile, torch.export and
tracing see one operator with a known output shape instead of breaking the graph at an opaque C call.

SparseLinear.forward calls it while compiling; eager calls skip the dispatcher (it costs microseconds per call,
which decode cannot spare) and run the same function, `linear.matmul`, directly.
"""

from __future__ import annotations

import torch

from .linear import matmul


@torch.library.custom_op("sparsecraft::linear", mutates_args=(), device_types="cpu")
def linear_op(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, rowptr: torch.Tensor | None,
              scale: torch.Tensor | None, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """y = x Wᵀ + b with W dense (`values`, mask None) or bitmask-packed (see SparseLinear)."""
    return matmul(x, values, mask, rowptr, scale, bias, out_features)


@linear_op.register_fake
def _(x, values, mask, rowptr, scale, bias, out_features):
    return x.new_empty((*x.shape[:-1], out_features))
