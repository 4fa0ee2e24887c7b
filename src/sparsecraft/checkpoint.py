"""Saving and loading pruned models: a plain `save_pretrained` directory plus `sparsecraft.json`.

Writes go to a hidden temporary directory next to the target (`.NAME.tmp-PID-...`) and are renamed into place at the
end, so an interrupted run never leaves a half-written model; the rename itself runs with SIGINT/SIGTERM/SIGHUP held
back. Temporaries that a killed run (SIGKILL, power loss) left beside an output are removed by the next run on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import warnings
from pathlib import Path

from torch import nn

from .errors import ModelError, OutputError
from .moe import experts_merged

METADATA_FILE = "sparsecraft.json"
RECIPE_FILE = "recipe.yaml"
TEMP_NAME_SPARE = 32  # characters the hidden temporary name adds to the output's name (".", ".tmp-PID-xxxxxxxx")
WRITTEN: list[Path] = []  # outputs renamed into place by this process (the CLI's interruption message names them)
_HELD_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


def check_writable(path: str | Path, what: str = "output", *, create_parents: bool = False) -> Path:
    """Fail before any work when `path` could not be written: an illegal or too long name, a dangling symlink, a
    parent that is missing (unless `create_parents`), not a directory, or not writable. `what` names the input in
    the message (e.g. "--out")."""
    text = str(path)
    if not text.strip():
        raise OutputError(f"{what} is empty: pass a path")
    if "\x00" in text:
        raise OutputError(f"{what} {text!r} contains a NUL byte: pass a legal path")
    path = Path(text).expanduser()
    if path.name in ("", ".", ".."):
        raise OutputError(f"{what} {text!r} names no file or directory: pass a path ending in a name")
    if path.is_symlink() and not path.exists():
        raise OutputError(f"{what} {path} is a symlink to {os.readlink(path)}, which does not exist: remove the "
                          "link or choose another path")
    parent = path.parent
    if not parent.exists():
        if not create_parents:
            raise OutputError(f"{what} {path}: directory {parent} does not exist: create it first (mkdir -p "
                              f"{parent}) or choose another path")
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{what} {path}: {parent} is not a directory: choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: directory {parent} is not writable: choose another path")
    limit = _name_max(parent)
    if len(path.name.encode("utf-8", "surrogateescape")) + TEMP_NAME_SPARE > limit:
        raise OutputError(f"{what} name {path.name[:40]}... is {len(path.name)} characters, too long for this file "
                          f"system (at most {limit - TEMP_NAME_SPARE} here): choose a shorter name")
    return path


def check_output(path: str | Path, force: bool, *, what: str = "output", create_parents: bool = True) -> Path:
    """Fail early when the output directory `path` exists and may not be replaced, or could not be written (see
    check_writable); remove temporaries that killed runs left beside it."""
    path = check_writable(path, what, create_parents=create_parents)
    if path.exists() and not force:
        raise OutputError(f"{what} {path} already exists: choose another --out or pass --force to replace it")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} exists and is not a directory: choose another --out")
    clean_stale(path)
    return path


def check_output_file(path: str | Path, what: str, *, create_parents: bool = False) -> Path:
    """Fail before any work when the output file `path` (--json, --html, ...) could not be written."""
    path = check_writable(path, what, create_parents=create_parents)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a directory: pass a file name")
    clean_stale(path)
    return path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process
    return True


def clean_stale(path: Path) -> list[Path]:
    """Remove the hidden temporaries (`.NAME.tmp-PID-*`, `.NAME.old-PID-*`) that runs killed before they could clean
    up left beside `path`; a run still alive keeps its own. An `.old-` directory holding the only copy of `path` (a
    --force replacement killed between its two renames) is moved back to `path` instead. Returns what was removed."""
    parent = path.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|old)-(\d+)?")
    removed, restored = [], None
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or (match.group(2) and _alive(int(match.group(2)))):
            continue
        kept = entry / "replaced"
        if match.group(1) == "old" and not path.exists() and kept.exists():
            with contextlib.suppress(OSError):
                os.replace(kept, path)
                restored = entry
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    if restored is not None:
        warnings.warn(f"restored {path} from {restored.name}, where a run killed while replacing it (--force) had "
                      "left it", UserWarning, stacklevel=2)
    if removed:
        names = ", ".join(p.name for p in removed[:3]) + (", ..." if len(removed) > 3 else "")
        warnings.warn(f"removed {len(removed)} temporary output(s) left beside {path} by an earlier run that was "
                      f"killed ({names})", UserWarning, stacklevel=2)
    return removed


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT/SIGTERM/SIGHUP back while the block runs (they are delivered when it ends), so that renaming an
    output into place and cleaning up after a failure are never cut in half."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def atomic_directory(path: Path, write) -> None:
    """Call `write(tmp_dir)`, then move tmp_dir to `path` (replacing an existing directory only once the new one is
    complete)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like a normal directory
    try:
        write(tmp)
        with signals_held():
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{os.getpid()}-", dir=path.parent))
                os.replace(path, old / "replaced")
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.replace(old / "replaced", path)  # put the original back
                    raise
                finally:
                    shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
            WRITTEN.append(path)
    except BaseException:
        with signals_held():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it over `path` (never a half-written file)."""
    path = Path(path).expanduser()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        with signals_held():
            os.replace(tmp, path)
            WRITTEN.append(path)
    finally:
        with signals_held():
            tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def save_model(model: nn.Module, path: str | Path, tokenizer=None, metadata: dict | None = None,
               force: bool = False, files: dict[str, str | bytes] | None = None) -> Path:
    """Save `model` (safetensors), its tokenizer, `metadata` (as sparsecraft.json) and extra `files` (text or bytes)
    atomically."""
    path = check_output(path, force)

    def write(tmp: Path) -> None:
        with experts_merged(model):  # MoE experts split into linear layers go back to the model's own format
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / METADATA_FILE, metadata or {})
        for name, content in (files or {}).items():  # text or bytes; a name may have a subdirectory
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content)

    atomic_directory(path, write)
    return path


def read_metadata(path: str | Path) -> dict:
    file = Path(path) / METADATA_FILE
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{file} is not valid JSON ({exc}); re-create it with sparsecraft prune") from None
    if not isinstance(data, dict):
        raise ModelError(f"{file} holds a JSON {type(data).__name__}, not an object: it is not sparsecraft's "
                         "metadata; re-create it with sparsecraft prune (or remove it)")
    for key in ("recipe", "layers", "evaluation", "finetune", "search"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ModelError(f"{file}: {key!r} is a {type(data[key]).__name__}, not an object: the file was damaged; "
                             "re-create it with sparsecraft prune (or remove it)")
    layers = data.get("layers") or {}
    if not all(isinstance(v, dict) for v in layers.values()):
        raise ModelError(f"{file}: every entry of 'layers' must be an object: the file was damaged; re-create it "
                         "with sparsecraft prune (or remove it)")
    return data
