"""One YAML round trip for the configuration dataclasses (Recipe, FinetuneConfig)."""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError


class YamlConfig:
    """Mixin for a dataclass: dict and YAML round trips that refuse unknown keys, and `make` (config, dict or YAML
    path, plus keyword overrides where None means "not given")."""

    KIND: ClassVar[str] = "config"  # how error messages name it

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Any:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.KIND} keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def to_yaml_text(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml_text())

    @classmethod
    def from_yaml(cls, path: str | Path) -> Any:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{cls.KIND} file {path} does not exist")
        return cls.from_dict(yaml.safe_load(path.read_text()) or {})

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
