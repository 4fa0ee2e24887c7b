"""Installed thresholds: one forward (pre-)hook per masked module, and the counters `eval` reads.

The hook for an `input` site is a forward pre-hook on the nn.Linear: x -> where(|x| < t, 0, x), t broadcast over
the last (feature) dimension. The hook for an `output` site is a forward hook on the activation module
(mlp.act_fn), masking its output the same way. A CPU kernel replaces a hook by reading `installed(model)` and
`remove(model)`, then fusing the same comparison into its GEMV.
"""

from __future__ import annotations

import torch
from torch import nn

from .sites import INPUT, OUTPUT

POLICIES = ("all", "decode")


class ThresholdMask:
    """Masks |x| < threshold to zero. `policy`: 'all' (every token, prefill included: what `eval` measures) or
    'decode' (only single-token forwards, as TEAL's speed path; prefill stays dense). With `count`, the number of
    zeroed values per feature and the tokens seen are accumulated (measurement)."""

    def __init__(self, threshold: torch.Tensor, kind: str, policy: str = "all"):
        self.threshold = threshold
        self.kind = kind
        self.policy = policy
        self.count = False
        self.zeros: torch.Tensor | None = None
        self.tokens = 0
        self.handle = None

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        if self.policy == "decode" and x.dim() >= 2 and x.shape[-2] != 1:
            return x
        t = self.threshold
        if t.device != x.device:
            t = self.threshold = t.to(x.device)
        drop = x.abs() < t
        if self.count:
            flat = drop.reshape(-1, x.shape[-1])
            z = flat.sum(0, dtype=torch.int64)
            self.zeros = z if self.zeros is None else self.zeros + z.to(self.zeros.device)
            self.tokens += flat.shape[0]
        return x.masked_fill(drop, 0)

    def pre_hook(self, module, args):
        return (self.mask(args[0]), *args[1:])

    def post_hook(self, module, args, output):
        return self.mask(output)

    @property
    def sparsity(self) -> float | None:
        if self.zeros is None or self.tokens == 0:
            return None
        return float(self.zeros.sum()) / (self.tokens * self.zeros.numel())

    def reset(self) -> None:
        self.zeros, self.tokens = None, 0


ATTR = "_sparsecraft_activation"


def install(model: nn.Module, thresholds: dict[str, torch.Tensor], sites: dict[str, str],
            policy: str = "all") -> dict[str, ThresholdMask]:
    """Install `thresholds` ({module name: tensor}) on `model`, replacing any installed before; `sites` says for
    each name whether its input ('input') or its output ('output') is masked."""
    remove(model)
    modules = dict(model.named_modules())
    return {name: attach(modules[name], t, sites[name], policy) for name, t in thresholds.items()}


def attach(module: nn.Module, threshold: torch.Tensor, kind: str, policy: str = "all") -> ThresholdMask:
    """Install one threshold on one module (replacing its previous one)."""
    detach(module)
    mask = ThresholdMask(threshold.detach().clone(), kind, policy)
    if kind == INPUT:
        mask.handle = module.register_forward_pre_hook(mask.pre_hook)
    elif kind == OUTPUT:
        mask.handle = module.register_forward_hook(mask.post_hook)
    else:
        raise ValueError(f"site kind must be {INPUT!r} or {OUTPUT!r}, got {kind!r}")
    module.__dict__[ATTR] = mask
    return mask


def detach(module: nn.Module) -> ThresholdMask | None:
    mask = module.__dict__.pop(ATTR, None)
    if mask is not None:
        mask.handle.remove()
    return mask


def masks(model: nn.Module) -> dict[str, ThresholdMask]:
    return {name: m.__dict__[ATTR] for name, m in model.named_modules() if ATTR in m.__dict__}


def installed(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module name: threshold} of the thresholds installed on `model` (a scalar or one per feature)."""
    return {name: mask.threshold for name, mask in masks(model).items()}


def installed_sites(model: nn.Module) -> dict[str, str]:
    return {name: mask.kind for name, mask in masks(model).items()}


def remove(model: nn.Module) -> dict[str, torch.Tensor]:
    """Remove every installed threshold hook; returns what was installed ({name: threshold})."""
    out = {}
    for name, module in model.named_modules():
        mask = detach(module)
        if mask is not None:
            out[name] = mask.threshold
    return out


class counting:
    """Context manager: the installed masks count what they zero (optionally with another policy, e.g. 'all' while
    perplexity is measured); `result()` gives {module name: measured sparsity}."""

    def __init__(self, model: nn.Module, policy: str | None = None):
        self.masks = masks(model)
        self.policy = policy
        self.saved = {}

    def __enter__(self):
        for name, mask in self.masks.items():
            mask.reset()
            mask.count = True
            self.saved[name] = mask.policy
            if self.policy is not None:
                mask.policy = self.policy
        return self

    def __exit__(self, *exc):
        for name, mask in self.masks.items():
            mask.count = False
            mask.policy = self.saved[name]

    def result(self) -> dict[str, float | None]:
        return {name: mask.sparsity for name, mask in self.masks.items()}

    def per_feature(self) -> dict[str, torch.Tensor]:
        """{module name: share of tokens for which each feature was zeroed}."""
        return {name: mask.zeros.double() / mask.tokens for name, mask in self.masks.items()
                if mask.zeros is not None and mask.tokens}
