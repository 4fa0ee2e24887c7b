"""Swap a model's linear layers for SparseLinear (and back)."""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from ..errors import KernelError
from ..models import is_prunable, weight_matrix
from ..moe import merge_experts, split_experts
from .linear import DTYPES, SparseLinear, require

DEFAULT_MIN_SPARSITY = 0.25  # below this the bitmask format reads about as many bytes as the dense weight


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _tied_weights(model: nn.Module) -> set[int]:
    """ids of parameters also held by a module that is not a prunable layer (e.g. tied input embeddings)."""
    return {id(p) for m in model.modules() if not is_prunable(m) and not isinstance(m, SparseLinear)
            for p in m.parameters(recurse=False)}


def sparsify_model(model: nn.Module, min_sparsity: float = DEFAULT_MIN_SPARSITY, *, dense: bool = True,
                   bitmask: bool = True, targets: list[str] | None = None, ignore: list[str] | None = None
                   ) -> dict[str, str]:
    """Replace, in place, every nn.Linear / Conv1D with at least `min_sparsity` zeros by a bitmask SparseLinear.

    With `dense` (default) the other linear layers (lm_head, layers left dense) run on the kernels' dense path
    too, sharing their Parameters (tied weights stay tied); `bitmask=False` puts every layer on the dense path
    (to time the same kernels without sparsity). `targets` / `ignore` are regexes on layer names.
    Layers on another device or in another dtype than float32/bfloat16/float16 are left alone. Fused
    mixture-of-experts tensors are split into one layer per expert first (moe.py; `densify_model` merges them
    back). Returns {layer name: 'bitmask' | 'dense' | 'skipped: why'}.
    """
    require()
    if not 0.0 <= min_sparsity <= 1.0:
        raise KernelError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    split_experts(model)
    tied = _tied_weights(model)
    done: dict[int, nn.Module] = {}
    report: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not is_prunable(module) or isinstance(module, SparseLinear):
            continue
        if (targets and not any(re.search(t, name) for t in targets)) or \
                any(re.search(i, name) for i in (ignore or [])):
            continue
        if id(module) in done:  # the same module object reached twice
            _set_child(model, name, done[id(module)])
            continue
        weight = weight_matrix(module)
        if weight.device.type != "cpu" or weight.dtype not in DTYPES:
            report[name] = f"skipped: {weight.dtype} on {weight.device}"
            continue
        with torch.no_grad():
            sparsity = 1.0 - int(torch.count_nonzero(weight)) / max(weight.numel(), 1)
        fmt = "bitmask" if bitmask and sparsity >= min_sparsity and weight.numel() else "dense"
        if fmt == "bitmask" and id(module.weight) in tied:
            fmt = "dense"  # packing would copy the weight and untie it
        if fmt == "dense" and not dense:
            continue
        layer = SparseLinear.from_module(module, fmt)
        done[id(module)] = layer
        _set_child(model, name, layer)
        report[name] = fmt
    return report


def densify_model(model: nn.Module) -> int:
    """Replace every SparseLinear (and SemiStructuredLinear) in `model` by the equivalent nn.Linear / Conv1D, in
    place; returns how many."""
    from .semistructured import SemiStructuredLinear

    done: dict[int, nn.Module] = {}
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, (SparseLinear, SemiStructuredLinear)):
            if id(module) not in done:
                done[id(module)] = module.to_module()
                count += 1
            _set_child(model, name, done[id(module)])
    merge_experts(model)
    return count


def kernel_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """The SparseLinear layers of a model, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def has_kernels(model: nn.Module) -> bool:
    return any(isinstance(m, SparseLinear) for m in model.modules())


def sparsify_if_available(model: nn.Module, **kwargs) -> dict[str, str] | None:
    """sparsify_model when the kernels are built; otherwise warn once and leave the model dense."""
    from .linear import available, info

    if not available():
        warnings.warn(f"sparsecraft's CPU kernels are not built ({info()['error']}); the model runs dense. Install "
                      "a C compiler (e.g. `apt-get install build-essential`) and reinstall sparsecraft to use them.",
                      stacklevel=2)
        return None
    return sparsify_model(model, **kwargs)
