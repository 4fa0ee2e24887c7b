"""The one list of pruning methods; the CLI, recipes and API all read it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import ConfigError

if TYPE_CHECKING:
    from .patterns import Pattern
    from .recipe import Recipe

# (weight [out, in] float32, statistics or None, sparsity, pattern, recipe) -> (new weight, keep mask)
PruneFn = Callable[[torch.Tensor, object, float, "Pattern", "Recipe"], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    name: str
    prune: PruneFn
    statistics: type | None  # collector class fed with the layer's inputs, or None for data-free methods
    summary: str


METHODS: dict[str, Method] = {}


def register(name: str, statistics: type | None, summary: str) -> Callable[[PruneFn], PruneFn]:
    def wrap(fn: PruneFn) -> PruneFn:
        METHODS[name] = Method(name, fn, statistics, summary)
        return fn

    return wrap


def get_method(name: str) -> Method:
    _load_builtin_methods()
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(sorted(METHODS))}") from None


def method_names() -> list[str]:
    _load_builtin_methods()
    return sorted(METHODS)


def _load_builtin_methods() -> None:
    from .criteria import magnitude, wanda  # noqa: F401
    from .solvers import sparsegpt  # noqa: F401
