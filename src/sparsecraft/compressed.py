"""Compressed storage in the compressed-tensors sparse formats (as llm-compressor writes them).

Two formats, both keyed by the layer (module) name ``<name>`` instead of ``<name>.weight``:

* ``sparse-bitmask`` (any sparsity): ``<name>.shape`` int64 [2], ``<name>.compressed`` the non-zero values in
  row-major order (1-D, the model's dtype), ``<name>.bitmask`` uint8 [rows, ceil(cols / 8)] (bit j of byte k of
  a row is column 8k + j: numpy ``packbits(bitorder="little")``), ``<name>.row_offsets`` int64 [rows] (index in
  ``compressed`` where each row starts).
* ``sparse-24-bitmask`` (2:4 only): ``<name>.shape`` int64 [2, 1], ``<name>.compressed`` [rows, cols / 2] (exactly
  two values per group of four; a group with fewer non-zeros stores zeros too), ``<name>.bitmask`` as above.

Which layers are compressed is written in ``config.json`` as ``quantization_config.sparsity_config`` (``format``,
``targets``, ``ignore``, ``global_sparsity``, ``sparsity_structure``) with ``quant_method: compressed-tensors``,
exactly as compressed-tensors' ``ModelCompressor.update_config`` does. Every other tensor is stored dense.

The layout was checked against compressed-tensors 0.13.0 (its ``BitmaskCompressor`` / ``Sparse24BitMaskCompressor``
and ``ModelCompressor``); the package is not needed at run time. compressed-tensors removed these formats in 0.15
(and transformers 5 requires >= 0.15), so a plain ``AutoModelForCausalLM.from_pretrained`` does not decompress them:
`load_compressed` (and so ``sparsecraft.load`` / ``sparsecraft eval``) does.

Zeros are stored implicitly and come back as +0.0 (a -0.0 left by masking reads back as +0.0); every other weight
comes back with the same bits.

int8 values (``export(..., dtype="int8")``, sparse-bitmask only, sparsecraft's own extension): ``<name>.compressed``
holds int8 values (sparsecraft.quantize: symmetric, q = round(w / s)) for every weight the bitmask marks (the pruning
mask: a kept weight that rounds to 0 is a stored 0), plus ``<name>.weight_scale`` float32 [rows, 1], one scale per
output row (compressed-tensors' channel-wise layout); the weight is q * s. ``sparsity_config`` says so with
``"value_dtype": "int8"`` and ``"scale_strategy": "channel"`` (readers that do not know these keys would take the
int8 values for weights). `load_compressed` dequantizes to the model's dtype; ``sparsecraft.load`` with kernels runs
the stored int8 values and scales directly (`SparseLinear.from_compressed`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import patterns
from .errors import ConfigError, ModelError, OutputError
from .patterns import Pattern

SPARSE_BITMASK = "sparse-bitmask"
SPARSE_24_BITMASK = "sparse-24-bitmask"
DENSE = "dense"
FORMATS = {"bitmask": SPARSE_BITMASK, "2:4": SPARSE_24_BITMASK}  # CLI name -> compressed-tensors format
PARAM_NAMES = {
    SPARSE_BITMASK: ("shape", "compressed", "bitmask", "row_offsets", "weight_scale"),
    SPARSE_24_BITMASK: ("shape", "compressed", "bitmask"),
}
QUANT_METHOD = "compressed-tensors"
CONFIG_KEYS = ("quantization_config", "compression_config")  # compression_config: older llm-compressor outputs
# Written as the config's "version": the compressed-tensors release whose layout this module reproduces.
FORMAT_VERSION = "0.13.0"
EXPORT_KEY = "compressed"  # section of sparsecraft.json describing the export
VALUE_DTYPES = ("int8",)  # stored value types besides the model's own (sparsity_config "value_dtype")


# ----- one tensor ------------------------------------------------------------------------------------------------


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """Bool [rows, cols] -> uint8 [rows, ceil(cols / 8)], little bit order (column 8k + j is bit j of byte k)."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy(), axis=-1, bitorder="little"))


