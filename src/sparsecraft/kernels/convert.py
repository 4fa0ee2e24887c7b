"""Swap a model's linear layers for SparseLinear (and back)."""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from ..errors import KernelError
from ..models import is_prunable, weight_matrix
from ..moe import merge_experts, split_experts
from .linear import DTYPES, SparseLinear, check_quantize, require

DEFAULT_MIN_SPARSITY = 0.25  # below this the bitmask format reads about as many bytes as the dense weight


def release_freed_memory() -> None:
    """Give the memory of the dense weights just replaced back to the OS (glibc keeps freed heap pages otherwise,
    so a packed model would keep the dense model's footprint); a no-op where malloc_trim does not exist."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def tied_weights(model: nn.Module) -> set[int]:
    """ids of parameters also held by a module that is not a prunable layer (e.g. tied input embeddings)."""
    return {id(p) for m in model.modules() if not is_prunable(m) and not isinstance(m, SparseLinear)
            for p in m.parameters(recurse=False)}


def selected(name: str, targets: list[str] | None, ignore: list[str] | None) -> bool:
    """Whether layer `name` matches a regex of `targets` (any when None) and none of `ignore`."""
    return not ((targets and not any(re.search(t, name) for t in targets)) or
                any(re.search(i, name) for i in (ignore or [])))


def layer_format(weight: torch.Tensor, tied: bool, min_sparsity: float, bitmask: bool = True) -> str:
    """'bitmask' or 'dense': the format sparsify_model gives a layer with this [out, in] weight (`tied`: the weight
    is shared with another module, which packing would untie)."""
    with torch.no_grad():
        sparsity = 1.0 - int(torch.count_nonzero(weight)) / max(weight.numel(), 1)
    fmt = "bitmask" if bitmask and sparsity >= min_sparsity and weight.numel() else "dense"
    return "dense" if tied else fmt


def sparsify_model(model: nn.Module, min_sparsity: float = DEFAULT_MIN_SPARSITY, *, dense: bool = True,
                   bitmask: bool = True, targets: list[str] | None = None, ignore: list[str] | None = None,
                   quantize: str | None = None, quantize_dense: bool = False) -> dict[str, str]:
    """Replace, in place, every nn.Linear / Conv1D with at least `min_sparsity` zeros by a bitmask SparseLinear.

    With `dense` (default) the other linear layers (lm_head, layers left dense) run on the kernels' dense path
    too, sharing their Parameters (tied weights stay tied); `bitmask=False` puts every layer on the dense path
    (to time the same kernels without sparsity). `targets` / `ignore` are regexes on layer names.
    `quantize="int8"` stores the bitmask layers' values as int8 with a float32 scale per output row
    (sparsecraft.quantize; the dense-path layers keep their weights, unless `quantize_dense`: then they are int8
    too, as bitmask layers of every nonzero, 1.125 bytes per weight against 2 for bf16, so that lm_head is int8 as
    in llama.cpp's Q8_0; a tied lm_head gets its own int8 copy, the embedding keeps the shared weight).
    Layers on another device or in another dtype
    than float32/bfloat16/float16 are left alone. Fused mixture-of-experts tensors are split into one layer per
    expert first (moe.py; `densify_model` merges them back). Returns {layer name: 'bitmask' | 'dense' |
    'skipped: why'}.
    """
    require()
    if not 0.0 <= min_sparsity <= 1.0:
        raise KernelError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    check_quantize(quantize)
    split_experts(model)
    tied = tied_weights(model)
    done: dict[int, nn.Module] = {}
    report: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not is_prunable(module) or isinstance(module, SparseLinear) or not selected(name, targets, ignore):
            continue
        if id(module) in done:  # the same module object reached twice
            _set_child(model, name, done[id(module)])
            continue
        weight = weight_matrix(module)
        if weight.device.type != "cpu" or weight.dtype not in DTYPES:
            report[name] = f"skipped: {weight.dtype} on {weight.device}"
            continue
        fmt = layer_format(weight, id(module.weight) in tied, min_sparsity, bitmask)
        if fmt == "dense" and not dense:
            continue
        if fmt == "dense" and quantize and quantize_dense:
            fmt = "bitmask"
        layer = SparseLinear.from_module(module, fmt, quantize=quantize if fmt == "bitmask" else None)
        done[id(module)] = layer
        _set_child(model, name, layer)
        report[name] = fmt
    release_freed_memory()
    return report


def sparsify_compressed(model: nn.Module, path) -> dict[str, str]:
    """Replace, in place, each nn.Linear of `model` that the compressed-tensors directory `path` stores with int8
    values (`sparsecraft export --dtype int8`) by an int8 bitmask SparseLinear built from the stored bitmask, int8
    values and scales, bit for bit (no float round trip); the bias and the activations' dtype come from the
    model's layer. Returns {layer name: 'bitmask'}; sparsify_model can convert the other layers after it."""
    from ..compressed import read_compressed_layers

    require()
    tied = tied_weights(model)
    report: dict[str, str] = {}
    for name, stored in read_compressed_layers(path).items():
        module = model.get_submodule(name) if stored.scale is not None else None
        if not isinstance(module, nn.Linear) or id(module.weight) in tied or module.weight.device.type != "cpu" \
                or module.weight.dtype not in DTYPES:
            continue  # float values (sparsify_model packs them), or not a layer the kernels run here
        layer = SparseLinear.from_compressed(stored.shape, stored.bitmask, stored.values, stored.row_offsets,
                                             scale=stored.scale, bias=module.bias, dtype=module.weight.dtype)
        _set_child(model, name, layer)
        report[name] = "bitmask"
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
