"""SparseLinear: an inference-only replacement for nn.Linear / Conv1D running on sparsecraft's CPU kernels.

A layer is stored in one of two formats:

* ``bitmask``: per output row, ceil(K / 64) uint64 mask words (bit k of word w = input column 64 w + k) and the
  row's nonzero values packed contiguously in the model's dtype, plus row offsets. At 50% sparsity a bf16 layer
  reads 9/16 of the dense bytes, at 70% 29/80. The kernels expand each mask byte into 8 lanes with one shuffle
  (AVX2) and multiply by the dense activations in float32.
* ``bitmask`` with int8 values (``quantize="int8"``): the same mask, the row's kept weights as symmetric int8
  (sparsecraft.quantize: q = round(w / s), s = max |w_row| / 127) and one float32 scale per output row, applied
  once to the row's float32 dot product: y_r = s_r (x . q_r) + b_r. Activations and outputs keep the model's dtype.
  A kept weight that rounds to 0 stays in the mask as a stored 0, so the mask is the float layer's. At 50% a layer
  reads about 5/16 of its bf16 dense bytes.
* ``dense``: the original weight, multiplied by the same kernels' dense path (faster than torch's bf16 GEMV on
  CPUs without native bf16 instructions). The weight Parameter is kept as is, so tied weights stay tied.

The kernels compute y = x Wᵀ + b for any number of rows of x (decode GEMV is one row; prefill processes the rows
in tiles of 6, so a block of weight rows is read from memory once and reused from cache for every tile) in float32,
bfloat16 or float16. Packed buffers of 4 MiB or more ask Linux for transparent huge pages before they are filled
(fewer TLB misses while streaming; SPARSECRAFT_HUGEPAGES=0 turns that off).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import KernelError

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
FORMATS = {"dense": 0, "bitmask": 1}
QUANTIZE = {"int8": 3}  # stored value type -> the kernels' code (DT_I8)
PATHS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3, "avx512f": 4, "avx512vbmi2": 5}
PATH_ENV = "SPARSECRAFT_KERNEL_PATH"
VALUE_PADDING = 64  # the vector paths load up to 64 values past a row's last one (AVX-512 VBMI2: 64 int8, 32 x 16 bits)
HUGEPAGES = os.environ.get("SPARSECRAFT_HUGEPAGES", "1") != "0"  # packed buffers >= 4 MiB: MADV_HUGEPAGE

_ext = None
_ext_error: str | None = None
_ext_lock = threading.Lock()
_path = os.environ.get(PATH_ENV, "auto")
_path_value: int | None = None  # PATHS[_path] once checked


def _load():
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return _ext
    with _ext_lock:
        if _ext is None and _ext_error is None:
            try:
                from . import _sparsekernels  # built by setup.py; links (torch's) libgomp

                _ext = _sparsekernels
            except ImportError as exc:
                _ext_error = str(exc) or type(exc).__name__
    return _ext


def available() -> bool:
    """Whether the compiled kernels can be used in this installation."""
    return _load() is not None


def require():
    """The compiled extension module, or a KernelError explaining how to build it."""
    ext = _load()
    if ext is None:
        raise KernelError(
            f"sparsecraft's CPU kernels are not built in this installation ({_ext_error}): install a C compiler "
            "(e.g. `apt-get install build-essential` or Xcode's command line tools) and reinstall sparsecraft "
            "(`pip install -e .` or `pip install --force-reinstall --no-deps sparsecraft`)"
        )
    return ext


def info() -> dict:
    """Build and CPU facts: {'built', 'avx2', 'avx512', 'avx512_vbmi2', 'avx512_bf16', 'avx512_vnni', 'openmp',
    'max_threads', 'path', 'error'} (bf16 and vnni are reported only with VBMI2, which their kernels also use)."""
    ext = _load()
    facts = dict(ext.info()) if ext is not None else {"avx2": 0, "avx512": 0, "avx512_vbmi2": 0, "avx512_bf16": 0,
                                                            "avx512_vnni": 0, "openmp": 0, "max_threads": 1}
    return {"built": ext is not None, **{k: bool(v) if k != "max_threads" else v for k, v in facts.items()},
            "path": get_path(), "error": _ext_error}


def get_path() -> str:
    """The kernel path in use: 'auto' (the widest the CPU has: AVX-512, else AVX2, else scalar), 'avx512' (every
    AVX-512 kernel the CPU has: the VBMI2 kernels where it has AVX512_VBMI2, and for decode the vdpbf16ps (bf16
    values) and vpdpbusd (int8 values) kernels where it has AVX512_BF16 / AVX512_VNNI), 'avx512vbmi2' (the VBMI2
    kernels, not the dot-product ones), 'avx512f' (AVX-512F kernels only), 'avx2' or 'scalar'."""
    return _path


_PATH_NEEDS = {"avx2": ("avx2", "AVX2+FMA"), "avx512": ("avx512", "AVX-512F"), "avx512f": ("avx512", "AVX-512F"),
               "avx512vbmi2": ("avx512_vbmi2", "AVX512_VBMI2")}


def set_path(name: str) -> None:
    """Force a kernel path ('auto', 'avx512', 'avx512vbmi2', 'avx512f', 'avx2', 'scalar'); also settable with
    SPARSECRAFT_KERNEL_PATH."""
    global _path, _path_value
    if name not in PATHS:
        raise KernelError(f"unknown kernel path {name!r}: use one of {', '.join(PATHS)}")
    if name in _PATH_NEEDS and available() and not require().info()[_PATH_NEEDS[name][0]]:
        raise KernelError(f"the {name} kernel path was asked for but this CPU (or build) has no "
                          f"{_PATH_NEEDS[name][1]}: use 'auto', or one of the paths sparsecraft.kernels.info() "
                          "reports")
    _path, _path_value = name, PATHS[name]


@contextmanager
def use_path(name: str):
    """Run a block with a forced kernel path."""
    old = get_path()
    set_path(name)
    try:
        yield
    finally:
        set_path(old)


def _path_code() -> int:
    global _path_value
    if _path_value is None:
        code = PATHS.get(_path)
        if code is None:
            raise KernelError(f"{PATH_ENV}={_path!r} is not a kernel path: use one of {', '.join(PATHS)}")
        _path_value = code
    return _path_value


def check_quantize(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZE:
        raise KernelError(f"unknown SparseLinear value type quantize={quantize!r}: use None (the model's dtype) or "
                          "'int8'")


def _conv1d_type():
    from ..models import PRUNABLE_TYPES

    return next((t for t in PRUNABLE_TYPES if t is not nn.Linear), None)


def pack_bitmask(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask int64 [N, words], rowptr int64 [N + 1], values [nnz + padding]) of a 2-D CPU weight [N, K].
    Zeros of either sign are dropped; every other value (NaN included) is kept bit for bit."""
    ext = require()
    if weight.dim() != 2:
        raise KernelError(f"a weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if weight.dtype not in DTYPES or weight.device.type != "cpu":
        raise KernelError(f"the CPU kernels take float32/bfloat16/float16 weights on the CPU, got {weight.dtype} on "
                          f"{weight.device}: move the model to the CPU (and a supported dtype) first")
    weight = weight.detach()
    n, k = weight.shape
    words = (k + 63) // 64
    counts = (weight != 0).sum(dim=1)
    rowptr = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=rowptr[1:])
    nnz = int(rowptr[-1])
    values = _stream_buffer(ext, nnz + VALUE_PADDING, weight.dtype)
    values[nnz:] = 0
    mask = _stream_buffer(ext, n * words, torch.int64).view(n, words)
    ext.pack(weight.element_size(), n, k, words, weight.data_ptr(), weight.stride(0), weight.stride(1),
             rowptr.data_ptr(), mask.data_ptr(), values.data_ptr(), torch.get_num_threads())
    return mask, rowptr, values


