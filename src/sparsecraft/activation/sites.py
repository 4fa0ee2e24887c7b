"""Where activation sparsity acts in a transformer block: the sites whose values are compared with a threshold.

A site is one tensor that is masked (|x| < threshold -> 0): the input of one or more linear layers that share it
(`kind="input"`: q/k/v share the attention input, gate/up the MLP input, o and down have their own), or the output
of a gated MLP's activation module (`kind="output"`: SiLU(gate(x)), which zeros the same channels of the up product
and of down_proj's input). Input groups are found generically, by which linear layers receive the very same tensor
in one forward pass of the block, so every architecture with nn.Linear/Conv1D layers works for input sites.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibrate import block_output
from ..errors import ConfigError
from ..models import is_prunable, weight_matrix

INPUT, OUTPUT = "input", "output"


@dataclass
class Site:
    """One masked tensor. `modules`: the full names of the linear layers whose input is masked (kind input), or the
    one activation module whose output is masked (kind output). `skips`: (linear name, "columns" | "rows") whose
    weights a zero on this site makes unnecessary to read. `scale`: how a value is scored before thresholding
    (None: |x|; "colnorm": |x_i| * ||W[:, i]||_2 over every consumer, WINA; "up_rms": |a_i| * sqrt(E[up_i^2]),
    CHESS)."""

    key: str
    kind: str
    modules: list[str]
    skips: list[tuple[str, str]]
    features: int
    scale: str | None = None
    up: str | None = None  # output sites: the up projection multiplied with the activation (CHESS's E[up^2])
    meta: dict = field(default_factory=dict)


@dataclass
class BlockLayout:
    """The linear layers of one block grouped by the tensor they read, in firing order, and its gated MLP."""

    groups: list[list[str]]  # full names; each group reads one tensor
    linears: dict[str, nn.Module]
    gated: dict | None  # {"act": name, "gate": name, "up": name, "down": name} for SiLU(gate(x)) * up(x) MLPs


def _gated_mlp(block: nn.Module, prefix: str) -> dict | None:
    for name, module in block.named_modules():
        parts = [getattr(module, a, None) for a in ("gate_proj", "up_proj", "down_proj")]
        act = getattr(module, "act_fn", None)
        if all(is_prunable(p) for p in parts) and isinstance(act, nn.Module):
            base = f"{prefix}.{name}" if name else prefix
            return {"act": f"{base}.act_fn", "gate": f"{base}.gate_proj", "up": f"{base}.up_proj",
                    "down": f"{base}.down_proj"}
    return None


def block_layout(block: nn.Module, prefix: str, args: tuple, kwargs: dict) -> BlockLayout:
    """Run `block` once on (args, kwargs) with hooks that note which tensor each linear layer reads."""
    linears = {f"{prefix}.{n}": m for n, m in block.named_modules() if is_prunable(m)}
    seen: dict[tuple, list[str]] = {}
    handles = []

    def hook(name):
        def fn(module, inputs):
            x = inputs[0]
            seen.setdefault((x.data_ptr(), tuple(x.shape), x.stride()), []).append(name)
        return fn

    for name, module in linears.items():
        handles.append(module.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            block_output(block(*args, **kwargs))
    finally:
        for h in handles:
            h.remove()
    groups = [list(dict.fromkeys(names)) for names in seen.values()]
    return BlockLayout(groups, linears, _gated_mlp(block, prefix))


def short(name: str) -> str:
    """The projection's kind: the last part of its name (q_proj, down_proj, act_fn, ...)."""
    return name.rsplit(".", 1)[-1]


def input_site(layout: BlockLayout, names: list[str], scale: str | None = None) -> Site:
    features = weight_matrix(layout.linears[names[0]]).shape[1]
    return Site("+".join(short(n) for n in names), INPUT, list(names), [(n, "columns") for n in names], features,
                scale)


def output_site(layout: BlockLayout, scale: str | None = None, method: str = "") -> Site:
    g = require_gated(layout, method)
    features = weight_matrix(layout.linears[g["up"]]).shape[0]
    return Site("act_fn", OUTPUT, [g["act"]], [(g["up"], "rows"), (g["down"], "columns")], features, scale,
                up=g["up"])


def require_gated(layout: BlockLayout, method: str) -> dict:
    if layout.gated is None:
        from .registry import gated_methods, ungated_methods

        raise ConfigError(f"method {method!r} thresholds the gate of a gated MLP (SiLU(gate(x)) * up(x), as in "
                          "LLaMA, Mistral, Qwen); this model's blocks have none (no gate_proj/up_proj/down_proj/"
                          f"act_fn): use {' or '.join(ungated_methods())} (gated MLPs only: "
                          f"{', '.join(gated_methods())})")
    return layout.gated


def find_group(layout: BlockLayout, suffix: str) -> list[str] | None:
    for group in layout.groups:
        if any(short(n) == suffix for n in group):
            return group
    return None


def weight_bytes(module: nn.Module) -> int:
    w = weight_matrix(module)
    return w.numel() * w.element_size()


def site_bytes(site: Site, linears: dict[str, nn.Module]) -> int:
    """Weight bytes a token need not read when every value of the site is zero."""
    return sum(weight_bytes(linears[name]) for name, _ in site.skips)
