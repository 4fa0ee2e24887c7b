"""CPU sparse kernels: SparseLinear (bitmask + packed values in the model's dtype or int8 with per-row scales; AVX-512,
AVX2 or portable C) and model conversion.

`sparsify_model(model)` swaps sparse nn.Linear / Conv1D layers for SparseLinear in place, `densify_model(model)`
swaps them back. For 2:4 models on CUDA, `sparsify_semi_structured(model)` uses torch's semi-structured sparse
tensors instead. The C extension is built by `pip install` when a C compiler is present; `available()` says whether
it was, and using SparseLinear without it raises a KernelError saying how to build it.
"""

from .convert import (
    DEFAULT_MIN_SPARSITY,
    densify_model,
    has_kernels,
    kernel_layers,
    sparsify_compressed,
    sparsify_if_available,
    sparsify_model,
)
from .linear import (
    SparseLinear,
    available,
    get_path,
    info,
    pack_bitmask,
    pack_compressed,
    pack_int8,
    set_path,
    unpack_bitmask,
    use_path,
)
from .semistructured import SemiStructuredLinear, semi_structured_available, sparsify_semi_structured

__all__ = [
    "DEFAULT_MIN_SPARSITY",
    "SemiStructuredLinear",
    "SparseLinear",
    "available",
    "densify_model",
    "get_path",
    "has_kernels",
    "info",
    "kernel_layers",
    "pack_bitmask",
    "pack_compressed",
    "pack_int8",
    "semi_structured_available",
    "set_path",
    "sparsify_compressed",
    "sparsify_if_available",
    "sparsify_model",
    "sparsify_semi_structured",
    "unpack_bitmask",
    "use_path",
]
