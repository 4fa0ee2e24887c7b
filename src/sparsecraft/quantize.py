"""Symmetric int8 weights with one float32 scale per output row, for pruned layers.

A row r of a weight W [N, K] is stored as q_r = clamp(round(W_r / s_r), -127, 127) (int8, round to nearest, ties to
even) with s_r = max_k |W_rk| / 127 (float32; 1 for a row of zeros), and read back as q_r * s_r. The sparse kernels
(`SparseLinear(..., quantize="int8")`) keep the pruning mask unchanged: a kept weight that rounds to q = 0 stays in
the mask as a stored zero, so the int8 layer's mask equals the float layer's bit for bit.

`fake_quantize_int8(model)` rounds a model's pruned layers to their int8 grid in place (weights become q * s in the
model's dtype), so that the ordinary `sparsecraft.evaluate` measures the int8 model's perplexity. The weights that
round to zero become zeros of the dense weight there (a dense tensor has no other way to hold them).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .errors import ConfigError

QMAX = 127


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scale float32 [N]) of a 2-D weight [N, K]: symmetric, one scale per row (see the module
    docstring). Computed in float32 on the weight's device."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ConfigError(f"int8 quantization takes a 2-D floating-point weight [out, in], got shape "
                          f"{tuple(weight.shape)} {weight.dtype}")
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ConfigError("int8 quantization needs finite weights, but this one holds NaN or inf values")
    scale = w.abs().amax(dim=1) / QMAX if w.shape[1] else torch.zeros(w.shape[0], device=w.device)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a row of zeros (or of values below 2^-142)
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale (per row, computed in float32) in `dtype`: the weight an int8 layer stands for."""
    return (q.float() * scale.reshape(-1, 1).float()).to(dtype)


def fake_quantize_int8(model: nn.Module, targets: list[str] | None = None, *, ignore: list[str] | None = None,
                       min_sparsity: float | None = None) -> dict[str, torch.Tensor]:
    """Round, in place, every layer that `sparsecraft.kernels.sparsify_model(model, quantize="int8")` would store as
    int8 to its int8 grid: nn.Linear / Conv1D layers (fused mixture-of-experts tensors too) with at least
    `min_sparsity` zeros (default: sparsify_model's), not tied to another module, matching a regex of `targets` and
    none of `ignore`. Each weight becomes dequantize_int8(*quantize_int8(W)) in its own dtype, per output row (the
    rows of W as the layer multiplies, [out, in], also for Conv1D). Works on any device. Returns {layer name: row
    scales}."""
    from .kernels.convert import DEFAULT_MIN_SPARSITY, layer_format, selected, tied_weights
    from .models import is_prunable, weight_matrix
    from .moe import experts_split

    min_sparsity = DEFAULT_MIN_SPARSITY if min_sparsity is None else min_sparsity
    if not 0.0 <= min_sparsity <= 1.0:
        raise ConfigError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    for pattern in (targets or []) + (ignore or []):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"layer pattern {pattern!r} is not a regular expression ({exc})") from None
    scales: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    with experts_split(model), torch.no_grad():
        tied = tied_weights(model)
        for name, module in model.named_modules():
            if not is_prunable(module) or id(module) in seen or not selected(name, targets, ignore):
                continue
            seen.add(id(module))
            weight = weight_matrix(module)
            if not weight.is_floating_point() or \
                    layer_format(weight, id(module.weight) in tied, min_sparsity) != "bitmask":
                continue
            q, scale = quantize_int8(weight)
            weight.copy_(dequantize_int8(q, scale, weight.dtype))
            scales[name] = scale
    return scales