def pack_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask int64 [N, words], rowptr int64 [N + 1], values int8 [nnz + padding], scale float32 [N]) of a 2-D CPU
    weight: pack_bitmask's mask of its non-zeros and their int8 values (sparsecraft.quantize.quantize_int8, one
    scale per row). A kept weight that rounds to 0 is stored as 0: the mask is the float weight's."""
    from ..quantize import quantize_int8

    q, scale = quantize_int8(weight)
    mask, rowptr, _ = pack_bitmask(weight)
    nnz = int(rowptr[-1])
    values = _stream_buffer(require(), nnz + VALUE_PADDING, torch.int8)
    values[nnz:] = 0
    values[:nnz] = q[weight.detach() != 0]
    return mask, rowptr, values, scale


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def pack_compressed(shape: tuple[int, int], bitmask: torch.Tensor, values: torch.Tensor,
                    row_offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask, rowptr, values + padding) from compressed-tensors sparse-bitmask parts (sparsecraft.compressed):
    `bitmask` uint8 [N, ceil(K / 8)] (column 8 b + i is bit i of byte b), the kept `values` in row-major order (any
    dtype, copied bit for bit), `row_offsets` int64 [N] (checked when given). No float round trip."""
    ext = require()
    n, k = (int(v) for v in shape)
    words, nb = (k + 63) // 64, (k + 7) // 8
    bitmask, values = bitmask.detach().cpu(), values.detach().cpu().reshape(-1)
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (n, nb):
        raise KernelError(f"a bitmask for a [{n}, {k}] weight is uint8 [{n}, {nb}], got {bitmask.dtype} "
                          f"{tuple(bitmask.shape)}")
    if k % 8 and n and bool((bitmask[:, -1] >> (k % 8)).any()):
        raise KernelError(f"the bitmask marks columns past the weight's {k}: it is corrupt")
    rowptr = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(_POPCOUNT[bitmask.long()].sum(dim=1), 0, out=rowptr[1:])
    nnz = int(rowptr[-1])
    if values.numel() != nnz or (row_offsets is not None and not torch.equal(row_offsets.reshape(-1).cpu(),
                                                                              rowptr[:-1])):
        raise KernelError(f"the bitmask marks {nnz} weights but {values.numel()} values are stored (or the row "
                          "offsets disagree): the checkpoint is corrupt, re-export it")
    mask = _stream_buffer(ext, n * words, torch.int64).view(n, words)
    raw = mask.view(torch.uint8).view(n, words * 8)  # mask word w of a row is bytes 8 w .. 8 w + 7, little-endian
    raw[:, nb:] = 0
    raw[:, :nb] = bitmask
    if sys.byteorder == "big":
        mask.copy_(torch.from_numpy(mask.numpy().byteswap()))
    packed = _stream_buffer(ext, nnz + VALUE_PADDING, values.dtype)
    packed[nnz:] = 0
    packed[:nnz] = values
    return mask, rowptr, packed


_HUGE = 2 << 20


def _stream_buffer(ext, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; one of 4 MiB or more (where Linux has transparent huge pages) lives in a fresh
    private anonymous mapping, 2 MiB-aligned and madvise(MADV_HUGEPAGE)d before its first touch, so the kernels
    stream it through 2 MiB pages: measured here, dense bf16 rows read ~12% faster than from 4 KiB pages (memory
    that malloc hands back may be pages already touched, which the advice no longer changes)."""
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if HUGEPAGES and nbytes >= 4 << 20 and hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE"):
        try:
            mm = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            mm.madvise(mmap.MADV_HUGEPAGE)
            address = ctypes.addressof(ctypes.c_char.from_buffer(mm))  # the tensor keeps the mapping alive
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.frombuffer(mm, dtype=dtype, count=numel, offset=(-address) % _HUGE)
        except (OSError, ValueError, AttributeError):
            pass
    t = torch.empty(numel, dtype=dtype)
    if HUGEPAGES and nbytes >= 4 << 20:
        ext.advise_hugepages(t.data_ptr(), nbytes)
    return t


