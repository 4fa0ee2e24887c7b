"""One-shot pruning of a model: pick targets, calibrate block by block, apply the method per layer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibrate import columns, run_sequential
from .models import Target, find_blocks, resolve_device, select_targets, set_weight_matrix, weight_matrix
from .patterns import check_columns
from .recipe import Recipe
from .registry import get_method


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, int]
    target_sparsity: float
    pruned: int  # weights the method removed (exact by construction)
    zeros: int  # zeros in the final weight (pruned + any the weight already had in kept places)
    seconds: float

    @property
    def sparsity(self) -> float:
        return self.zeros / (self.shape[0] * self.shape[1])


@dataclass
class PruneReport:
    recipe: dict
    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def sparsity(self) -> float:
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.zeros for r in self.layers) / max(total, 1)

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe,
            "seconds": round(self.seconds, 3),
            "sparsity": self.sparsity,
            "layers": {
                r.name: {"shape": list(r.shape), "target": r.target_sparsity, "pruned": r.pruned,
                         "zeros": r.zeros, "sparsity": r.sparsity, "seconds": round(r.seconds, 4)}
                for r in self.layers
            },
        }


def check_targets(targets: list[Target], recipe: Recipe) -> None:
    """Fail before any work when a layer cannot take the pattern."""
    pattern = recipe.parsed_pattern
    for t in targets:
        check_columns(columns(t), pattern, layer=t.name)


def prune_model(model: nn.Module, calibration: torch.Tensor | None, recipe: Recipe,
                device: str | torch.device | None = None, progress: bool = True) -> PruneReport:
    """Prune `model` in place following `recipe`; `calibration` is a [nsamples, seqlen] LongTensor of
    token ids (ignored by data-free methods)."""
    method = get_method(recipe.method)
    pattern, sparsity = recipe.parsed_pattern, recipe.target_sparsity
    dev = resolve_device(device)
    targets = select_targets(model, recipe.targets, recipe.ignore)
    check_targets(targets, recipe)
    report = PruneReport(recipe.to_dict())
    start = time.perf_counter()

    def prune_layer(target: Target, stats) -> None:
        t0 = time.perf_counter()
        weight = weight_matrix(target.module).detach().to(dev, torch.float32)
        new, keep = method.prune(weight, stats, sparsity, pattern, recipe)
        set_weight_matrix(target.module, new)
        final = weight_matrix(target.module)
        report.layers.append(LayerResult(
            target.name, tuple(final.shape), sparsity, int((~keep).sum()), int((final == 0).sum()),
            time.perf_counter() - t0,
        ))

    if method.statistics is None:
        from tqdm.auto import tqdm

        for target in tqdm(targets, desc=f"{method.name} pruning", disable=not progress, unit="layer"):
            prune_layer(target, None)
    else:
        if calibration is None or calibration.ndim != 2 or calibration.numel() == 0:
            from .errors import DataError

            raise DataError(f"method {method.name} needs calibration token ids of shape [nsamples, seqlen]")
        _, blocks = find_blocks(model)
        batches = list(calibration.split(recipe.batch_size))

        def on_block(index: int, block_targets: list[Target], stats: dict) -> None:
            for target in block_targets:
                prune_layer(target, stats[target.name])
                del stats[target.name]

        def factory(target: Target):
            return method.statistics(columns(target), dev)

        with _no_cache(model):
            run_sequential(model, blocks, batches, targets, factory, on_block, dev, progress)
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
