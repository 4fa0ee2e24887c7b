"""One-shot pruning of a model: pick targets, allocate sparsity, calibrate block by block, prune and refine."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from . import permute
from .allocation import apply_overrides, owl, uniform
from .calibrate import columns, run_sequential
from .errors import ConfigError, DataError
from .models import (
    Target,
    find_blocks,
    resolve_device,
    select_targets,
    set_weight_matrix,
    unprunable_weights,
    weight_matrix,
)
from .moe import calibrating_all_experts, experts_split
from .patterns import check_columns
from .recipe import Recipe
from .registry import get_method, get_refiner
from .stats import InputStats, reconstruction_error


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, int]
    target_sparsity: float
    pruned: int  # weights the method removed (exact by construction)
    zeros: int  # zeros in the final weight (pruned + any the weight already had in kept places)
    seconds: float
    error: float | None = None  # relative output error ||(W' - What) X|| / ||W' X|| on calibration inputs, where
    # W' is the weight aimed at: W itself, or with dense_targets the dense-output-matching W' of InputStats
    permuted: bool = False  # input channels permuted before the N:M mask (folded into the producer layers)

    @property
    def sparsity(self) -> float:
        return self.zeros / (self.shape[0] * self.shape[1])


@dataclass
class PruneReport:
    recipe: dict
    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0
    search: dict | None = None  # with allocation=search: what the search found and how long it took

    @property
    def sparsity(self) -> float:
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.zeros for r in self.layers) / max(total, 1)

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe,
            **({"search": self.search} if self.search else {}),
            "seconds": round(self.seconds, 3),
            "sparsity": self.sparsity,
            "layers": {
                r.name: {"shape": list(r.shape), "target": r.target_sparsity, "pruned": r.pruned,
                         "zeros": r.zeros, "sparsity": r.sparsity, "seconds": round(r.seconds, 4),
                         "error": r.error, "permuted": r.permuted}
                for r in self.layers
            },
        }


def check_targets(targets: list[Target], recipe: Recipe) -> None:
    """Fail before any work when a layer cannot take the pattern."""
    pattern = recipe.parsed_pattern
    for t in targets:
        check_columns(columns(t), pattern, layer=t.name)


def warn_unprunable(model: nn.Module, targets: list[Target]) -> None:
    """Say so when weight matrices inside the blocks that are not layers sparsecraft prunes (experts fused in a
    layout sparsecraft does not know, ...) hold 1% or more of the blocks' weights: the model's overall sparsity
    will then be well below the recipe's. (MoE routers, a fraction of a percent, stay dense silently.)"""
    left = unprunable_weights(model)
    left_numel = sum(n for _, n in left)
    pruned = sum(weight_matrix(t.module).numel() for t in targets)
    if not left or left_numel < 0.01 * (left_numel + pruned):
        return
    warnings.warn(
        f"{len(left)} weight tensors inside the transformer blocks ({left_numel:,} parameters, "
        f"{left_numel / max(left_numel + pruned, 1):.0%} of the blocks' weights; e.g. {left[0][0]}) are not "
        "nn.Linear/Conv1D layers (fused mixture-of-experts weights, for example) and stay dense; only the "
        f"{len(targets)} linear layers are pruned", UserWarning, stacklevel=3)


