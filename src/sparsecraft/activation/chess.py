"""CHESS (He et al. 2024, "Optimizing LLM Inference via Channel-Wise Thresholding and Selective Sparsification"):
per-channel thresholds for the MLP activation from a_i^2 * E[up_i^2] (the squared error dropping a_i causes in
down_proj's input), and, in attention, only the inputs of the query and output projections are sparsified (keys and
values, which go to the cache, stay exact)."""

from __future__ import annotations

from .registry import register
from .sites import find_group, input_site, output_site, require_gated


@register("chess", gated=True, summary="|a_i| * sqrt(E[up_i^2]) < t in the MLP; |x| < t on q_proj and o_proj only")
def sites(layout):
    require_gated(layout, "chess")
    out = []
    for suffix in ("q_proj", "o_proj"):
        group = find_group(layout, suffix)
        if group is not None:
            out.append(input_site(layout, [n for n in group if n.endswith(suffix)]))
    out.append(output_site(layout, scale="up_rms", method="chess"))
    return out
