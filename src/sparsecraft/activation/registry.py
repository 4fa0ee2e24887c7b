"""The one list of activation-sparsity methods; the CLI, the API and the benchmark all read it.

A method is a function from a block's layout to the sites it thresholds (see sites.py); calibration, allocation,
hooks and storage are shared. Register one with `@register(name, gated=..., summary=...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError

SitesFn = Callable[..., list]


@dataclass(frozen=True)
class ActivationMethod:
    name: str
    sites: SitesFn  # (BlockLayout) -> list[Site]
    gated: bool  # needs a gated MLP (SiLU(gate(x)) * up(x))
    summary: str


METHODS: dict[str, ActivationMethod] = {}


def register(name: str, gated: bool, summary: str) -> Callable[[SitesFn], SitesFn]:
    def wrap(fn: SitesFn) -> SitesFn:
        METHODS[name] = ActivationMethod(name, fn, gated, summary)
        return fn

    return wrap


def _load() -> None:
    from . import cats, chess, teal, wina  # noqa: F401


def get_method(name: str) -> ActivationMethod:
    _load()
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown activation method {name!r}: choose one of {', '.join(sorted(METHODS))}") from None


def method_names() -> list[str]:
    _load()
    return sorted(METHODS)


def gated_methods() -> list[str]:
    _load()
    return sorted(n for n, m in METHODS.items() if m.gated)


def ungated_methods() -> list[str]:
    _load()
    return sorted(n for n, m in METHODS.items() if not m.gated)
