"""Activation-sparse linear layers on the column-skipping kernel (issue 15 part 4).

`ColumnSkipLinear` holds W transposed (`weight_t` [in, out]) and a threshold (a scalar or one per input feature,
the tensor `sparsecraft.activation` installs): y = W (x masked) + b, x_k zeroed where |x_k| < t_k — the comparison
the activation hooks make, fused into the GEMV. For one token (decode) the C kernel reads only the rows of W^T whose
feature is kept, so the bytes read follow the activation sparsity; batches (prefill) mask x and run one dense
matmul. `apply_column_skip(model)` swaps every nn.Linear whose input carries an installed threshold for one and
removes the hook it replaces; output sites (an activation function's output) keep their hooks.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import KernelError
from . import linear as _lin

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def effective_threshold(threshold: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float32 threshold the kernel compares |x| (as float32) with, so that the result equals torch's
    `x.abs() < threshold` for x of `dtype`: a 0-d threshold is rounded to x's dtype first (type promotion keeps a
    dimensioned tensor's dtype), a per-feature one promotes both; every value involved is exact in float32."""
    common = torch.result_type(torch.empty(1, dtype=dtype), threshold)
    return threshold.detach().to(common).to(torch.float32).reshape(-1).contiguous()


def colskip_matmul(x: torch.Tensor, weight_t: torch.Tensor, threshold: torch.Tensor, bias: torch.Tensor | None,
                   counter: list | None = None) -> torch.Tensor:
    """y = (x masked by `threshold`, a float32 tensor of 1 or in_features values from effective_threshold) Wᵀ + b
    with W given transposed. One row of x runs the column-skipping kernel (its kept-feature count is appended to
    `counter`); more rows mask x and run one matmul."""
    k, n = weight_t.shape
    if x.shape[-1] != k:
        raise KernelError(f"ColumnSkipLinear expects inputs [..., {k}], got {tuple(x.shape)}")
    rows = x.numel() // k if k else 0
    if rows != 1 or k == 0 or n == 0 or x.dtype not in _DTYPES or weight_t.dtype not in _DTYPES or \
            (weight_t.dtype != x.dtype and x.dtype != torch.float32) or not x.is_cpu or not _lin.available():
        xm = x.masked_fill(x.abs() < threshold.view(-1) if threshold.numel() > 1 else x.abs() < threshold[0], 0)
        if x.dtype == torch.float32 or not x.dtype.is_floating_point:
            y = torch.matmul(xm, weight_t.to(x.dtype))
            return y + bias if bias is not None else y
        # 16-bit: float32 sums, one rounding at the end (as the kernel)
        y = torch.matmul(xm.float(), weight_t.float())
        return (y + bias.float() if bias is not None else y).to(x.dtype)
    ext = _lin.require()
    path = _lin._path_code()
    x = x.contiguous()
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype)
    kept = ext.colskip(_DTYPES[x.dtype], _DTYPES[weight_t.dtype], path, torch.get_num_threads(), n, k, x.data_ptr(),
                       weight_t.data_ptr(), weight_t.stride(0), threshold.data_ptr(), threshold.numel(),
                       bias.data_ptr() if bias is not None else 0, y.data_ptr())
    if counter is not None:
        counter.append(kept)
    return y


class ColumnSkipLinear(nn.Module):
    """A linear layer whose input is thresholded (TEAL-style activation sparsity), computed by reading only the
    weight rows (of Wᵀ) of the features a token keeps. `kept` holds the kept-feature counts of the decode calls
    since the last `reset_counts()` (for the skipped-bytes report)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, threshold: torch.Tensor,
                 policy: str = "all"):
        super().__init__()
        if policy not in ("all", "decode"):
            raise KernelError(f"policy must be 'all' or 'decode', got {policy!r}")
        self.policy = policy  # 'decode': multi-token inputs (prefill) are not thresholded, as the hooks do
        if weight.dim() != 2:
            raise KernelError(f"ColumnSkipLinear takes a 2-D weight [out, in], got {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        threshold = torch.as_tensor(threshold).detach()
        if threshold.numel() not in (1, in_features) or threshold.dim() > 1:
            raise KernelError(f"threshold has shape {tuple(threshold.shape)}: give a scalar or one value per input "
                              f"feature ({in_features})")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_t", weight.detach().t().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("threshold", threshold.clone())
        self._eff = self._effective_all()
        self.kept: list[int] = []

    @classmethod
    def from_linear(cls, module: nn.Linear, threshold: torch.Tensor) -> ColumnSkipLinear:
        return cls(module.weight, module.bias, threshold)

    def set_threshold(self, threshold: torch.Tensor) -> None:
        threshold = torch.as_tensor(threshold).detach()
        if threshold.numel() not in (1, self.in_features) or threshold.dim() > 1:
            raise KernelError(f"threshold has shape {tuple(threshold.shape)}: give a scalar or one value per input "
                              f"feature ({self.in_features})")
        self.threshold = threshold.clone().to(self.weight_t.device)
        self._eff = self._effective_all()

    def reset_counts(self) -> None:
        self.kept = []

    def _effective_all(self) -> dict[torch.dtype, torch.Tensor]:
        # computed eagerly (torch.compile cannot trace torch.result_type)
        return {dt: effective_threshold(self.threshold, dt) for dt in _DTYPES}

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._eff = self._effective_all()
        return out

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._eff = self._effective_all()

    def effective(self, dtype: torch.dtype) -> torch.Tensor:
        t = self._eff.get(dtype)
        return t if t is not None else effective_threshold(self.threshold, dtype)

    def dense_weight(self) -> torch.Tensor:
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.policy == "decode" and x.dim() >= 2 and x.shape[-2] != 1:  # ThresholdMask's prefill rule
            return nn.functional.linear(x, self.weight_t.t(), self.bias)
        t = self.effective(x.dtype)
        if x.requires_grad and torch.is_grad_enabled():
            xm = x.masked_fill(x.abs() < self.threshold, 0)
            return nn.functional.linear(xm, self.weight_t.t(), self.bias)
        if torch.compiler.is_compiling():
            from .ops import colskip_op

            return colskip_op(x, self.weight_t, t, self.bias)
        return colskip_matmul(x, self.weight_t, t, self.bias, self.kept)

    def extra_repr(self) -> str:
        kind = "per-feature" if self.threshold.numel() > 1 else "scalar"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind} threshold, "
                f"dtype={self.weight_t.dtype}, bias={self.bias is not None}")


def apply_column_skip(model: nn.Module) -> list[str]:
    """Replace every linear layer with dense weights (nn.Linear, or a SparseLinear in the dense format with float
    values) whose input carries an installed activation threshold with a ColumnSkipLinear (the hook is removed: the
    kernel applies the threshold itself). Bitmask-packed and int8 layers keep their hook (no column-skipping kernel
    over packed weights yet). Returns the replaced module names."""
    from ..activation import hooks
    from ..activation.sites import INPUT
    from .linear import SparseLinear

    modules = dict(model.named_modules())
    done = []
    for name, mask in hooks.masks(model).items():
        module, t = modules[name], mask.threshold
        if mask.kind != INPUT:
            continue
        if type(module) is nn.Linear:
            weight, bias = module.weight, module.bias
        elif isinstance(module, SparseLinear) and module.format == "dense" and not module.quantize:
            weight, bias = module.dense_weight(), module.bias
        else:
            continue
        hooks.detach(module)
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, attr, ColumnSkipLinear(weight, bias, t, mask.policy))
        done.append(name)
    return done
