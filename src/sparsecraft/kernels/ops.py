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


@torch.library.custom_op("sparsecraft::colskip_linear", mutates_args=(), device_types="cpu")
def colskip_op(x: torch.Tensor, weight_t: torch.Tensor, threshold: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """y = (x with |x| < threshold zeroed) W + b, W given transposed (see colskip.ColumnSkipLinear)."""
    from .colskip import colskip_matmul

    return colskip_matmul(x, weight_t, threshold, bias)


@colskip_op.register_fake
def _(x, weight_t, threshold, bias):
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))
