"""CATS (Lee et al. 2024, "Contextually-Aware Thresholding for Sparsity"): a threshold on |SiLU(gate(x))| only,
which sparsifies the up product and the down projection of a gated MLP; attention stays dense."""

from __future__ import annotations

from .registry import register
from .sites import output_site


@register("cats", gated=True, summary="|SiLU(gate(x))| < t (MLP up/down only)")
def sites(layout):
    return [output_site(layout, method="cats")]
