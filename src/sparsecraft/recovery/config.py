"""FinetuneConfig: one dataclass describing a recovery fine-tuning run; it travels into the output directory
(finetune.yaml) and into every checkpoint, so a resumed run can check that it continues the same run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..errors import ConfigError
from ..patterns import Pattern, PatternSparsity, resolve_sparsity
from ..yamlconfig import YamlConfig

SCHEDULES = ("constant", "gmp", "dense")
SCORES = ("magnitude", "wanda")
LR_SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
# --distill presets -> (ce_weight, kd_weight, squarehead_weight)
DISTILL_PRESETS = {
    "none": (1.0, 0.0, 0.0),
    "kd": (1.0, 1.0, 0.0),
    "squarehead": (1.0, 1.0, 1.0),
}
# Fields that may differ between a run and its resumption (they do not change the trajectory).
RESUMABLE_CHANGES = ("progress", "checkpoint_every", "keep_checkpoints", "eval_every", "periodic_eval_windows",
                     "eval_batch_size", "eval_seqlen")


@dataclass
class FinetuneConfig(PatternSparsity, YamlConfig):
    """What to fine-tune, how long, with which losses and which sparsity schedule.

    Losses: ``ce_weight`` x causal-LM cross-entropy + ``kd_weight`` x KL(teacher || student) on the logits at
    ``temperature`` (times T^2) + ``squarehead_weight`` x SquareHead (per block MSE(student, teacher) /
    MSE(teacher, 0), summed over blocks). ``distill`` picks a preset of the three weights (none: CE only; kd:
    CE + KD; squarehead: CE + KD + SquareHead); weights given explicitly override the preset.

    Schedules: ``constant`` keeps the student's zeros as a fixed mask; ``gmp`` prunes gradually with the cubic
    schedule s_t = s_f + (s_i - s_f)(1 - (t - t0)/(T - t0))^3 every ``prune_every`` steps from ``prune_start``
    (t0) to ``prune_end`` (T, default 3/4 of ``steps``), then keeps the mask fixed.
    """

    KIND: ClassVar[str] = "finetune config"
    ALSO_ACCEPTS: ClassVar[dict[str, tuple]] = {"targets": (str,), "ignore": (str,)}

    steps: int = 200
    distill: str = "squarehead"
    ce_weight: float | None = None
    kd_weight: float | None = None
    squarehead_weight: float | None = None
    temperature: float = 1.0
    kd_chunk: int = 1024  # tokens per chunk of the logits KL (bounds the memory of the vocab-sized softmaxes)
    schedule: str = "constant"
    sparsity: float | None = None  # gmp: the final sparsity (implied by an N:M pattern)
    pattern: str = "unstructured"
    initial_sparsity: float = 0.0
    score: str = "magnitude"  # gmp mask scores: magnitude |W| (per layer) or wanda |W| * ||X|| (per row)
    prune_start: int = 0
    prune_end: int | None = None
    prune_every: int = 10
    targets: list[str] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)
    train_embeddings: bool = False
    data: str = "builtin"
    seqlen: int = 512
    batch_size: int = 2  # windows per process per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    warmup_steps: int | None = None  # default: 5% of steps
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto: bf16 on a GPU that supports it, else fp32
    seed: int = 0
    eval_every: int = 0  # held-out perplexity every this many steps (0: only before and after)
    periodic_eval_windows: int = 8  # held-out windows of each periodic evaluation
    eval_seqlen: int | None = None  # tokens per held-out window (default: seqlen)
    eval_batch_size: int = 4
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        self.check_types(self.__dict__)
        self.validate()

    @property
    def weights(self) -> tuple[float, float, float]:
        """(ce, kd, squarehead) after applying the preset and explicit overrides."""
        preset = DISTILL_PRESETS[self.distill]
        explicit = (self.ce_weight, self.kd_weight, self.squarehead_weight)
        return tuple(float(p if e is None else e) for p, e in zip(preset, explicit))

    @property
    def needs_teacher(self) -> bool:
        _, kd, sq = self.weights
        return kd > 0 or sq > 0

    @property
    def end_step(self) -> int:
        """T: the step at which gradual pruning reaches the final sparsity."""
        return self.prune_end if self.prune_end is not None else max(self.prune_start + 1, round(0.75 * self.steps))

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else round(0.05 * self.steps)

    def validate(self) -> None:
        def positive_int(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
                bound = ">= 0" if allow_zero else ">= 1"
                raise ConfigError(f"{name} must be an integer {bound}, got {value!r}")

        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise ConfigError(f"steps must be a positive integer (optimizer steps to train), got {self.steps!r}")
        for name in ("seqlen", "batch_size", "grad_accum", "prune_every", "kd_chunk", "eval_batch_size",
                     "keep_checkpoints"):
            positive_int(name)
        for name in ("eval_every", "checkpoint_every", "prune_start"):
            positive_int(name, allow_zero=True)
        positive_int("periodic_eval_windows")
        if self.eval_seqlen is not None:
            positive_int("eval_seqlen")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed {self.seed} is out of range: fine-tuning seeds torch, numpy and random, which "
                              f"take integers from 0 to {2**32 - 1}")
        if self.seqlen < 2:
            raise ConfigError(f"seqlen must be >= 2 (next-token prediction needs two tokens), got {self.seqlen}")
        if self.warmup_steps is not None:
            positive_int("warmup_steps", allow_zero=True)
        if self.distill not in DISTILL_PRESETS:
            raise ConfigError(f"unknown distill preset {self.distill!r}: use one of {', '.join(DISTILL_PRESETS)}")
        for name in ("ce_weight", "kd_weight", "squarehead_weight"):
            value = getattr(self, name)
            if value is not None and not (_finite(value) and float(value) >= 0):
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if sum(self.weights) <= 0:
            raise ConfigError("every loss weight is 0: give at least one of --ce-weight, --kd-weight, "
                              "--squarehead-weight a positive value")
        if not (_finite(self.temperature) and float(self.temperature) > 0):
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")
        if not (_finite(self.lr) and float(self.lr) > 0):
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if not (_finite(self.weight_decay) and float(self.weight_decay) >= 0):
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (_finite(self.max_grad_norm) and float(self.max_grad_norm) >= 0):
            raise ConfigError(f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr_schedule {self.lr_schedule!r}: use one of {', '.join(LR_SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}: use constant (keep the student's zeros), "
                              "gmp (gradual magnitude pruning) or dense (no mask: e.g. to adapt a teacher)")
        if self.score not in SCORES:
            raise ConfigError(f"unknown score {self.score!r}: use magnitude or wanda")
        pattern = Pattern.parse(self.pattern)
        self.pattern = str(pattern)
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{name} must be a list of regexes, got {value!r}")
            else:
                setattr(self, name, list(value))
        if self.schedule == "gmp":
            if self.sparsity is None and not pattern.is_nm:
                raise ConfigError("--schedule gmp needs --sparsity (the final fraction of zeros) or an N:M --pattern")
            self.sparsity = resolve_sparsity(pattern, self.sparsity)
            if not 0.0 <= float(self.initial_sparsity) <= self.sparsity:
                raise ConfigError(f"initial_sparsity must be in [0, {self.sparsity:g}] (the final sparsity), got "
                                  f"{self.initial_sparsity!r}")
            if self.prune_end is not None:
                positive_int("prune_end")
            if not self.prune_start < self.end_step <= self.steps:
                raise ConfigError(f"gradual pruning runs from prune_start {self.prune_start} to prune_end "
                                  f"{self.end_step}: need prune_start < prune_end <= steps ({self.steps})")
        elif self.sparsity is not None or pattern.is_nm:
            raise ConfigError("--sparsity and --pattern choose the target of --schedule gmp; with --schedule "
                              f"{self.schedule} they mean nothing (constant keeps the student's own zeros, dense "
                              "trains every weight): drop them")

    def differences(self, other: FinetuneConfig) -> list[str]:
        """Fields that differ from `other` and would change the run's trajectory."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs.get(k)]


def _finite(value) -> bool:
    try:
        return not isinstance(value, bool) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def make_config(config: FinetuneConfig | dict | str | Path | None = None, **overrides) -> FinetuneConfig:
    """A FinetuneConfig from a config, a dict or a YAML path, with keyword overrides (None = not given)."""
    return FinetuneConfig.make(config, **overrides)
