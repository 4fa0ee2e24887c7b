"""One dataclass describing a pruning run; it travels into every output directory."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from .errors import ConfigError
from .patterns import Pattern, PatternSparsity, resolve_sparsity
from .yamlconfig import YamlConfig

MOE_CALIBRATIONS = ("routed", "all")
SEED_RANGE = (-(2**63), 2**64 - 2)  # torch.Generator.manual_seed's range, less one (the search draws with seed + 1)


@dataclass
class Recipe(PatternSparsity, YamlConfig):
    """What to prune, how, and with which calibration data.

    `targets`/`ignore` are regexes searched in module names (e.g. ``mlp``, ``lm_head``); the default
    targets are the Linear/Conv1D layers inside the model's repeated transformer blocks. `allocation`
    spreads the sparsity over layers (OWL keeps the overall value exact); `overrides` then pin layers
    matching a regex to a sparsity; `refine` improves each layer's mask after the method (DSnoT).
    """

    KIND: ClassVar[str] = "recipe"
    ALSO_ACCEPTS: ClassVar[dict[str, tuple]] = {"refine": (str, type(None)), "targets": (str,), "ignore": (str,),
                                                "search_budget": (int, float)}

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
    allocation: str = "uniform"  # uniform | owl | search (replaced by the found per-block overrides when run)
    owl_lambda: float = 0.08
    owl_m: float = 5.0
    overrides: dict[str, float] = field(default_factory=dict)  # {layer-name regex: sparsity}
    refine: list[str] = field(default_factory=list)  # refinements in order: dsnot, refit
    dense_targets: bool = False  # reconstruct towards the dense model's outputs (needs a second stream)
    dsnot_cycles: int = 50
    dsnot_threshold: float = 0.1
    refit_ridge: float = 0.0  # refit: pull towards the one-shot weights, x mean diag(H) (refine/refit.py)
    refit_shrink: float = 0.0  # refit: Hessian off-diagonals scaled by 1 - this (shrinkage towards the diagonal)
    refit_iters: int = 50  # refit: conjugate-gradient steps
    refit_damp: float | None = None  # refit's own dampening (None: damp)
    permute: bool = False  # N:M only: input-channel permutation folded into producer layers (permute.py)
    search_budget: str = "20m"  # allocation=search: wall time for database + evolution (90s, 20m, 1h)
    search_step: float = 0.05  # sparsity step between a block's levels
    search_max_steps: int = 3  # levels on each side of the target sparsity
    search_fitness_samples: int = 4  # calibration windows scoring each candidate (KL to the dense model)
    search_offspring: int = 8  # candidates per generation
    search_fitness_data: str | None = None  # where the fitness windows come from (None: the calibration text;
    # e.g. 'manpages', the validation domain: that source's calibration part, so its held-out split stays unseen)
    moe_calibration: str = "routed"  # MoE experts' statistics: routed (the tokens the router sends) or all tokens

    def __post_init__(self) -> None:
        self.check_types(self.__dict__)
        self.validate()

    @property
    def needs_data(self) -> bool:
        """Whether any step (method, refinement, allocation) needs calibration data."""
        from .registry import get_method

        return (get_method(self.method).needs_data or bool(self.refine) or self.allocation != "uniform"
                or self.dense_targets)

    def validate(self) -> None:
        from .allocation import ALLOCATIONS
        from .patterns import check_sparsity
        from .registry import get_method, get_refiner

        get_method(self.method)
        if self.refine in (None, "none", ""):
            self.refine = []
        elif isinstance(self.refine, str):
            self.refine = [r.strip() for r in self.refine.split(",") if r.strip() not in ("", "none")]
        self.refine = list(self.refine)
        for name in self.refine:
            get_refiner(name)
        self.dense_targets = bool(self.dense_targets)
        pattern = Pattern.parse(self.pattern)
        self.pattern = str(pattern)
        if self.sparsity is None and not pattern.is_nm:
            self.sparsity = 0.5
        self.sparsity = resolve_sparsity(pattern, self.sparsity)
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"unknown allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
        if pattern.is_nm and (self.allocation != "uniform" or self.overrides):
            raise ConfigError(f"pattern {pattern} fixes every layer's sparsity: per-layer allocation and "
                              "overrides need --pattern unstructured")
        self.permute = bool(self.permute)
        if self.moe_calibration not in MOE_CALIBRATIONS:
            raise ConfigError(f"unknown moe_calibration {self.moe_calibration!r}: choose routed (each expert's "
                              "statistics from the tokens routed to it) or all (every calibration token)")
        if self.permute and not pattern.is_nm:
            raise ConfigError("permute reorders input channels so an N:M mask keeps more; it needs an N:M "
                              "--pattern such as 2:4 (unstructured masks do not depend on channel order)")
        if self.allocation == "search":
            from .search import parse_budget

            parse_budget(self.search_budget)
        self.search_budget = str(self.search_budget)
        if not 0.0 < float(self.search_step) < 1.0:
            raise ConfigError(f"search_step must be in (0, 1), got {self.search_step}")
        if not 0.0 <= float(self.owl_lambda) < 0.5:
            raise ConfigError(f"owl_lambda must be in [0, 0.5), got {self.owl_lambda}")
        if not float(self.owl_m) > 0:
            raise ConfigError(f"owl_m (outlier threshold, x mean score) must be > 0, got {self.owl_m}")
        if not isinstance(self.overrides, dict):
            raise ConfigError(f"overrides must map layer-name regexes to sparsities, got {self.overrides!r}")
        self.overrides = {str(k): check_sparsity(v) for k, v in self.overrides.items()}
        if isinstance(self.dsnot_cycles, bool) or not isinstance(self.dsnot_cycles, int) or self.dsnot_cycles < 0:
            raise ConfigError(f"dsnot_cycles must be a non-negative integer, got {self.dsnot_cycles!r}")
        if not float(self.dsnot_threshold) >= 0:
            raise ConfigError(f"dsnot_threshold must be >= 0, got {self.dsnot_threshold}")
        if not float(self.refit_ridge) >= 0:
            raise ConfigError(f"refit_ridge must be >= 0, got {self.refit_ridge}")
        if not 0.0 <= float(self.refit_shrink) <= 1.0:
            raise ConfigError(f"refit_shrink must be in [0, 1] (share of the Hessian's off-diagonal removed), got "
                              f"{self.refit_shrink}")
        if self.refit_damp is not None and not 0.0 <= float(self.refit_damp) < 1.0:
            raise ConfigError(f"refit_damp must be in [0, 1) (fraction of the mean Hessian diagonal), got "
                              f"{self.refit_damp}")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ConfigError(f"seed {self.seed} is out of range: torch takes seeds from {SEED_RANGE[0]} to "
                              f"{SEED_RANGE[1]} (seed + 1 draws the search's windows)")
        for name in ("nsamples", "seqlen", "batch_size", "blocksize", "search_max_steps", "search_fitness_samples",
                     "search_offspring", "refit_iters"):
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
        for regex in [*self.targets, *self.ignore, *self.overrides]:
            try:
                re.compile(regex)
            except re.error as exc:
                raise ConfigError(f"invalid regex {regex!r} in targets/ignore/overrides: {exc}") from None
