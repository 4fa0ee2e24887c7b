"""Sparsity patterns and exact masks from importance scores.

Masks are *keep* masks: True marks a weight that survives. N:M follows NVIDIA's convention:
N weights are kept in every group of M consecutive input columns, so 2:4 is 50% sparse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import ConfigError

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """`unstructured` (n = m = None) or N:M (keep n of every m consecutive inputs)."""

    n: int | None = None
    m: int | None = None

    @classmethod
    def parse(cls, text: str | Pattern | None) -> Pattern:
        if isinstance(text, Pattern):
            return text
        if text is None or str(text).strip().lower() in ("", "unstructured", "none"):
            return cls()
        match = _NM.match(str(text))
        if not match:
            raise ConfigError(
                f"unknown pattern {text!r}: use 'unstructured' or 'N:M' such as '2:4' or '4:8'"
            )
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ConfigError(
                f"impossible pattern {text!r}: N:M keeps N of every M weights and needs 0 < N < M "
                "(for example 2:4)"
            )
        return cls(n, m)

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def nm_sparsity(self) -> float:
        """The fraction of zeros the N:M pattern implies."""
        assert self.is_nm
        return (self.m - self.n) / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def check_sparsity(sparsity: float) -> float:
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ConfigError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1) (the fraction of zeros), got {value}")
    return value


def resolve_sparsity(pattern: Pattern, sparsity: float | None) -> float:
    """The sparsity a recipe asks for, checked against what the pattern can express."""
    if not pattern.is_nm:
        if sparsity is None:
            raise ConfigError("unstructured pruning needs --sparsity (a fraction of zeros in [0, 1))")
        return check_sparsity(sparsity)
    implied = pattern.nm_sparsity
    if sparsity is not None and abs(check_sparsity(sparsity) - implied) > 1e-9:
        raise ConfigError(
            f"pattern {pattern} always gives sparsity {implied:g}, not {float(sparsity):g}: "
            f"drop --sparsity or set it to {implied:g}"
        )
    return implied


class PatternSparsity:
    """For configs with `pattern` (a pattern string) and `sparsity` (None for N:M) fields: the parsed pattern and
    the fraction of zeros it asks for. Shared by Recipe and FinetuneConfig."""

    @property
    def parsed_pattern(self) -> Pattern:
        return Pattern.parse(self.pattern)

    @property
    def target_sparsity(self) -> float:
        return resolve_sparsity(self.parsed_pattern, self.sparsity)


def prune_count(total: int, sparsity: float) -> int:
    """Number of weights to remove out of `total` (floored, as the reference implementations do)."""
    return int(total * sparsity + 1e-9)


def keep_lowest_pruned(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep mask over the last dim that removes exactly `count` lowest-score entries per row."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count > 0:
        idx = torch.topk(scores, count, dim=-1, largest=False, sorted=False).indices
        keep.scatter_(-1, idx, False)
    return keep


def check_columns(columns: int, pattern: Pattern, layer: str = "a layer") -> None:
    """N:M groups must tile the input dimension exactly."""
    if pattern.is_nm and columns % pattern.m:
        raise ConfigError(
            f"{layer} has {columns} input columns, not a multiple of {pattern.m}, so it cannot take "
            f"pattern {pattern}; exclude it with --ignore"
        )


def nm_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep the n highest scores in every group of m consecutive columns of a 2-D score matrix."""
    rows, cols = scores.shape
    check_columns(cols, pattern)
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)
    return keep_lowest_pruned(groups, pattern.m - pattern.n).reshape(rows, cols)


def mask_from_scores(
    scores: torch.Tensor, sparsity: float, pattern: Pattern, scope: str = "row"
) -> torch.Tensor:
    """Exact keep mask: N:M per group, else the lowest `sparsity` fraction per row or per layer."""
    if pattern.is_nm:
        return nm_mask(scores, pattern)
    if scope == "row":
        return keep_lowest_pruned(scores, prune_count(scores.shape[1], sparsity))
    if scope == "layer":
        flat = scores.reshape(1, -1)
        return keep_lowest_pruned(flat, prune_count(flat.shape[1], sparsity)).reshape(scores.shape)
    raise ConfigError(f"unknown comparison scope {scope!r}: use 'row' or 'layer'")


def nm_violation(weight: torch.Tensor, pattern: Pattern) -> str | None:
    """Why `weight` [rows, cols] is not N:M along its columns (the first offending group), or None when it is."""
    rows, cols = weight.shape
    n, m = pattern.n, pattern.m
    if cols % m:
        return f"has {cols} input columns, not a multiple of {m}"
    over = (weight.detach().reshape(rows, cols // m, m) != 0).sum(-1) > n
    if not bool(over.any()):
        return None
    row, group = (int(v) for v in over.nonzero()[0])
    kept = int((weight[row, group * m:(group + 1) * m] != 0).sum())
    return (f"keeps {kept} of the {m} weights in columns {group * m}-{group * m + m - 1} of row {row} "
            f"({int(over.sum())} such groups)")


def is_nm_valid(weight: torch.Tensor, pattern: Pattern) -> bool:
    """True when every group of m consecutive inputs has at most n non-zeros."""
    return nm_violation(weight, pattern) is None
