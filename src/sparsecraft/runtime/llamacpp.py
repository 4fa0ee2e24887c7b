"""llama.cpp as the side-by-side peer of sparsecraft's decode runtime, on the same weights.

A Hugging Face model directory (a pruned one included: its zeros are stored and run dense) is converted to GGUF by
llama.cpp's own ``convert_hf_to_gguf.py`` and run through ``llama-cpp-python``:

* ``find_converter``  where convert_hf_to_gguf.py is: an explicit path (the script, a llama.cpp or
  llama-cpp-python source tree, or the llama-cpp-python sdist .tar.gz, unpacked once into the cache), else
  $SPARSECRAFT_LLAMA_CPP_SRC, else ~/.cache/sparsecraft/llama.cpp-<version>/.
* ``convert``         HF directory -> .gguf (f32, f16, bf16 or q8_0), in a subprocess.
* ``decode_speed``    greedy decode tokens/s excluding the prefill, and the generated ids.
* ``perplexity``      llama.cpp's logits scored on exactly the windows and tokens of ``sparsecraft.evaluate``.

Token ids go in as they are (llama.cpp never re-tokenises and adds no BOS), so both runtimes see the same ids.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError, ModelError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SOURCE_ENV = "SPARSECRAFT_LLAMA_CPP_SRC"
CONVERTER = "convert_hf_to_gguf.py"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_KEEP = (CONVERTER, "conversion", "gguf-py")  # what the converter needs from a llama.cpp tree
_HOW = (f"pip download --no-deps --no-binary :all: llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} and pass the "
        f".tar.gz with --llama-cpp-src (or set {SOURCE_ENV} to it)")


def cache_dir() -> Path:
    """Where an sdist is unpacked: $XDG_CACHE_HOME/sparsecraft (~/.cache/sparsecraft)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "sparsecraft"


def _in_tree(root: Path) -> Path | None:
    """convert_hf_to_gguf.py inside a llama.cpp tree, a llama-cpp-python tree (vendor/llama.cpp) or a folder
    holding one of them."""
    for pattern in (CONVERTER, f"vendor/llama.cpp/{CONVERTER}", f"*/{CONVERTER}", f"*/vendor/llama.cpp/{CONVERTER}"):
        found = sorted(root.glob(pattern))
        if found:
            return found[-1]
    return None


def _unpack(archive: Path) -> Path:
    """Extract only the converter, its `conversion` package and gguf-py from a source .tar.gz, once, into
    cache_dir()/llama.cpp-<version>; returns that folder."""
    version = re.search(r"(\d+\.\d+\.\d+|b\d+)", archive.name)
    target = cache_dir() / f"llama.cpp-{version.group(1) if version else archive.name.split('.')[0]}"
    if (target / CONVERTER).is_file():
        return target
    try:
        with tarfile.open(archive) as tar:
            names = [m.name for m in tar.getmembers() if m.name.endswith("/" + CONVERTER) or m.name == CONVERTER]
            if not names:
                raise ConfigError(f"{archive} holds no {CONVERTER}: {_HOW}")
            prefix = min(names, key=len)[: -len(CONVERTER)]
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].split("/")[0] in _KEEP and (m.isfile() or m.isdir())]
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
            try:
                for m in members:
                    m.name = m.name[len(prefix):]
                tar.extractall(tmp, members=members, filter="data")
                if target.exists():  # a half-written earlier attempt
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.TarError, OSError) as exc:
        raise ConfigError(f"cannot unpack {archive} ({exc}): {_HOW}") from None
    return target


