"""Saving and loading pruned models: a plain `save_pretrained` directory plus `sparsecraft.json`.

Writes go to a hidden temporary directory next to the target and are renamed into place at the end,
so an interrupted run never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from .errors import ModelError, OutputError
from .moe import experts_merged

METADATA_FILE = "sparsecraft.json"
RECIPE_FILE = "recipe.yaml"


def check_output(path: str | Path, force: bool) -> Path:
    """Fail early when `path` exists and may not be replaced."""
    path = Path(path).expanduser()
    if path.exists() and not force:
        raise OutputError(f"output {path} already exists: choose another --out or pass --force to replace it")
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a directory: choose another --out")
    return path


def atomic_directory(path: Path, write) -> None:
    """Call `write(tmp_dir)`, then move tmp_dir to `path` (replacing an existing directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should look like a normal directory
    try:
        write(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it over `path` (never a half-written file)."""
    path = Path(path).expanduser()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def save_model(model: nn.Module, path: str | Path, tokenizer=None, metadata: dict | None = None,
               force: bool = False, files: dict[str, str] | None = None) -> Path:
    """Save `model` (safetensors), its tokenizer, `metadata` (as sparsecraft.json) and extra text `files`
    atomically."""
    path = check_output(path, force)

    def write(tmp: Path) -> None:
        with experts_merged(model):  # MoE experts split into linear layers go back to the model's own format
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / METADATA_FILE, metadata or {})
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)

    atomic_directory(path, write)
    return path


def read_metadata(path: str | Path) -> dict:
    file = Path(path) / METADATA_FILE
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{file} is not valid JSON ({exc}); re-create it with sparsecraft prune") from None
