"""Argument types and checks shared by the command-line parsers: every number a flag takes is finite, and every
output path is checked before any work (see checkpoint.check_writable)."""

from __future__ import annotations

import argparse
import math

from .errors import ConfigError

TORCH_SEED_MIN, TORCH_SEED_MAX = -(2**63), 2**64 - 1


def finite_float(text: str) -> float:
    """argparse `type=` for a float flag: NaN and infinities mean nothing to any sparsecraft setting."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def check_positive(flag: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{flag} must be >= {minimum}, got {value}")


def check_seed(flag: str, value: int | None, low: int = TORCH_SEED_MIN, high: int = TORCH_SEED_MAX) -> None:
    if value is not None and not low <= value <= high:
        raise ConfigError(f"{flag} {value} is out of range: a seed is an integer from {low} to {high}")


# Sane bounds on the size of a run; --allow-large lifts them.
MAX_SWEEP_ROWS = 100
MAX_SEARCH_STEPS = 20  # levels on each side of the target
MAX_SEARCH_OFFSPRING = 1000
MAX_SEARCH_FITNESS_SAMPLES = 1024
MAX_SEARCH_BUDGET_S = 24 * 3600


def check_eval_args(args) -> None:
    """--eval-batch-size and --max-eval-windows, before any model is loaded."""
    check_positive("--eval-batch-size", getattr(args, "eval_batch_size", None))
    check_positive("--max-eval-windows", getattr(args, "max_eval_windows", None))


def check_search_size(recipe, allow_large: bool) -> None:
    """An evolutionary search (allocation=search) far beyond sane bounds is refused unless --allow-large."""
    if recipe.allocation != "search" or allow_large:
        return
    from .search import parse_budget

    hint = "; pass --allow-large to run it anyway"
    checks = (("--max-steps (search_max_steps)", recipe.search_max_steps, MAX_SEARCH_STEPS),
              ("--offspring (search_offspring)", recipe.search_offspring, MAX_SEARCH_OFFSPRING),
              ("--fitness-samples (search_fitness_samples)", recipe.search_fitness_samples,
               MAX_SEARCH_FITNESS_SAMPLES))
    for flag, value, bound in checks:
        if value > bound:
            raise ConfigError(f"{flag} {value} is beyond the sane bound of {bound}{hint}")
    budget = parse_budget(recipe.search_budget)
    if budget > MAX_SEARCH_BUDGET_S:
        raise ConfigError(f"search budget {recipe.search_budget} ({budget / 3600:.0f} h) is beyond the sane bound of "
                          f"{MAX_SEARCH_BUDGET_S // 3600} h{hint}")


def check_sweep_size(count: int, allow_large: bool) -> None:
    if count > MAX_SWEEP_ROWS and not allow_large:
        raise ConfigError(f"the sweep plans {count} rows (each a full prune and evaluation), beyond the sane bound of "
                          f"{MAX_SWEEP_ROWS}: use a coarser --sparsities step or fewer --methods, or pass "
                          "--allow-large")