def unpack_bitmask(packed: torch.Tensor, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """uint8 [rows, ceil(cols / 8)] -> bool `shape`."""
    rows, cols = int(shape[0]), int(shape[1])
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, (cols + 7) // 8):
        raise ModelError(f"bitmask of shape {tuple(packed.shape)} {packed.dtype} does not fit a [{rows}, {cols}] "
                         "weight: the checkpoint is corrupt, re-export it")
    bits = np.unpackbits(packed.cpu().numpy(), axis=-1, count=cols, bitorder="little")
    return torch.from_numpy(bits.astype(bool)).reshape(rows, cols)


def compress_bitmask(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """sparse-bitmask tensors (local names) of a 2-D weight."""
    _check_2d(weight)
    weight = weight.detach().cpu()
    mask = weight != 0
    counts = mask.sum(dim=-1)
    return {
        "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        "compressed": torch.masked_select(weight, mask),
        "bitmask": pack_bitmask(mask),
        "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),
    }


def compress_bitmask_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """sparse-bitmask tensors of a 2-D weight with int8 values and `weight_scale` float32 [rows, 1]
    (sparsecraft.quantize.quantize_int8); the bitmask marks the weight's non-zeros, rounded-to-0 ones included."""
    from .quantize import quantize_int8

    parts = compress_bitmask(weight)
    q, scale = quantize_int8(weight.detach().cpu())
    parts["compressed"] = torch.masked_select(q, weight.detach().cpu() != 0)
    parts["weight_scale"] = scale.reshape(-1, 1)
    return parts


def nm_violation(weight: torch.Tensor, n: int = 2, m: int = 4) -> str | None:
    """Why `weight` (as stored) is not n:m along its last dimension, or None when it is."""
    return patterns.nm_violation(weight, Pattern(n, m))


def compress_24(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """sparse-24-bitmask tensors (local names) of a 2-D 2:4-sparse weight (ConfigError otherwise)."""
    _check_2d(weight)
    weight = weight.detach().cpu()
    rows, cols = weight.shape
    if cols % 4:
        raise ConfigError(f"weight {tuple(weight.shape)} is not 2:4 sparse: it {nm_violation(weight)}")
    nonzero = weight.reshape(rows, cols // 4, 4) != 0
    need = 2 - nonzero.sum(-1, keepdim=True, dtype=torch.int8)
    if bool((need < 0).any()):
        raise ConfigError(f"weight {tuple(weight.shape)} is not 2:4 sparse: it {nm_violation(weight)}")
    # exactly two stored slots per group: the non-zeros, then the earliest zeros where a group has fewer
    zero = ~nonzero
    mask = (nonzero | (zero & (zero.cumsum(-1, dtype=torch.int8) <= need))).reshape(rows, cols)
    return {
        "shape": torch.tensor(list(weight.shape), dtype=torch.int64).reshape(-1, 1),
        "compressed": torch.masked_select(weight, mask).reshape(rows, cols // 2),
        "bitmask": pack_bitmask(mask),
    }


def decompress(tensors: dict[str, torch.Tensor], name: str = "a layer", dtype: torch.dtype | None = None
               ) -> torch.Tensor:
    """The dense weight from one layer's compressed tensors (either format); int8 values with `weight_scale` are
    dequantized (q * scale) to `dtype` (default float32)."""
    missing = [k for k in ("shape", "compressed", "bitmask") if k not in tensors]
    if missing:
        raise ModelError(f"{name} lacks {', '.join(missing)} in the checkpoint: it is corrupt, re-export it")
    shape = [int(v) for v in tensors["shape"].flatten().tolist()]
    if len(shape) != 2:
        raise ModelError(f"{name}: only 2-D compressed weights are supported, got shape {shape}")
    mask = unpack_bitmask(tensors["bitmask"], shape)
    values = tensors["compressed"].flatten()
    if int(mask.sum()) != values.numel():
        raise ModelError(f"{name}: the bitmask marks {int(mask.sum())} weights but {values.numel()} values are "
                         "stored: the checkpoint is corrupt, re-export it")
    dense = torch.zeros(shape, dtype=values.dtype).masked_scatter_(mask, values)
    scale = tensors.get("weight_scale")
    if values.dtype == torch.int8 or scale is not None:
        from .quantize import dequantize_int8

        if values.dtype != torch.int8 or scale is None or scale.dtype != torch.float32 or \
                scale.numel() != shape[0]:
            got = "none" if scale is None else f"{scale.dtype} {tuple(scale.shape)}"
            raise ModelError(f"{name}: int8 values need a float32 weight_scale with one scale per row; got values "
                             f"{values.dtype}, weight_scale {got}: the checkpoint is corrupt, re-export it")
        dense = dequantize_int8(dense, scale, dtype or torch.float32)
    return dense


def _check_2d(weight: torch.Tensor) -> None:
    if weight.ndim != 2:
        raise ConfigError(f"only 2-D weights can be compressed, got shape {tuple(weight.shape)}")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def compressed_nbytes(weight: torch.Tensor, fmt: str, values: str | None = None) -> int:
    """Bytes the compressed tensors of `weight` take in `fmt` (without safetensors headers; `values="int8"`: int8
    values and a float32 scale per row)."""
    rows, cols = weight.shape
    size = 1 if values else weight.element_size()
    bitmask = rows * ((cols + 7) // 8)
    if fmt == SPARSE_24_BITMASK:
        return 2 * 8 + rows * (cols // 2) * size + bitmask
    return 2 * 8 + int(torch.count_nonzero(weight)) * size + bitmask + rows * 8 + (rows * 4 if values else 0)


# ----- a checkpoint directory --------------------------------------------------------------------------------------


def _config_json(path: Path) -> dict:
    file = path / "config.json"
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {file} ({exc}): pass a valid model directory") from None


def compression_config(path: str | Path) -> dict | None:
    """The compressed-tensors block of `path`/config.json (quantization_config or compression_config), if any."""
    path = Path(path)
    if not (path / "config.json").is_file():
        return None
    config = _config_json(path)
    for key in CONFIG_KEYS:
        block = config.get(key)
        if isinstance(block, dict) and (block.get("quant_method") == QUANT_METHOD or "sparsity_config" in block):
            return block
    return None


def sparsity_config(path: str | Path) -> dict | None:
    """`sparsity_config` of a compressed-tensors directory (None when there is none)."""
    block = compression_config(path)
    return (block or {}).get("sparsity_config") or None


def is_compressed_dir(path: str | Path) -> bool:
    """Whether `path` is a compressed-tensors checkpoint with a sparsity config (sparse or dense)."""
    return sparsity_config(path) is not None


def _check_readable(path: Path) -> str:
    block = compression_config(path) or {}
    if block.get("config_groups"):
        raise ModelError(f"{path} is a quantized compressed-tensors checkpoint; sparsecraft reads only the sparse "
                         "formats (sparse-bitmask, sparse-24-bitmask): load it with transformers + compressed-tensors")
    fmt = (block.get("sparsity_config") or {}).get("format", DENSE)
    if fmt not in (DENSE, SPARSE_BITMASK, SPARSE_24_BITMASK):
        raise ModelError(f"{path} uses the compressed-tensors format {fmt!r}; sparsecraft reads {DENSE}, "
                         f"{SPARSE_BITMASK} and {SPARSE_24_BITMASK}")
    values = value_dtype(path)
    if values is not None and values not in VALUE_DTYPES:
        raise ModelError(f"{path} stores {values!r} values; this sparsecraft reads the model's dtype and "
                         f"{', '.join(VALUE_DTYPES)}")
    return fmt


def value_dtype(path: str | Path) -> str | None:
    """The stored value type of a compressed directory's layers when it is not the model's dtype ('int8'), else
    None."""
    return (sparsity_config(path) or {}).get("value_dtype")


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise ModelError(f"{index} is not a valid safetensors index ({exc}): re-export the model") from None
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path} holds no .safetensors file: compressed checkpoints are stored as safetensors")
    return files


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"cannot read {file} ({exc}): the checkpoint is corrupt, re-export it") from None
    return tensors


@dataclass
class CompressedLayer:
    """One layer as stored: `format`, the dense `shape`, the non-zero `values`, the packed `bitmask` (and
    `row_offsets` for sparse-bitmask). `mask()` and `dense()` unpack it."""

    name: str
    format: str
    shape: tuple[int, int]
    values: torch.Tensor
    bitmask: torch.Tensor
    row_offsets: torch.Tensor | None = None
    scale: torch.Tensor | None = None  # int8 values: float32 [rows, 1]

    def mask(self) -> torch.Tensor:
        return unpack_bitmask(self.bitmask, self.shape)

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        parts = {"shape": torch.tensor(self.shape), "compressed": self.values, "bitmask": self.bitmask}
        if self.scale is not None:
            parts["weight_scale"] = self.scale
        return decompress(parts, self.name, dtype)


def _split(tensors: dict[str, torch.Tensor], fmt: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(per-layer compressed tensors, the other tensors). A layer is compressed when `<name>.compressed` exists."""
    names = PARAM_NAMES.get(fmt, PARAM_NAMES[SPARSE_BITMASK])
    layers = {k[: -len(".compressed")] for k in tensors if k.endswith(".compressed")}
    grouped = {layer: {p: tensors[f"{layer}.{p}"] for p in names if f"{layer}.{p}" in tensors} for layer in layers}
    used = {f"{layer}.{p}" for layer, parts in grouped.items() for p in parts}
    return grouped, {k: v for k, v in tensors.items() if k not in used}


def read_compressed_layers(path: str | Path) -> dict[str, CompressedLayer]:
    """The compressed layers of a compressed-tensors directory, by module name, without decompressing them
    (for sparse kernels that consume values + bitmask directly)."""
    path = Path(path)
    fmt = _check_readable(path)
    grouped, _ = _split(_read_tensors(path), fmt)
    out = {}
    for name, parts in sorted(grouped.items()):
        dense = decompress(parts, name)  # validates the parts
        out[name] = CompressedLayer(name, fmt, tuple(dense.shape), parts["compressed"], parts["bitmask"],
                                    parts.get("row_offsets"), parts.get("weight_scale"))
    return out


def _model_dtype(path: Path) -> torch.dtype:
    """The dtype config.json records for the model (what int8 layers dequantize to), float32 when none."""
    config = _config_json(path)
    value = getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"), None)
    return value if isinstance(value, torch.dtype) else torch.float32


def decompressed_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, with each compressed layer back as a dense `<name>.weight` (int8 layers
    dequantized to `dtype`, default the model's dtype in config.json)."""
    path = Path(path)
    fmt = _check_readable(path)
    grouped, state = _split(_read_tensors(path), fmt)
    dtype = dtype or _model_dtype(path)
    for name, parts in grouped.items():
        state[f"{name}.weight"] = decompress(parts, name, dtype)
    return state


def load_compressed(path: str | Path, dtype: torch.dtype | None = None):
    """(model, tokenizer) from a compressed-tensors sparse directory, decompressed to a dense model."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoTokenizer

    path = Path(path)
    state = decompressed_state_dict(path, dtype)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not read the config of {path}: {str(exc).splitlines()[0]}") from None
    for key in CONFIG_KEYS:  # the weights are dense now: keep transformers' compressed-tensors quantizer out
        if hasattr(config, key):
            delattr(config, key)
    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if cls is None:
        raise ModelError(f"{path}: no causal LM class for model type {config.model_type!r} in this transformers")
    try:
        model, info = cls.from_pretrained(None, config=config, state_dict=state, dtype=dtype or "auto",
                                          output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"could not load model {path}: {str(exc).splitlines()[0]}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelError(f"{path} lacks {len(missing)} weights the model needs (first: {missing[0]}): the checkpoint "
                         "is incomplete, re-export it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    model.eval()
    return model, tokenizer


# ----- export ------------------------------------------------------------------------------------------------------


@dataclass
class ExportReport:
    """What `export` wrote: the format, compressed / dense-kept layers and byte counts."""

    path: Path
    format: str
    sparsity_structure: str
    pattern: str | None
    layers: list[str] = field(default_factory=list)  # compressed
    dense_layers: list[str] = field(default_factory=list)  # targets kept dense (too few zeros to gain)
    dense_bytes: int = 0  # the same tensors stored dense (safetensors payload)
    stored_bytes: int = 0  # the tensors as written (payload)
    file_bytes: int = 0  # the .safetensors files on disk (with headers)
    global_sparsity: float = 0.0
    value_dtype: str | None = None  # 'int8': the compressed layers' values (else the model's dtype)

    def to_dict(self) -> dict:
        return {"format": self.format, "sparsity_structure": self.sparsity_structure, "pattern": self.pattern,
                "layers": self.layers, "dense_layers": self.dense_layers, "dense_bytes": self.dense_bytes,
                "stored_bytes": self.stored_bytes, "file_bytes": self.file_bytes,
                "global_sparsity": self.global_sparsity, "value_dtype": self.value_dtype}


def parse_format(fmt: str) -> str:
    """CLI/API format name ('bitmask', '2:4' or a compressed-tensors name) -> compressed-tensors format."""
    value = FORMATS.get(str(fmt).strip().lower(), str(fmt).strip().lower())
    if value not in (SPARSE_BITMASK, SPARSE_24_BITMASK):
        raise ConfigError(f"unknown compressed format {fmt!r}: use bitmask (any sparsity) or 2:4")
    return value


def parse_dtype(dtype: str | None, fmt: str) -> tuple[str | None, str | None]:
    """`export --dtype` -> (stored value type 'int8' or None, the dtype to load the model in or None)."""
    if dtype is None:
        return None, None
    name = str(dtype).strip().lower()
    if name in VALUE_DTYPES:
        if fmt != SPARSE_BITMASK:
            raise ConfigError(f"--dtype {name} stores the values of the sparse-bitmask format: use --format bitmask "
                              f"(not {fmt})")
        return name, None
    from .models import _parse_dtype

    try:
        _parse_dtype(name)
    except ConfigError:
        raise ConfigError(f"unknown --dtype {dtype!r}: use int8 (int8 values, a float32 scale per row) or a float "
                          "dtype (float32, bfloat16, float16)") from None
    return None, name


def _recipe_of(metadata: dict) -> dict:
    recipe = metadata.get("recipe")
    return recipe if isinstance(recipe, dict) else {}


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _targets_and_ignore(model: nn.Module, compressed: list[str]) -> tuple[list[str], list[str]]:
    """compressed-tensors `targets`/`ignore`: ["Linear"] minus the other Linear layers when every compressed layer is
    an nn.Linear (llm-compressor's usual form), else the exact layer names."""
    linears = _linear_names(model)
    done = set(compressed)
    if done <= set(linears):
        return ["Linear"], [n for n in linears if n not in done]
    return sorted(done), []


def _global_sparsity(model: nn.Module) -> float:
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    nonzero = sum(int(torch.count_nonzero(p)) for p in params)
    return (total - nonzero) / total if total else 0.0


def export(src: str | Path, out: str | Path, fmt: str = "bitmask", *, force: bool = False,
           dtype: str | None = None) -> ExportReport:
    """Write the model in directory `src` (a sparsecraft output or any HF model directory) to `out` in a
    compressed-tensors sparse format (`fmt`: 'bitmask' or '2:4'), atomically, carrying over sparsecraft.json and
    recipe.yaml. The layers compressed are the prunable targets of the recipe in sparsecraft.json (else the
    layers inside the transformer blocks); with '2:4' every one of them must be 2:4 sparse. `dtype`: 'int8' stores
    the compressed layers' values as int8 with a float32 scale per row (bitmask only); a float dtype casts the
    model first."""
    from .checkpoint import RECIPE_FILE, check_output, read_metadata
    from .models import load_model

    fmt = parse_format(fmt)
    values, load_dtype = parse_dtype(dtype, fmt)
    src_path = Path(src).expanduser()
    if not src_path.exists():
        raise ModelError(f"source model {src_path} does not exist: pass a sparsecraft output or HF model directory")
    if not src_path.is_dir():
        raise ModelError(f"source model {src_path} is not a directory: pass a sparsecraft output or HF model directory")
    out_path = check_output(out, force)
    if out_path.resolve() == src_path.resolve():
        raise OutputError(f"--out {out_path} is the source directory: write the compressed model elsewhere")
    metadata = read_metadata(src_path)
    metadata.pop(EXPORT_KEY, None)
    model, tokenizer = load_model(src_path, dtype=load_dtype)
    recipe_file = src_path / RECIPE_FILE
    files = {RECIPE_FILE: recipe_file.read_text()} if recipe_file.is_file() else {}
    return write_compressed(model, out_path, fmt, tokenizer=tokenizer, metadata=metadata, files=files, force=force,
                            source=str(src_path), values=values)


def write_compressed(model: nn.Module, out: str | Path, fmt: str = "bitmask", *, tokenizer=None,
                     metadata: dict | None = None, files: dict[str, str] | None = None, force: bool = False,
                     source: str | None = None, values: str | None = None) -> ExportReport:
    """Save an in-memory `model` to `out` in a compressed-tensors sparse format, atomically, with `metadata` as
    sparsecraft.json (plus a "compressed" section) and extra text `files`. Layers compressed: the prunable targets
    of `metadata["recipe"]` (else the layers inside the transformer blocks) that are 2:4 sparse ('2:4'; any other
    target is an error) or sparse enough to be smaller compressed ('bitmask'; the rest stay dense). `values="int8"`
    (bitmask only, nn.Linear targets): int8 values with a float32 scale per output row."""
    from .checkpoint import METADATA_FILE, atomic_directory, check_output
    from .models import PRUNABLE_TYPES, select_targets

    fmt = parse_format(fmt)
    values, cast = parse_dtype(values, fmt)
    if cast:
        raise ConfigError(f"values={cast!r}: write_compressed stores int8 values or the model's own (cast the model "
                          "with .to(dtype) first)")
    out_path = check_output(out, force)
    metadata = dict(metadata or {})
    recipe = _recipe_of(metadata)
    targets = select_targets(model, recipe.get("targets") or None, recipe.get("ignore") or None)
    pattern = str(recipe["pattern"]) if recipe.get("pattern") else None

    conv1d = tuple(t for t in PRUNABLE_TYPES if t is not nn.Linear)
    chosen: list[str] = []
    kept_dense: list[str] = []
    for target in targets:
        weight = target.module.weight.detach()
        if weight.ndim != 2 or weight.is_meta:
            kept_dense.append(target.name)
            continue
        if values and conv1d and isinstance(target.module, conv1d):
            raise ConfigError(f"--dtype {values} scales each output row of an nn.Linear weight, but {target.name} is "
                              "a Conv1D (its weight is stored transposed): export this model without --dtype "
                              f"{values}")
        if fmt == SPARSE_24_BITMASK:
            why = nm_violation(weight)
            if why is not None:
                hint = (" (a Conv1D layer stores its weight transposed, so its 2:4 groups do not run along the stored "
                        "rows)" if conv1d and isinstance(target.module, conv1d) else "")
                raise ConfigError(f"--format 2:4 needs every pruned layer to keep at most 2 of every 4 consecutive "
                                  f"weights, but {target.name} {why}{hint}: prune with --pattern 2:4, or export with "
                                  "--format bitmask")
            chosen.append(target.name)
        elif compressed_nbytes(weight, fmt, values) < _nbytes(weight):
            chosen.append(target.name)
        else:
            kept_dense.append(target.name)

    all_24 = fmt == SPARSE_24_BITMASK or (bool(chosen) and all(
        nm_violation(model.get_submodule(n).weight) is None for n in chosen))
    structure = "2:4" if all_24 else "unstructured"
    global_sparsity = _global_sparsity(model)
    report = ExportReport(out_path, fmt, structure, pattern, list(chosen), kept_dense, global_sparsity=global_sparsity,
                          value_dtype=values)

    model_keys = set(model.state_dict())
    experts_24: list[bool] = []

    def expert_tensor(key: str, value: torch.Tensor) -> bool:
        """Fused MoE experts that transformers writes back per expert (Mixtral's `experts.E.w1.weight`, ...):
        2-D weights in the file that the in-memory model does not hold. Compressed like the targets when that
        is smaller (bitmask) or they are 2:4 (2:4); otherwise stored dense."""
        if key in model_keys or not key.endswith(".weight") or ".experts." not in key or value.ndim != 2 \
                or not value.is_floating_point():
            return False
        is_24 = nm_violation(value) is None
        if (fmt == SPARSE_24_BITMASK and not is_24) or compressed_nbytes(value, fmt, values) >= _nbytes(value):
            report.dense_layers.append(key[: -len(".weight")])
            return False
        experts_24.append(is_24)
        return True

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        _compress_files(tmp, {f"{n}.weight": n for n in chosen}, fmt, report, extra=expert_tensor, values=values)
        targets_cfg, ignore_cfg = _targets_and_ignore(model, report.layers)
        report.sparsity_structure = "2:4" if all_24 and all(experts_24) else "unstructured"
        config = _config_json(tmp)
        config["quantization_config"] = {
            "quant_method": QUANT_METHOD,
            "sparsity_config": {
                "format": fmt,
                "global_sparsity": global_sparsity,
                "ignore": ignore_cfg,
                "registry_requires_subclass": False,
                "sparsity_structure": report.sparsity_structure,
                "targets": targets_cfg,
                **({"value_dtype": values, "scale_strategy": "channel"} if values else {}),
            },
            "transform_config": {},
            "version": FORMAT_VERSION,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        report.file_bytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        meta = {**metadata, EXPORT_KEY: {**report.to_dict(), "source": source}}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)

    atomic_directory(out_path, write)
    return report


def _compress_files(directory: Path, weight_keys: dict[str, str], fmt: str, report: ExportReport,
                    extra: Callable[[str, torch.Tensor], bool] | None = None, values: str | None = None) -> None:
    """Rewrite every safetensors shard in `directory`, replacing `<name>.weight` tensors (`weight_keys`, and those
    `extra(key, tensor)` picks) by their compressed form (int8 values when `values` says so), and fix the shard
    index. Shards are rewritten one at a time."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    compress = compress_24 if fmt == SPARSE_24_BITMASK else compress_bitmask_int8 if values else compress_bitmask
    index_file = directory / "model.safetensors.index.json"
    files = _safetensors_files(directory)
    weight_map: dict[str, str] = {}
    found: set[str] = set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        out: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            report.dense_bytes += _nbytes(value)
            layer = weight_keys.get(key)
            if layer is None and extra is not None and extra(key, value):
                layer = key[: -len(".weight")]
                report.layers.append(layer)
            if layer is None:
                out[key] = value
            else:
                found.add(layer)
                out.update({f"{layer}.{local}": t for local, t in compress(value).items()})
        report.stored_bytes += sum(_nbytes(t) for t in out.values())
        tmp = file.with_name(f".{file.name}.tmp")
        save_file(out, tmp, metadata=metadata)
        os.replace(tmp, file)
        weight_map.update({k: file.name for k in out})
    missing = sorted(set(weight_keys.values()) - found)
    if missing:  # saved under another name than the module's: keep those dense and say so
        report.layers = [n for n in report.layers if n not in missing]
        report.dense_layers = sorted(set(report.dense_layers) | set(missing))
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        index["weight_map"] = dict(sorted(weight_map.items()))
        index.setdefault("metadata", {})["total_size"] = report.stored_bytes
        index_file.write_text(json.dumps(index, indent=2) + "\n")
