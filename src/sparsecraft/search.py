"""Per-block sparsity found by evolutionary search (after EvoPress, Sieberling et al. 2024).

1. Database: every transformer block is pruned (with the recipe's method and pattern) at each of a few
   sparsity levels around the target, from the dense model's calibration activations; the pruned weights
   are kept aside, the model is not changed.
2. Search: a candidate gives each block a level. Mutations move one step of sparsity from one block to
   another of the same size, so the parameter-weighted overall sparsity stays exactly the target. Fitness
   is the KL divergence of the candidate's next-token distribution from the dense model's on calibration
   windows. Each generation, offspring are screened on a few windows and the best few re-scored on all of
   them (multi-step selection); the best candidate so far survives. It stops when the time budget is spent.
3. The winning levels become per-layer `overrides` in a recipe, which `prune` replays like any other.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import columns, model_device, run_sequential
from .errors import ConfigError
from .models import (
    Target,
    find_blocks,
    model_logits,
    resolve_device,
    select_targets,
    set_weight_matrix,
    weight_matrix,
)
from .recipe import Recipe
from .registry import get_method
from .stats import InputStats


def parse_budget(text: str | float | int) -> float:
    """Seconds from '90', '90s', '20m', '1.5h'."""
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
        if not match:
            raise ConfigError(f"budget {text!r} is not a duration: use e.g. 90s, 20m or 1.5h")
        seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if seconds <= 0:
        raise ConfigError(f"budget must be positive, got {text!r}")
    return seconds


@dataclass
class SearchResult:
    levels: dict[int, float]  # block index -> sparsity
    fitness: float  # KL(dense || pruned) of the winner on all fitness windows
    uniform_fitness: float
    generations: int
    evaluations: int
    seconds: float
    history: list[tuple[float, float]] = field(default_factory=list)  # (elapsed s, best fitness)

    def overrides(self, blocks_name: str) -> dict[str, float]:
        prefix = re.escape(blocks_name + ".") if blocks_name else ""
        return {f"^{prefix}{index}\\.": level for index, level in sorted(self.levels.items())}


def build_database(model: nn.Module, blocks: list[nn.Module], batches: list[torch.Tensor], targets: list[Target],
                   recipe: Recipe, levels: list[float], device: torch.device, progress: bool
                   ) -> dict[tuple[str, float], torch.Tensor]:
    """Each target layer pruned at each level from the dense model's activations: {(layer, level): weight}."""
    method = get_method(recipe.method)
    pattern = recipe.parsed_pattern
    database: dict[tuple[str, float], torch.Tensor] = {}

    def on_block(index: int, block_targets: list[Target], stats: dict) -> None:
        for t in block_targets:
            dense = weight_matrix(t.module).detach().to(device, torch.float32)
            for level in levels:
                new, _ = method.prune(dense, stats.get(t.name), level, pattern, recipe)
                database[(t.name, level)] = new.to(t.module.weight.dtype).cpu()

    needs_hessian = method.needs == "hessian"
    run_sequential(model, blocks, batches, targets, lambda t: InputStats(columns(t), device, hessian=needs_hessian),
                   on_block, device, progress, modifies=False, desc="search database")
    return database


class _Fitness:
    """KL(dense || candidate) of next-token distributions on fixed windows; dense log-probs computed once."""

    def __init__(self, model: nn.Module, windows: torch.Tensor):
        self.model = model
        self.windows = windows
        self.device = model_device(model)
        with torch.no_grad():
            self.dense = [self._logprobs(w.unsqueeze(0)) for w in windows]

    def _logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        logits = model_logits(self.model, ids.to(self.device)).float()
        return F.log_softmax(logits, dim=-1)

    def __call__(self, count: int | None = None) -> float:
        total, tokens = 0.0, 0
        with torch.no_grad():
            for i, ids in enumerate(self.windows[:count]):
                lp = self._logprobs(ids.unsqueeze(0))
                ref = self.dense[i]
                total += float((ref.exp() * (ref - lp)).sum())
                tokens += ids.numel()
        return total / tokens


