"""One dataclass describing a pruning run; it travels into every output directory."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import ConfigError
from .patterns import Pattern, resolve_sparsity


@dataclass
class Recipe:
    """What to prune, how, and with which calibration data.

    `targets`/`ignore` are regexes searched in module names (e.g. ``mlp``, ``lm_head``); the default
    targets are the Linear/Conv1D layers inside the model's repeated transformer blocks.
    """

    method: str = "wanda"
    sparsity: float | None = None  # None: implied by an N:M pattern, else 0.5
    pattern: str = "unstructured"
    targets: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    data: str = "builtin"
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    damp: float = 0.01
    blocksize: int = 128

    def __post_init__(self) -> None:
        self.validate()

    @property
    def parsed_pattern(self) -> Pattern:
        return Pattern.parse(self.pattern)

    @property
    def target_sparsity(self) -> float:
        return resolve_sparsity(self.parsed_pattern, self.sparsity)

    def validate(self) -> None:
        from .registry import get_method

        get_method(self.method)
        pattern = Pattern.parse(self.pattern)
        self.pattern = str(pattern)
        if self.sparsity is None and not pattern.is_nm:
            self.sparsity = 0.5
        self.sparsity = resolve_sparsity(pattern, self.sparsity)
        for name in ("nsamples", "seqlen", "batch_size", "blocksize"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= float(self.damp) < 1.0:
            raise ConfigError(f"damp must be in [0, 1) (fraction of the mean Hessian diagonal), got {self.damp}")
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must be a list of regexes, got {value!r}")
            else:
                setattr(self, name, list(value))
        for regex in [*self.targets, *self.ignore]:
            try:
                re.compile(regex)
            except re.error as exc:
                raise ConfigError(f"invalid regex {regex!r} in targets/ignore: {exc}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown recipe keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def to_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist")
        return cls.from_dict(yaml.safe_load(path.read_text()) or {})
