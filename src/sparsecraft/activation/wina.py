"""WINA (Chen et al. 2025, "Weight Informed Neuron Activation"): score |x_i| * ||W[:, i]||_2, the input times the
column norm of the weight that consumes it. A tensor read by several layers (q/k/v, gate/up) is scored with the
column norm over every consumer (sqrt of the sum of their squared column norms), so it keeps one mask. Thresholds
are calibrated on the score, and stored per channel on |x| (t / norm_i), so the hooks stay a plain |x| < t."""

from __future__ import annotations

from .registry import register
from .sites import input_site


@register("wina", gated=False, summary="|x_i| * ||W[:, i]|| < t (column norms over every consumer)")
def sites(layout):
    return [input_site(layout, group, scale="colnorm") for group in layout.groups]
