"""Activation-sparse decode GEMVs: the column-skipping kernel (sparsecraft.kernels.colskip) against the dense paths,
over a whole model's linear layers per "token" (every weight once per pass, so nothing stays in the caches).

Per pass, each of the model's linear layers (LLaMA-shaped 1.1B by default: 22 layers x q/k/v/o/gate/up/down, bf16)
multiplies one x row; the rows are random normal and the threshold is the |x| quantile of the asked activation
sparsity (the fraction of input features a token drops), so the kernel reads that fraction less of each weight.
Dense baselines of the same run: torch's bf16 nn.functional.linear and sparsecraft's dense kernel (SparseLinear,
format='dense'). Passes are interleaved over the variants (--reps rounds), best kept.

  python bench/colskip.py                       # llama1b shapes, sparsities 0,0.25,0.4,0.5,0.7
  python bench/colskip.py --model smollm --markdown

This is the kernel alone: attention, norms and the lm_head (not activation-sparse) are not in it; the end-to-end
decode rows of bench/decode.py are the acceptance figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402
from sparsecraft.kernels import SparseLinear, info  # noqa: E402
from sparsecraft.kernels.colskip import ColumnSkipLinear  # noqa: E402

MODELS = {  # hidden, intermediate, kv width, layers
    "llama1b": (2048, 5632, 256, 22),
    "smollm": (576, 1536, 192, 30),
}


def shapes(model: str) -> list[tuple[int, int]]:
    h, inter, kv, layers = MODELS[model]
    per_layer = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]  # [out, in]
    return per_layer * layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama1b", choices=sorted(MODELS))
    ap.add_argument("--sparsities", default="0,0.25,0.4,0.5,0.7")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    levels = [float(s) for s in args.sparsities.split(",")]
    weights = [torch.randn(o, i, generator=g).bfloat16() for o, i in shapes(args.model)]
    xs = [torch.randn(1, i, generator=g).bfloat16() for _, i in shapes(args.model)]
    dense = [SparseLinear(w, None, format="dense") for w in weights]
    skip = [ColumnSkipLinear(w, None, torch.tensor(0.0)) for w in weights]  # one transposed copy, all levels
    thresholds = {s: [torch.quantile(x.float().abs(), s) if s > 0 else torch.tensor(0.0) for x in xs] for s in levels}
    del weights  # the dense kernels and the column-skipping layers hold their own copies
    total = sum(o * i * 2 for o, i in shapes(args.model))
    variants = {"torch bf16 linear": [lambda x, w=d: torch.nn.functional.linear(x, w.dense_weight()) for d in dense]}
    variants["kernels dense"] = dense
    level_of = {}
    for s in levels:
        variants[f"colskip {s:.0%}"] = skip
        level_of[f"colskip {s:.0%}"] = s
    best = {k: float("inf") for k in variants}
    kept = {}
    with torch.no_grad():
        for _ in range(args.reps + 1):  # the first round warms up
            for name, layers in variants.items():
                if name in level_of:
                    for layer, t in zip(layers, thresholds[level_of[name]]):
                        layer.set_threshold(t)
                        layer.reset_counts()
                t0 = time.perf_counter()
                for layer, x in zip(layers, xs):
                    layer(x)
                t = time.perf_counter() - t0
                best[name] = min(best[name], t)
                if name.startswith("colskip"):
                    kept[name] = sum(layer.kept[-1] * layer.out_features * 2 for layer in layers) / total
    best["torch bf16 linear"] = max(best["torch bf16 linear"], 1e-9)
    fastest_dense = min(best["torch bf16 linear"], best["kernels dense"])
    rows = []
    for name, t in best.items():
        frac = kept.get(name, 1.0)
        rows.append([name, f"{t * 1e3:.2f}", f"{fastest_dense / t:.2f}x", f"{frac:.1%}",
                     f"{total * frac / t / 1e9:.1f}"])
    print_table(["variant", "ms per token (linears)", "x fastest dense", "weight bytes read", "GB/s"], rows,
                args.markdown)
    facts = info()
    isa = "avx512" if facts.get("avx512") else "avx2" if facts.get("avx2") else "scalar"
    print(f"\n{args.model} shapes ({len(xs)} GEMVs, {total / 1e9:.2f} GB bf16 per pass); kernels: {isa}; "
          f"threads={args.threads}; best of {args.reps} interleaved passes after a warm-up")


if __name__ == "__main__":
    main()