def find_converter(src: str | Path | None = None) -> Path:
    """Path of llama.cpp's convert_hf_to_gguf.py (with gguf-py beside it): `src`, else $SPARSECRAFT_LLAMA_CPP_SRC,
    else the cache. `src` may be the script, a source tree, or a source .tar.gz (unpacked once into the cache).
    Raises ConfigError saying how to get it when there is none."""
    given, where = (src, "the given path") if src is not None else (os.environ.get(SOURCE_ENV) or None, SOURCE_ENV)
    if given is not None:
        path = Path(given).expanduser()
        if not path.exists():
            raise ConfigError(f"llama.cpp source {path} ({where}) does not exist: {_HOW}")
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz", ".tar")):
            path = _unpack(path)
        script = path if path.is_file() and path.name == CONVERTER else _in_tree(path) if path.is_dir() else None
        if script is None:
            raise ConfigError(f"no {CONVERTER} in {path} ({where}): {_HOW}")
    else:
        trees = sorted(cache_dir().glob("llama.cpp-*"), key=lambda p: p.name != f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}")
        script = next((s for s in map(_in_tree, trees) if s is not None), None)
        if script is None:
            raise ConfigError(f"llama.cpp's {CONVERTER} was not found (no --llama-cpp-src, no {SOURCE_ENV}, nothing "
                              f"in {cache_dir()}): {_HOW}")
    if not (script.parent / "gguf-py" / "gguf").is_dir():
        raise ConfigError(f"{script} has no gguf-py folder beside it: pass a whole llama.cpp source tree: {_HOW}")
    return script.resolve()


def convert(model_dir: str | Path, outtype: str, out_path: str | Path, converter: str | Path | None = None) -> Path:
    """Convert the HF model directory `model_dir` (save_pretrained + tokenizer) to a GGUF file at `out_path` with
    llama.cpp's converter (`converter`: anything find_converter accepts). Pruned weights convert as a dense model,
    zeros included. Written under a temporary name, renamed when complete."""
    if outtype not in OUTTYPES:
        raise ConfigError(f"unknown GGUF outtype {outtype!r}: use one of {', '.join(OUTTYPES)}")
    model_dir, out_path = Path(model_dir).expanduser(), Path(out_path).expanduser()
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir} is not a model directory (no config.json): save the model with "
                         "save_pretrained (and its tokenizer) first")
    from ..compressed import is_compressed_dir

    if is_compressed_dir(model_dir):
        raise ModelError(f"{model_dir} is a compressed-tensors checkpoint, which llama.cpp cannot read: load it "
                         "(sparsecraft.load) and save it with save_pretrained, or convert the directory it came from")
    script = find_converter(converter)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(script.parent / "gguf-py")] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env.pop("NO_LOCAL_GGUF", None)
    cmd = [sys.executable, str(script), str(model_dir), "--outtype", outtype, "--outfile", str(tmp)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not tmp.is_file():
            lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            raise ModelError(f"llama.cpp's converter failed on {model_dir} (exit {done.returncode}): "
                             f"{lines[-1].strip() if lines else 'no output'}")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def available() -> bool:
    """Whether llama-cpp-python (and its compiled llama.cpp) can be imported."""
    try:
        _llama_cpp()
    except ConfigError:
        return False
    return True


def parse_types(text: str) -> list[str]:
    """GGUF types from a comma list ('f16,bf16,q8_0'), each checked against OUTTYPES."""
    types = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in types if t not in OUTTYPES]
    if not types or bad:
        raise ConfigError(f"GGUF types must be a comma list of {', '.join(OUTTYPES)}, got {text!r}")
    return types


def require():
    """The llama_cpp module, or a ConfigError saying how to install it."""
    return _llama_cpp()


def _llama_cpp():
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:  # OSError: the package is there but its shared library will not load
        raise ConfigError(f"llama.cpp is not usable here ({type(exc).__name__}: {exc}): run "
                          f"`pip install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}` (compiles llama.cpp; "
                          "needs a C++ compiler and cmake)") from None
    return llama_cpp


def _load(gguf_path: str | Path, threads: int, n_ctx: int, logits_all: bool, **kwargs):
    llama_cpp = _llama_cpp()
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    batch = min(n_ctx, 512)
    return llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                           n_batch=batch, n_ubatch=batch, logits_all=logits_all, verbose=False, **kwargs)


def _argmax_last(llm) -> int:
    """Greedy pick from the logits of the last evaluated token (first index of the maximum, as torch's argmax)."""
    import numpy as np

    llama_cpp = _llama_cpp()
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    return int(logits.argmax())


