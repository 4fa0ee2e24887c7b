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

# (weight [out, in] float32, InputStats or None, sparsity, pattern, recipe) -> (new weight, keep mask)
PruneFn = Callable[[torch.Tensor, object, float, "Pattern", "Recipe"], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    name: str
    prune: PruneFn
    needs: str  # "weights" (data-free), "norms" (input moments) or "hessian" (also X^T X)
    summary: str

    @property
    def needs_data(self) -> bool:
        return self.needs != "weights"


METHODS: dict[str, Method] = {}


NEEDS = ("weights", "norms", "hessian")


def register(name: str, needs: str, summary: str) -> Callable[[PruneFn], PruneFn]:
    assert needs in NEEDS, needs

    def wrap(fn: PruneFn) -> PruneFn:
        METHODS[name] = Method(name, fn, needs, summary)
        return fn

    return wrap


RefineFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Refiner:
    """Training-free mask refinement applied after a method: (dense W, pruned W, keep, stats, sparsity,
    pattern, recipe) -> (new W, new keep), preserving the pattern."""

    name: str
    refine: RefineFn
    needs: str
    summary: str


REFINERS: dict[str, Refiner] = {}


def register_refiner(name: str, needs: str, summary: str) -> Callable[[RefineFn], RefineFn]:
    assert needs in NEEDS, needs

    def wrap(fn: RefineFn) -> RefineFn:
        REFINERS[name] = Refiner(name, fn, needs, summary)
        return fn

    return wrap


def get_refiner(name: str) -> Refiner:
    _load_builtin_methods()
    try:
        return REFINERS[name]
    except KeyError:
        raise ConfigError(f"unknown refinement {name!r}: choose from {', '.join(sorted(REFINERS))}") from None


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
    from .criteria import magnitude, ria, wanda  # noqa: F401
    from .refine import dsnot, refit  # noqa: F401
    from .solvers import sparsegpt  # noqa: F401
