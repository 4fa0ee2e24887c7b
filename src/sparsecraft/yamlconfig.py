"""One YAML round trip for the configuration dataclasses (Recipe, FinetuneConfig), typed field by field.

Every value is checked against its dataclass field's type (`typing.get_type_hints`) before the dataclass's own
`validate` runs, so a wrong type is one message naming the file, the key and the type expected; floats must be
finite. `ALSO_ACCEPTS` lists the looser forms a field takes on purpose (a comma-separated string for a list, ...).
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError


def _describe(tp) -> str:
    """`tp` in words, for messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict:
        return f"a mapping of {_describe(args[0])[2:]}s to {_describe(args[1]).removeprefix('a ')}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _matches(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin in (list, tuple):
        return isinstance(value, list | tuple) and all(_matches(v, args[0]) for v in value) if args else \
            isinstance(value, list | tuple)
    if origin is dict:  # keys are names or regexes: any scalar is taken as its text
        return isinstance(value, dict) and all(isinstance(k, str | int | float) and not isinstance(k, bool)
                                               and _matches(v, args[1]) for k, v in value.items())
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _nonfinite(value) -> bool:
    """A NaN/inf float, itself or directly inside a list or mapping (not deeper: YAML aliases can nest a document
    exponentially)."""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else [value]
    return any(isinstance(v, float) and not math.isfinite(v) for v in list(items)[:1000])


def _short_repr(value) -> str:
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 2, 40, 40
    text = short.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class YamlConfig:
    """Mixin for a dataclass: dict and YAML round trips that refuse unknown keys and values of the wrong type, and
    `make` (config, dict or YAML path, plus keyword overrides where None means "not given")."""

    KIND: ClassVar[str] = "config"  # how error messages name it
    ALSO_ACCEPTS: ClassVar[dict[str, tuple]] = {}  # field -> further types it takes (and converts) on purpose

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def check_types(cls, data: dict, source: str | None = None) -> None:
        """Refuse any value whose type is not its field's (`source` names the file in the message)."""
        hints = typing.get_type_hints(cls)
        where = source or cls.KIND
        for name, value in data.items():
            tp = hints.get(name)
            if tp is None or _matches(value, tp):
                continue
            extra = cls.ALSO_ACCEPTS.get(name, ())
            if any(_matches(value, t) for t in extra):
                continue
            expected = " or ".join([_describe(tp), *(_describe(t) for t in extra)])
            shown = _short_repr(value)
            what = "not finite" if _nonfinite(value) else type(value).__name__
            raise ConfigError(f"{where}: key {name!r} must be {expected}, got {shown} ({what})")

    @classmethod
    def from_dict(cls, data: dict, source: str | None = None) -> Any:
        if not isinstance(data, dict):
            raise ConfigError(f"{source or cls.KIND} must be a mapping of keys to values, got "
                              f"{type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}unknown {cls.KIND} keys {unknown}; known keys are {sorted(known)}")
        cls.check_types(data, source)
        return cls(**data)

    def to_yaml_text(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml_text())

    @classmethod
    def read_yaml(cls, path: str | Path) -> dict:
        """The mapping in a YAML file, or a one-line error naming the file: missing, unreadable, not UTF-8, not
        YAML, or not a mapping."""
        import yaml

        path = Path(path).expanduser()
        name = f"{cls.KIND} file {path}"
        if not path.is_file():
            raise ConfigError(f"{name} does not exist" + (" (it is a directory)" if path.is_dir() else ""))
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{name} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
        except OSError as exc:
            raise ConfigError(f"{name} cannot be read ({exc.strerror})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(f"{name} is not valid YAML{at}: {problem}") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ConfigError(f"{name} must be a YAML mapping of keys to values (key: value per line), got a "
                              f"{type(data).__name__}")
        return data

    @classmethod
    def from_yaml(cls, path: str | Path) -> Any:
        return cls.from_dict(cls.read_yaml(path), source=f"{cls.KIND} file {Path(path).expanduser()}")

    @classmethod
    def make(cls, config=None, **overrides) -> Any:
        if config is None:
            base = {}
        elif isinstance(config, cls):
            base = config.to_dict()
        elif isinstance(config, dict):
            base = dict(config)
        else:
            base = cls.from_yaml(config).to_dict()
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(base)