def _greedy(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """(ids, prefill seconds incl. the first token, seconds for the other new_tokens - 1) from an empty cache."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    out = [_argmax_last(llm)]
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval(out[-1:])
        out.append(_argmax_last(llm))
    return out, t1 - t0, time.perf_counter() - t1


def decode_speed(gguf_path: str | Path, prompt_ids, new_tokens: int, threads: int, repeats: int = 1,
                 **llama_kwargs) -> dict:
    """Greedy decode on llama.cpp: after the prompt, exactly `new_tokens` tokens by argmax of the logits (no
    sampler, no repetition penalty, no stop at end-of-sequence). Decode speed excludes the prefill: the prompt and
    the first new token are timed apart, tokens/s is over the other new_tokens - 1. One warm-up, then the best of
    `repeats` runs. `llama_kwargs` go to llama_cpp.Llama (type_k/type_v: the KV cache type, f16 by default).

    Returns {"tokens_per_s", "seconds", "prefill_s", "tokens" (the new_tokens generated ids), "threads"}; the
    caller measures peak RSS (sparsecraft.api.peak_rss_mb) since llama.cpp runs in this process."""
    prompt = [int(t) for t in (prompt_ids.reshape(-1).tolist() if hasattr(prompt_ids, "reshape") else prompt_ids)]
    if not prompt:
        raise ConfigError("decode_speed needs at least one prompt token")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 2:
        raise ConfigError(f"time at least 2 new tokens, got {new_tokens!r}")
    llm = _load(gguf_path, threads, n_ctx=len(prompt) + new_tokens, logits_all=False, **llama_kwargs)
    try:
        _greedy(llm, prompt, 2)  # warm-up
        best, best_prefill, tokens = math.inf, math.inf, None
        for _ in range(max(1, repeats)):
            tokens, prefill, seconds = _greedy(llm, prompt, new_tokens)
            best, best_prefill = min(best, seconds), min(best_prefill, prefill)
    finally:
        llm.close()
    return {"tokens_per_s": (new_tokens - 1) / max(best, 1e-9), "seconds": best, "prefill_s": best_prefill,
            "tokens": tokens, "threads": threads}


def perplexity(gguf_path: str | Path, token_ids, seqlen: int, threads: int, max_windows: int | None = None,
               **llama_kwargs) -> float:
    """llama.cpp's perplexity on the token stream `token_ids` (1-D ids, list or tensor) exactly as
    sparsecraft.evaluate scores it: non-overlapping windows of `seqlen` (data.evaluation_windows; the trailing
    partial window dropped, the first `max_windows` kept), each from an empty KV cache with no BOS added, every
    token after the first of a window predicted; exp of the mean next-token NLL over all of them."""
    import torch
    import torch.nn.functional as F

    from ..data import evaluation_windows

    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ConfigError(f"evaluation seqlen must be an integer >= 2, got {seqlen!r}")
    windows = evaluation_windows(torch.as_tensor(token_ids).reshape(-1), seqlen)
    if max_windows is not None:
        if max_windows < 1:
            raise ConfigError(f"max_windows must be >= 1, got {max_windows}")
        windows = windows[:max_windows]
    llm = _load(gguf_path, threads, n_ctx=seqlen, logits_all=True, **llama_kwargs)
    total_nll = 0.0
    try:
        for window in windows:
            ids = window.tolist()
            llm.reset()
            llm.eval(ids)
            logits = torch.from_numpy(llm.scores[: seqlen - 1].copy())
            total_nll += float(F.cross_entropy(logits, window[1:], reduction="sum"))
    finally:
        llm.close()
    return math.exp(total_nll / (len(windows) * (seqlen - 1)))


__all__ = ["LLAMA_CPP_PYTHON_VERSION", "OUTTYPES", "SOURCE_ENV", "available", "cache_dir", "convert", "parse_types",
           "require",
           "decode_speed", "find_converter", "perplexity"]
