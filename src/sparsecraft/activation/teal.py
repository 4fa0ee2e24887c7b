"""TEAL (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models"): a magnitude threshold on
the input of every linear layer of the block; layers that read the same tensor (q/k/v, gate/up) share it."""

from __future__ import annotations

from .registry import register
from .sites import input_site


@register("teal", gated=False, summary="|x| < t on every linear layer's input (shared inputs share t)")
def sites(layout):
    return [input_site(layout, group) for group in layout.groups]
