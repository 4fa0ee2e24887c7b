"""2:4 layers on NVIDIA GPUs: torch's semi-structured sparse tensors (cuSPARSELt / CUTLASS, compute capability
>= 8.0). Opt-in and only where CUDA is present; the CPU kernels are in linear.py."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import KernelError
from ..models import is_prunable, weight_matrix


def semi_structured_available(device: torch.device | str | None = None) -> bool:
    """Whether torch can run 2:4 semi-structured sparse matmuls here (a CUDA GPU of compute capability >= 8.0)."""
    if not torch.cuda.is_available() or not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 0)


def is_2_4(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive inputs of every row."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def _subclass():
    """cuSPARSELt when this torch build has it (and CUTLASS is not forced), else CUTLASS."""
    from torch.sparse import SparseSemiStructuredTensor

    cusparselt = getattr(torch.backends, "cusparselt", None)
    if SparseSemiStructuredTensor._FORCE_CUTLASS or cusparselt is None or not cusparselt.is_available():
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def unsupported_reason(weight: torch.Tensor) -> str | None:
    """Why `weight` cannot become a semi-structured sparse tensor, or None."""
    if weight.device.type != "cuda":
        return f"on {weight.device}, not CUDA"
    limits = getattr(_subclass(), "_DTYPE_SHAPE_CONSTRAINTS", {})
    if weight.dtype not in limits:
        return f"dtype {weight.dtype} not supported (use float16 or bfloat16)"
    rows, cols = limits[weight.dtype].sparse_min_rows, limits[weight.dtype].sparse_min_cols
    if weight.shape[0] % rows or weight.shape[1] % cols:
        return f"shape {tuple(weight.shape)} is not a multiple of ({rows}, {cols})"
    if not is_2_4(weight):
        return "not 2:4 sparse"
    return None


class SemiStructuredLinear(nn.Module):
    """nn.Linear whose 2:4 weight is a torch semi-structured sparse tensor (CUDA only; inference)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        reason = unsupported_reason(weight)
        if reason:
            raise KernelError(f"cannot use a semi-structured sparse weight: {reason}")
        self.out_features, self.in_features = weight.shape
        self.source = "linear"
        # what torch.sparse.to_sparse_semi_structured does, with the backend this build actually has
        self.weight = nn.Parameter(_subclass().from_dense(weight.detach().contiguous()), requires_grad=False)
        self.bias = bias

    @classmethod
    def from_module(cls, module: nn.Module) -> SemiStructuredLinear:
        if isinstance(module, nn.Linear):
            return cls(module.weight, module.bias)
        layer = cls(weight_matrix(module).contiguous(), module.bias)
        layer.source = "conv1d"
        return layer

    def dense_weight(self) -> torch.Tensor:
        return self.weight.to_dense()

    def to_module(self) -> nn.Module:
        weight = nn.Parameter(self.dense_weight().detach().clone())
        if self.source == "conv1d":
            from ..models import PRUNABLE_TYPES

            conv1d = next(t for t in PRUNABLE_TYPES if t is not nn.Linear)
            module = conv1d(self.out_features, self.in_features).to(weight.device, weight.dtype)
            module.weight = nn.Parameter(weight.data.t().contiguous())
        else:
            module = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
            module.weight = weight
        module.bias = self.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4 semi-structured"


def sparsify_semi_structured(model: nn.Module, *, targets: list[str] | None = None,
                             ignore: list[str] | None = None) -> dict[str, str]:
    """Replace, in place, every 2:4 nn.Linear / Conv1D on a CUDA device by a SemiStructuredLinear.

    Layers that are not 2:4, not float16/bfloat16 or not of a supported shape stay as they are. Returns
    {layer name: 'semi-structured' | 'skipped: why'}. Raises KernelError when no capable GPU is present.
    """
    if not semi_structured_available():
        raise KernelError("2:4 semi-structured sparse kernels need a CUDA GPU of compute capability >= 8.0 and a "
                          "CUDA build of torch; on the CPU use sparsecraft.kernels.sparsify_model instead")
    from .convert import _set_child

    report: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if not is_prunable(module):
            continue
        if (targets and not any(re.search(t, name) for t in targets)) or \
                any(re.search(i, name) for i in (ignore or [])):
            continue
        reason = unsupported_reason(weight_matrix(module))
        if reason:
            report[name] = f"skipped: {reason}"
            continue
        _set_child(model, name, SemiStructuredLinear.from_module(module))
        report[name] = "semi-structured"
    return report
