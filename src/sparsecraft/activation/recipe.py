"""The settings of one activation-sparsity calibration, as a YAML-able dataclass stored in sparsecraft.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from ..recipe import SEED_RANGE
from ..yamlconfig import YamlConfig
from .hooks import POLICIES

ALLOCATIONS = ("uniform", "greedy")


@dataclass
class ActivationRecipe(YamlConfig):
    """`sparsity`: the share of activations zeroed, weighted by the weight bytes the zeros let a kernel skip.
    `policy`: 'all' sparsifies every token (what `eval` measures), 'decode' only single-token forwards."""

    KIND: ClassVar[str] = "activation recipe"

    method: str = "teal"
    sparsity: float = 0.4
    allocation: str = "uniform"
    data: str = "builtin"
    nsamples: int = 16
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 4
    greedy_step: float = 0.1
    greedy_samples: int = 1
    policy: str = "all"

    def __post_init__(self) -> None:
        self.check_types(self.__dict__)
        self.validate()

    def validate(self) -> None:
        from .registry import get_method

        get_method(self.method)
        s = float(self.sparsity)
        if not 0.0 <= s < 1.0:
            raise ConfigError(f"activation sparsity must be in [0, 1) (the share of activations zeroed), got "
                              f"{self.sparsity}: pass e.g. --sparsity 0.4")
        self.sparsity = s
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"unknown activation allocation {self.allocation!r}: choose one of "
                              f"{', '.join(ALLOCATIONS)}")
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}: choose all (every token sparsified) or decode "
                              "(single-token forwards only; prefill dense)")
        if not 0.0 < float(self.greedy_step) < 1.0:
            raise ConfigError(f"greedy_step must be in (0, 1), got {self.greedy_step}")
        for name in ("nsamples", "seqlen", "batch_size", "greedy_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ConfigError(f"seed {self.seed} is out of range {SEED_RANGE[0]} to {SEED_RANGE[1]}")
