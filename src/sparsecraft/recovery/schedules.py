"""Gradual magnitude pruning (Zhu & Gupta 2017): the cubic sparsity schedule and the masks it asks for.

s_t = s_f + (s_i - s_f) (1 - (t - t0) / (T - t0))^3 for t0 <= t <= T (s_i before, s_f after). The mask is
recomputed every k steps from t0 (and at T exactly) with sparsecraft's exact mask rule (patterns.mask_from_scores
and its floor counts), scores being |W| compared across the layer (magnitude) or |W| x ||X_j|| compared per output
row (Wanda, with the input norms gathered from the training forward passes since the last update).

Masks only ever grow: entries pruned earlier score -inf, so they are the first to be pruned again. For N:M the
intermediate masks prune, in each row, the lowest-scoring entries among those the N:M mask of the current scores
would remove, so the row reaches exactly the scheduled count and, at T, exactly the N:M pattern.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import Target, weight_matrix
from ..patterns import Pattern, keep_lowest_pruned, mask_from_scores, nm_mask, prune_count
from ..stats import InputStats


def cubic_sparsity(step: int, final: float, initial: float = 0.0, start: int = 0, end: int = 1) -> float:
    """The scheduled sparsity after `step` optimizer steps."""
    if step <= start:
        return float(initial)
    if step >= end:
        return float(final)
    frac = (step - start) / (end - start)
    return float(final + (initial - final) * (1.0 - frac) ** 3)


def update_steps(start: int, end: int, every: int) -> list[int]:
    """Steps (counted in completed optimizer steps) at which the mask is recomputed: t0, t0 + k, ..., and T."""
    steps = list(range(start, end, every))
    return [*steps, end]


def _is_transposed(module: nn.Module) -> bool:
    return not isinstance(module, nn.Linear)


def layer_keep_mask(weight: torch.Tensor, previous: torch.Tensor, sparsity: float, pattern: Pattern,
                    norms: torch.Tensor | None = None) -> torch.Tensor:
    """Keep mask [out, in] pruning exactly the scheduled count, never reviving a pruned entry.

    weight, previous: [out, in]; norms: Wanda's per-input-column norms (None: magnitude)."""
    scores = weight.detach().abs().float()
    if norms is not None:
        scores = scores * norms.to(scores.device, torch.float32).unsqueeze(0)
    scores = scores.masked_fill(~previous, float("-inf"))
    if not pattern.is_nm:
        return mask_from_scores(scores, sparsity, pattern, scope="row" if norms is not None else "layer")
    candidates = ~nm_mask(scores, pattern)
    ranked = scores.masked_fill(~candidates, float("inf"))
    return keep_lowest_pruned(ranked, prune_count(scores.shape[1], sparsity))


class ActivationNorms:
    """Forward hooks on the targets summing the squares of their inputs (Wanda's ||X_j||^2) over the training
    forward passes since the last reset. Part of the checkpoint, so a resumed run scores exactly as the
    uninterrupted one."""

    def __init__(self, targets: list[Target]):
        self.stats: dict[str, InputStats] = {}
        self.handles = []
        for t in targets:
            w = weight_matrix(t.module)
            self.stats[t.name] = InputStats(w.shape[1], w.device)
            self.handles.append(t.module.register_forward_hook(self._hook(t.name)))
        self.enabled = True

    def _hook(self, name: str):
        def hook(module, args, output):
            if self.enabled and torch.is_grad_enabled():  # training passes only, not evaluation
                self.stats[name].add_batch(args[0].detach())

        return hook

    @property
    def empty(self) -> bool:
        return all(s.tokens == 0 for s in self.stats.values())

    def norms(self, reduce=None) -> dict[str, torch.Tensor]:
        """Per-layer input-column norms; `reduce(tensor)` sums a tensor over processes (data parallel)."""
        out = {}
        for name, s in self.stats.items():
            sq = s.sq if reduce is None else reduce(s.sq.clone())
            out[name] = sq.sqrt().float()
        return out

    def reset(self) -> None:
        for s in self.stats.values():
            s.sum.zero_()
            s.sq.zero_()
            s.tokens = 0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def state_dict(self) -> dict:
        return {name: {"sum": s.sum.cpu(), "sq": s.sq.cpu(), "tokens": s.tokens} for name, s in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, s in self.stats.items():
            s.sum.copy_(state[name]["sum"])
            s.sq.copy_(state[name]["sq"])
            s.tokens = int(state[name]["tokens"])


def gmp_masks(targets: list[Target], masks: dict[str, torch.Tensor], sparsity: float, pattern: Pattern,
              norms: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """New keep masks (shaped like each target's weight parameter) at `sparsity`."""
    out = {}
    for t in targets:
        w = weight_matrix(t.module)
        previous = masks[t.name]
        if _is_transposed(t.module):
            previous = previous.t()
        keep = layer_keep_mask(w, previous, sparsity, pattern, None if norms is None else norms[t.name])
        out[t.name] = keep.t().contiguous() if _is_transposed(t.module) else keep
    return out