def search_levels(model: nn.Module, calibration: torch.Tensor, fitness_windows: torch.Tensor, recipe: Recipe,
                  budget_s: float, step: float = 0.05, max_steps: int = 3, offspring: int = 8, survivors: int = 2,
                  screen_windows: int = 1, device: str | None = None, progress: bool = True) -> SearchResult:
    """Search per-block sparsities averaging recipe.target_sparsity (weighted by block size)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    pattern = recipe.parsed_pattern
    if pattern.is_nm:
        raise ConfigError(f"search assigns a sparsity per block; pattern {pattern} fixes it: use unstructured")
    dev = resolve_device(device)
    target = recipe.target_sparsity
    levels = sorted({round(target + k * step, 6) for k in range(-max_steps, max_steps + 1)})
    if levels[0] < 0 or levels[-1] >= 1:
        raise ConfigError(f"search levels {levels[0]:.2f}..{levels[-1]:.2f} leave [0, 1): use a smaller step")
    _, blocks = find_blocks(model)
    targets = select_targets(model, recipe.targets, recipe.ignore)
    units = sorted({t.block for t in targets if t.block is not None})
    if len(units) < 2:
        raise ConfigError("search needs at least two transformer blocks with targeted layers")
    by_unit = {u: [t for t in targets if t.block == u] for u in units}
    size = {u: sum(weight_matrix(t.module).numel() for t in by_unit[u]) for u in units}
    dense_weights = {t.name: weight_matrix(t.module).detach().clone() for t in targets}
    database = build_database(model, blocks, list(calibration.split(recipe.batch_size)), targets, recipe, levels,
                              dev, progress)
    if time.perf_counter() - start >= budget_s:
        raise ConfigError(f"building the search database took {time.perf_counter() - start:.0f}s, the whole "
                          f"budget of {budget_s:.0f}s: give a larger --budget")
    fitness = _Fitness(model, fitness_windows)
    index_of = {u: levels.index(round(target, 6)) for u in units}
    applied: dict[int, int] = {}

    def apply(candidate: dict[int, int]) -> None:
        for u, k in candidate.items():
            if applied.get(u) != k:
                for t in by_unit[u]:
                    set_weight_matrix(t.module, database[(t.name, levels[k])])
                applied[u] = k

    def mutate(parent: dict[int, int], rng: random.Random) -> dict[int, int]:
        child = dict(parent)
        for _ in range(rng.randint(1, 3)):
            up, down = rng.sample(units, 2)
            if size[up] != size[down] or child[up] + 1 >= len(levels) or child[down] - 1 < 0:
                continue
            child[up] += 1
            child[down] -= 1
        return child

    rng = random.Random(recipe.seed)
    best = dict(index_of)
    try:
        apply(best)
        t0 = time.perf_counter()
        best_fit = uniform_fit = fitness()
        full = time.perf_counter() - t0
        history = [(time.perf_counter() - start, best_fit)]
        generations = evaluations = 0
        bar = tqdm(total=round(budget_s), desc="search", unit="s", disable=not progress)
        per_window = full / max(len(fitness_windows), 1)
        cost = {"screen": screen_windows * per_window, "full": full}  # worst seen so far, per evaluation kind

        def affordable(kind: str) -> bool:
            """Start an evaluation only if it ends inside the budget even if it runs 1.5x the slowest so far."""
            return time.perf_counter() - start + 1.5 * cost[kind] < budget_s

        def timed(kind: str, count: int | None) -> float:
            t = time.perf_counter()
            value = fitness(count)
            cost[kind] = max(cost[kind], time.perf_counter() - t)
            return value

        while affordable("full"):
            children = [mutate(best, rng) for _ in range(offspring)]
            children = [c for c in children if c != best]
            if not children:
                continue
            screened = []
            for child in children:
                if not affordable("screen"):
                    break
                apply(child)
                screened.append((timed("screen", screen_windows), child))
                evaluations += 1
            screened.sort(key=lambda x: x[0])
            for _, child in screened[:survivors]:
                if not affordable("full"):
                    break
                apply(child)
                score = timed("full", None)
                evaluations += 1
                if score < best_fit:
                    best, best_fit = child, score
            generations += 1
            history.append((time.perf_counter() - start, best_fit))
            bar.n = min(round(time.perf_counter() - start), bar.total)
            bar.set_postfix(kl=f"{best_fit:.4f}", gen=generations)
        bar.close()
    finally:
        for name, w in dense_weights.items():  # the model leaves the search dense, as it came
            set_weight_matrix(next(t.module for t in targets if t.name == name), w)
    result_levels = {u: levels[k] for u, k in best.items()}
    return SearchResult(result_levels, best_fit, uniform_fit, generations, evaluations,
                        time.perf_counter() - start, history)


def fitness_windows(tokenizer, recipe: Recipe, calibration_text: str | None, count: int | None = None) -> torch.Tensor:
    """`count` (default search_fitness_samples) windows drawn with seed + 1 from the calibration part of
    `search_fitness_data` (a data spec, e.g. 'manpages', the validation domain), minus every paragraph that also
    occurs in `calibration_text`: the search then prefers allocations that hold on text the calibration never saw,
    and that source's held-out split stays unseen too."""
    from .data import TextSplits, calibration_batch, load_text, tokenize
    from .domains import disjoint_from

    text = load_text(recipe.search_fitness_data).calibration
    if calibration_text:
        text = disjoint_from(TextSplits(recipe.search_fitness_data, "", text), calibration_text).evaluation
    return calibration_batch(tokenize(tokenizer, text), recipe.search_fitness_samples if count is None else count,
                             recipe.seqlen, recipe.seed + 1)


def search_recipe(model: nn.Module, tokenizer, calibration_text: str, calibration: torch.Tensor, recipe: Recipe,
                  budget_s: float, fitness_samples: int = 4, **options) -> tuple[Recipe, SearchResult]:
    """Search on `calibration` ids, scoring candidates on `fitness_samples` windows drawn (with seed + 1) from
    the calibration text; returns the recipe that replays the winner, and the search result."""
    from .data import calibration_batch, tokenize

    if recipe.search_fitness_data is not None:
        windows = fitness_windows(tokenizer, recipe, calibration_text, fitness_samples)
    else:
        windows = calibration_batch(tokenize(tokenizer, calibration_text), fitness_samples, recipe.seqlen,
                                    recipe.seed + 1)
    result = search_levels(model, calibration, windows, recipe, budget_s, **options)
    return searched_recipe(recipe, result, find_blocks(model)[0]), result


def searched_recipe(recipe: Recipe, result: SearchResult, blocks_name: str) -> Recipe:
    """The recipe that replays the search: the same method with the found per-block sparsities."""
    data = recipe.to_dict()
    data["overrides"] = {**recipe.overrides, **result.overrides(blocks_name)}
    data["allocation"] = "uniform"
    return Recipe.from_dict(data)