def _relocate(param: nn.Parameter) -> None:
    """Move a large CPU weight (the dense path's) into a huge-page stream buffer, in place: the Parameter object and
    its values stay the same, so every module sharing it (tied embeddings) sees the new storage."""
    nbytes = param.numel() * param.element_size()
    if not HUGEPAGES or nbytes < 4 << 20 or param.device.type != "cpu":
        return
    buf = _stream_buffer(require(), param.numel(), param.dtype)
    if buf.data_ptr() % _HUGE == 0:  # a huge-page mapping (else keep the weight where it is)
        buf.copy_(param.detach().reshape(-1))
        param.data = buf.view(param.shape)


def unpack_bitmask(mask: torch.Tensor, rowptr: torch.Tensor, values: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense weight [N, K] of a packed layer."""
    n, words = mask.shape
    shifts = torch.arange(64, dtype=torch.int64)
    dense = torch.zeros(n, words * 64, dtype=values.dtype)
    for start in range(0, n, 1024):  # bounded temporary: [rows, words, 64] bools
        block = mask[start:start + 1024]
        bits = ((block.unsqueeze(-1) >> shifts) & 1).bool().reshape(block.shape[0], -1)
        lo, hi = int(rowptr[start]), int(rowptr[min(start + 1024, n)])
        dense[start:start + 1024][bits] = values[lo:hi]
    return dense[:, :in_features].contiguous()


def matmul(x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, rowptr: torch.Tensor | None,
           scale: torch.Tensor | None, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """y = x Wᵀ + b on the kernels, W given as a SparseLinear holds it: dense `values` [N, K] (mask None), or the
    bitmask format (`mask` [N, words], `rowptr`, packed `values`, float32 per-row `scale` for int8 values). The
    arguments are checked by SparseLinear; this is the body of its forward and of the `sparsecraft::linear` op.
    x may also be float32 over 16-bit values (the decode step's mix: float32 activations, bf16/fp16 weights)."""
    n = out_features
    k = x.shape[-1]
    if not x.is_contiguous():
        x = x.contiguous()
    m = x.numel() // k if k else 0
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype)
    if k == 0:  # an empty sum: y = b
        y.zero_()
        if bias is not None:
            y += bias
        return y
    if n == 0 or m == 0:
        return y
    b = bias.data_ptr() if bias is not None else 0
    dt = DTYPES[x.dtype]
    if mask is not None:
        _ext.matmul(dt, 1, _path_value, torch.get_num_threads(), n, k, m, mask.shape[1], x.data_ptr(), k,
                    mask.data_ptr(), rowptr.data_ptr(), values.data_ptr(), 0, b, y.data_ptr(), n,
                    QUANTIZE["int8"] if values.dtype == torch.int8 else DTYPES[values.dtype],
                    scale.data_ptr() if scale is not None else 0)
    else:
        _ext.matmul(dt, 0, _path_value, torch.get_num_threads(), n, k, m, (k + 63) // 64, x.data_ptr(), k, 0, 0,
                    values.data_ptr(), values.stride(0), b, y.data_ptr(), n, DTYPES[values.dtype], 0)
    return y


class _InputGrad(torch.autograd.Function):
    """Gradients with respect to the input only (the packed weights are buffers, not trained)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer._run(x)

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.layer.dense_weight().to(grad.dtype)
        return grad @ weight, None


class SparseLinear(nn.Module):
    """y = x Wᵀ + b on the CPU kernels (inference; gradients flow to the input only, not to weight or bias).

    Build it with `SparseLinear.from_module(linear_or_conv1d, format)`; `to_module()` gives the dense layer back.
    `quantize="int8"` (bitmask only) stores int8 values with a float32 scale per output row (buffer `scale`);
    `dense_weight()`, `to_module()` and `state_dict()` then give the dequantized weight q * scale in the model's
    dtype, and loading a state dict re-quantizes (its mask: the loaded weight's non-zeros).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, format: str = "bitmask",
                 quantize: str | None = None):
        super().__init__()
        require()
        if format not in FORMATS:
            raise KernelError(f"unknown SparseLinear format {format!r}: use 'bitmask' or 'dense'")
        check_quantize(quantize)
        if quantize is not None and format != "bitmask":
            raise KernelError(f"{quantize} values need the bitmask format, not {format!r}")
        if weight.dim() != 2 or weight.dtype not in DTYPES or weight.device.type != "cpu":
            raise KernelError(f"SparseLinear needs a 2-D float32/bfloat16/float16 CPU weight, got shape "
                              f"{tuple(weight.shape)} {weight.dtype} on {weight.device}: move the model to the CPU "
                              "first")
        self.out_features, self.in_features = weight.shape
        self.format = format
        self.source = "linear"  # or 'conv1d': what to_module() rebuilds
        self.quantize = quantize
        self._model_dtype = weight.dtype if quantize else None  # int8: the activations' dtype (no weight holds it)
        if format == "bitmask":
            self._set_packed(*(pack_int8(weight) if quantize else pack_bitmask(weight)))
        else:
            if isinstance(weight, nn.Parameter) and weight.is_contiguous():
                _relocate(weight)
                self.weight = weight  # the same Parameter: ties (e.g. lm_head = embeddings) survive
            else:
                self.register_buffer("weight", weight.detach().contiguous())
            self.nnz = int((self.weight != 0).sum())
        self._set_bias(bias, weight.dtype)
        self._refresh()

    def _set_bias(self, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        if bias is not None and (bias.dtype != dtype or bias.shape != (self.out_features,)):
            raise KernelError(f"bias must be [{self.out_features}] {dtype}, got {tuple(bias.shape)} {bias.dtype}")
        if isinstance(bias, nn.Parameter) or bias is None:
            self.bias = bias
        else:
            self.register_buffer("bias", bias.detach().contiguous())

    # The forward pass reads its tensors from plain attributes (nn.Module attribute lookups cost microseconds per
    # decode step); they are refreshed whenever a tensor attribute is set or the module is moved / cast.
    _TENSORS = ("mask", "rowptr", "values", "scale", "weight", "bias")

    def _refresh(self) -> None:
        d = self.__dict__
        get = self._buffers.get
        d["_bias_t"] = self._parameters.get("bias", get("bias"))
        d["_scale_t"] = get("scale") if self.quantize else None
        if self.format == "bitmask":
            d["_mask_t"], d["_rowptr_t"], d["_w_t"] = get("mask"), get("rowptr"), get("values")
        else:
            d["_mask_t"] = d["_rowptr_t"] = None
            d["_w_t"] = self._parameters.get("weight", get("weight"))
        w = d["_w_t"]
        dtype = self._model_dtype if self.quantize else w.dtype if w is not None else None
        d["_dt"] = DTYPES.get(dtype, -1)
        d["_wt"] = QUANTIZE[self.quantize] if self.quantize else d["_dt"]  # the stored values' type
        d["_dtype"] = dtype if d["_dt"] >= 0 else None  # None fails forward's fast check: _check explains
        d["_cpu"] = w is not None and w.device.type == "cpu"

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in SparseLinear._TENSORS and "_dt" in self.__dict__:
            self._refresh()

    def _apply(self, fn, recurse=True):
        # int8 layers: the float32 scales follow a move but not a cast (.to(dtype), .half() would change their bits);
        # the cast sets the activations' dtype instead (probed on an empty tensor)
        scale = self._buffers.pop("scale", None)
        try:
            result = super()._apply(fn, recurse)
        finally:
            if scale is not None:
                probe = fn(torch.empty(0, dtype=self._model_dtype, device=scale.device))
                self._buffers["scale"] = scale.to(device=probe.device)
                self._model_dtype = probe.dtype
        self._refresh()
        return result

    def _set_packed(self, mask: torch.Tensor, rowptr: torch.Tensor, values: torch.Tensor,
                    scale: torch.Tensor | None = None) -> None:
        # not persistent: state_dict() holds the dense `weight` instead (see _save_to_state_dict)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("rowptr", rowptr, persistent=False)
        self.register_buffer("values", values, persistent=False)
        if scale is not None:
            self.register_buffer("scale", scale.to(torch.float32).reshape(-1).contiguous(), persistent=False)
        self.nnz = int(rowptr[-1])
        if "_dt" in self.__dict__:
            self._refresh()

    # state_dict() looks like the dense layer's (`weight` in the source layer's orientation, `bias`), so that
    # save_pretrained, sparsecraft.save and state-dict comparisons work on a kernel model unchanged.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.format == "dense" and self.source == "linear":
            weight = self.weight if keep_vars else self.weight.detach()
        else:
            weight = self.dense_weight()
            weight = weight.t() if self.source == "conv1d" else weight
        destination[prefix + "weight"] = weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("weight", "bias"):
            key = prefix + name
            if key not in state_dict:
                if name == "weight" or self.bias is not None:
                    missing_keys.append(key)
                continue
            value = state_dict[key].detach()
            if name == "bias":
                if self.bias is None or value.shape != self.bias.shape:
                    error_msgs.append(f"{key}: shape {tuple(value.shape)} does not fit this layer's bias")
                    continue
                with torch.no_grad():
                    self.bias.copy_(value)
                continue
            value = value.t() if self.source == "conv1d" else value
            if value.shape != (self.out_features, self.in_features):
                error_msgs.append(f"{key}: shape {tuple(value.shape)} does not fit [{self.out_features}, "
                                  f"{self.in_features}]")
            elif self.format == "dense":
                with torch.no_grad():
                    self.weight.copy_(value)
            else:
                value = value.to(device="cpu", dtype=self.dtype)
                self._set_packed(*(pack_int8(value) if self.quantize else pack_bitmask(value)))
        if strict:
            for key in state_dict:
                if key.startswith(prefix) and key[len(prefix):] not in ("weight", "bias") and \
                        "." not in key[len(prefix):]:
                    unexpected_keys.append(key)

    @classmethod
    def from_module(cls, module: nn.Module, format: str = "bitmask", quantize: str | None = None) -> SparseLinear:
        """From an nn.Linear or a transformers Conv1D (whose weight is stored [in, out]); `quantize="int8"`: int8
        values with per-output-row scales."""
        conv1d = _conv1d_type()
        if isinstance(module, nn.Linear):
            layer = cls(module.weight, module.bias, format, quantize)
        elif conv1d is not None and isinstance(module, conv1d):
            layer = cls(module.weight.t(), module.bias, format, quantize)
            layer.source = "conv1d"
        else:
            raise KernelError(f"SparseLinear replaces nn.Linear or Conv1D layers, not {type(module).__name__}")
        return layer

    @classmethod
    def from_compressed(cls, shape: tuple[int, int], bitmask: torch.Tensor, values: torch.Tensor,
                        row_offsets: torch.Tensor | None = None, *, scale: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> SparseLinear:
        """A bitmask layer [out, in] = `shape` straight from compressed-tensors sparse-bitmask parts (see
        pack_compressed): int8 `values` with float32 row scales `scale` ([N] or [N, 1]), or values in the layer's
        float dtype. Values and scales are kept bit for bit. `dtype`: the activations' (default: the values', float32
        for int8)."""
        require()
        int8 = values.dtype == torch.int8
        dtype = dtype or (torch.float32 if int8 else values.dtype)
        if int8 != (scale is not None) or (scale is not None and (scale.dtype != torch.float32 or
                                                                  scale.numel() != int(shape[0]))):
            raise KernelError(f"compressed values {values.dtype} need {'a' if int8 else 'no'} float32 scale per row "
                              f"(got {None if scale is None else (scale.dtype, tuple(scale.shape))})")
        if dtype not in DTYPES or (not int8 and dtype != values.dtype):
            raise KernelError(f"a SparseLinear from {values.dtype} values cannot run in {dtype}: use "
                              f"{'float32, bfloat16 or float16' if int8 else values.dtype}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features = (int(v) for v in shape)
        layer.format, layer.source = "bitmask", "linear"
        layer.quantize = "int8" if int8 else None
        layer._model_dtype = dtype if int8 else None
        layer._set_packed(*pack_compressed(shape, bitmask, values, row_offsets),
                          scale.detach().cpu().clone() if int8 else None)
        layer._set_bias(bias, dtype)
        layer._refresh()
        return layer

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and outputs') dtype: the weight's, or the model's for int8 values."""
        return self._model_dtype if self.quantize else self._w_t.dtype

    @property
    def device(self) -> torch.device:
        return self._w_t.device

    @property
    def sparsity(self) -> float:
        total = self.out_features * self.in_features
        return 1.0 - self.nnz / total if total else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads per pass over the weight (mask + values + row offsets, or the dense weight)."""
        if self.format == "dense":
            return self.weight.numel() * self.weight.element_size()
        scales = self.scale.numel() * 4 if self.quantize else 0
        return self.mask.numel() * 8 + self.rowptr.numel() * 8 + self.nnz * self.values.element_size() + scales

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense [out_features, in_features] tensor (a copy for the bitmask format; int8 values
        dequantized, q * scale in the model's dtype)."""
        if self.format == "dense":
            return self.weight.detach()
        weight = unpack_bitmask(self.mask, self.rowptr, self.values, self.in_features)
        if self.quantize:
            from ..quantize import dequantize_int8

            weight = dequantize_int8(weight, self.scale, self.dtype)
        return weight

    def to_module(self) -> nn.Module:
        """The equivalent dense nn.Linear (or Conv1D), reusing this layer's Parameters where it has them."""
        weight = self.weight if self.format == "dense" else None
        if self.source == "conv1d":
            conv1d = _conv1d_type()
            module = conv1d(self.out_features, self.in_features)
            module.weight = nn.Parameter(self.dense_weight().t().contiguous(), requires_grad=True)
        else:
            module = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
            module.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(self.dense_weight())
        bias = self.bias
        module.bias = bias if isinstance(bias, nn.Parameter) or bias is None else nn.Parameter(bias.clone())
        return module

    def _check(self, x: torch.Tensor) -> None:
        if x.device.type != "cpu" or self.device.type != "cpu":
            raise KernelError(f"SparseLinear runs on the CPU only, got input on {x.device} (layer on {self.device}): "
                              "keep the model on the CPU, or call sparsecraft.densify_model(model) before moving it")
        if self._dt < 0:
            raise KernelError(f"SparseLinear holds {self.dtype} weights; the kernels take float32, bfloat16 or "
                              "float16: convert the model with .to(dtype) to one of those")
        if x.dtype != self.dtype:
            raise KernelError(f"SparseLinear input dtype {x.dtype} does not match the layer's {self.dtype}: cast "
                              "the input (or convert the model with .to(dtype) before sparsify_model)")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise KernelError(f"SparseLinear expects inputs [..., {self.in_features}], got {tuple(x.shape)}")

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self._w_t, self._mask_t, self._rowptr_t, self._scale_t, self._bias_t, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not self._dtype or not x.is_cpu or not self._cpu or x.shape[-1] != self.in_features or \
                _path_value is None:
            self._check(x)
            _path_code()
            require()
        if x.requires_grad and torch.is_grad_enabled():
            if self.format == "dense":
                return nn.functional.linear(x, self.weight, self.bias)
            return _InputGrad.apply(x, self)
        if torch.compiler.is_compiling():  # torch.compile / torch.export see one op, not an opaque Python call
            from .ops import linear_op

            return linear_op(x, self._w_t, self._mask_t, self._rowptr_t, self._scale_t, self._bias_t,
                             self.out_features)
        return self._run(x)

    def extra_repr(self) -> str:
        values = f"values={self.quantize} (per-row scales), " if self.quantize else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, {values}"
                f"dtype={self.dtype}, sparsity={self.sparsity:.2%}, bias={self.bias is not None}")