def relative_error(dense: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - What) X||_F / ||W X||_F from H = 2 X^T X / n (the factor cancels)."""
    num = reconstruction_error(dense, pruned, hessian).sum()
    den = reconstruction_error(dense, torch.zeros_like(dense), hessian).sum()
    return float((num / den).clamp_min(0).sqrt()) if den > 0 else 0.0


def prune_model(model: nn.Module, calibration: torch.Tensor | None, recipe: Recipe,
                device: str | torch.device | None = None, progress: bool = True) -> PruneReport:
    """Prune `model` in place following `recipe`; `calibration` is a [nsamples, seqlen] LongTensor of
    token ids (unused when nothing in the recipe needs data). Fused mixture-of-experts weights are pruned as one
    linear layer per expert (moe.py), each calibrated on the tokens the router sends it."""
    with experts_split(model), calibrating_all_experts(model, recipe.moe_calibration == "all"):
        return _prune_model(model, calibration, recipe, device, progress)


def _prune_model(model: nn.Module, calibration: torch.Tensor | None, recipe: Recipe,
                 device: str | torch.device | None, progress: bool) -> PruneReport:
    if recipe.allocation == "search":
        raise ConfigError("allocation 'search' is resolved by sparsecraft.prune (it searches, then calls "
                          "prune_model with the found overrides); call sparsecraft.prune or use 'uniform'/'owl'")
    method = get_method(recipe.method)
    refiners = [get_refiner(name) for name in recipe.refine]
    pattern = recipe.parsed_pattern
    dev = resolve_device(device)
    targets = select_targets(model, recipe.targets, recipe.ignore)
    check_targets(targets, recipe)
    warn_unprunable(model, targets)
    needs_hessian = recipe.dense_targets or "hessian" in (method.needs, *(r.needs for r in refiners))
    needs_data = recipe.needs_data
    report = PruneReport(recipe.to_dict())
    start = time.perf_counter()
    if needs_data and (calibration is None or calibration.ndim != 2 or calibration.numel() == 0):
        raise DataError("this recipe needs calibration token ids of shape [nsamples, seqlen]")
    _, blocks = find_blocks(model)
    batches = list(calibration.split(recipe.batch_size)) if needs_data else []

    with _no_cache(model):
        if recipe.allocation == "owl":
            sparsities = owl(model, blocks, batches, targets, recipe.target_sparsity, recipe.owl_lambda,
                             recipe.owl_m, dev, progress)
        else:
            sparsities = uniform(targets, recipe.target_sparsity)
        sparsities = apply_overrides(sparsities, recipe.overrides)
        modules = dict(model.named_modules()) if recipe.permute else {}
        permuted: set[str] = set()
        unseen: list[str] = []  # layers no calibration token reached (experts the router never picked)

        def permute_block(block_targets: list[Target], stats: dict) -> None:
            """Fold an N:M-friendly input-channel permutation into each foldable target (see permute.py)."""
            if not recipe.permute:
                return
            for target in block_targets:
                if permute.producers(modules, target.name) is None:
                    continue
                layer_stats = stats.get(target.name)
                dense = weight_matrix(target.module).detach().to(dev, torch.float32)
                scores = permute.permutation_scores(recipe.method, dense, layer_stats).cpu()
                perm = permute.nm_permutation(scores, pattern.n, pattern.m, seed=recipe.seed)
                permute.fold(modules, target.name, perm)
                permute.permute_stats(layer_stats, perm)
                permuted.add(target.name)

        def prune_layer(target: Target, stats: InputStats | None) -> None:
            t0 = time.perf_counter()
            dense = weight_matrix(target.module).detach().to(dev, torch.float32)
            if stats is not None and stats.has_cross:
                dense = stats.dense_target(dense, recipe.damp)
            sparsity = sparsities[target.name]
            if stats is not None and stats.tokens == 0:  # no inputs to weigh by: fall back to magnitude
                unseen.append(target.name)
                new, keep = get_method("magnitude").prune(dense, None, sparsity, pattern, recipe)
                stats = None
            else:
                new, keep = method.prune(dense, stats, sparsity, pattern, recipe)
                for refiner in refiners:
                    new, keep = refiner.refine(dense, new, keep, stats, sparsity, pattern, recipe)
            error = relative_error(dense, new, stats.hessian) if stats is not None and needs_hessian else None
            set_weight_matrix(target.module, new)
            final = weight_matrix(target.module)
            report.layers.append(LayerResult(
                target.name, tuple(final.shape), sparsity, int((~keep).sum()), int((final == 0).sum()),
                time.perf_counter() - t0, error, target.name in permuted,
            ))

        if not needs_data:
            from tqdm.auto import tqdm

            for target in tqdm(targets, desc=f"{method.name} pruning", disable=not progress, unit="layer"):
                permute_block([target], {})
                prune_layer(target, None)
        else:
            def on_block(index: int, block_targets: list[Target], stats: dict) -> None:
                permute_block(block_targets, stats)
                for target in block_targets:
                    prune_layer(target, stats.pop(target.name))

            def factory(target: Target) -> InputStats:
                return InputStats(columns(target), dev, hessian=needs_hessian, cross=recipe.dense_targets)

            run_sequential(model, blocks, batches, targets, factory, on_block, dev, progress,
                           dense_stream=recipe.dense_targets)
        if unseen:
            warnings.warn(
                f"{len(unseen)} layers saw no calibration token (e.g. {unseen[0]}: experts the router never "
                f"picked) and were pruned by magnitude instead of {method.name}: give more or more varied "
                "calibration samples (--nsamples), or for MoE experts --moe-calibration all", UserWarning, stacklevel=3)
    order = {t.name: i for i, t in enumerate(targets)}
    report.layers.sort(key=lambda r: order[r.name])
    report.seconds = time.perf_counter() - start
    return report


class _no_cache:
    """Turn the KV cache off during calibration passes (restored afterwards)."""

    def __init__(self, model: nn.Module):
        self.config = getattr(model, "config", None)

    def __enter__(self):
        self.saved = getattr(self.config, "use_cache", None)
        if self.config is not None and self.saved is not None:
            self.config.use_cache = False

    def __exit__(self, *exc):
        if self.config is not None and self.saved is not None:
            self.config.use_cache = self.saved
