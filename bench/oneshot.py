"""One-shot pruning of the default model: dense vs magnitude / Wanda / SparseGPT at 50%, 2:4 and 4:8.

Every row runs in its own subprocess (so peak RSS is per run) with the same calibration windows and the
same held-out evaluation windows. Prints a table (markdown with --markdown) and writes JSON with --json.

    python bench/oneshot.py                                      # 64 x 512 calibration tokens, all held-out windows
    python bench/oneshot.py --nsamples 8 --max-eval-windows 8    # quick look
"""

from __future__ import annotations

import argparse

from common import add_common_args, base_spec, finish, run_isolated

CONFIGS = [("magnitude", "unstructured", 0.5), ("wanda", "unstructured", 0.5), ("sparsegpt", "unstructured", 0.5),
           ("magnitude", "2:4", None), ("wanda", "2:4", None), ("sparsegpt", "2:4", None),
           ("magnitude", "4:8", None), ("wanda", "4:8", None), ("sparsegpt", "4:8", None)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--patterns", default="unstructured,2:4,4:8")
    add_common_args(ap)
    args = ap.parse_args()
    base, calib = base_spec(args)
    methods, patterns = args.methods.split(","), args.patterns.split(",")
    specs = [{**base, "name": "dense", "recipe": None}]
    specs += [{**base, "name": f"{m} {p}", "recipe": {**calib, "method": m, "pattern": p, "sparsity": s}}
              for m, p, s in CONFIGS if m in methods and p in patterns]
    rows = [run_isolated(spec) for spec in specs]
    dense = rows[0]["perplexity"]
    headers = ["method", "pattern", "sparsity", "held-out ppl", "x dense", "prune s", "peak RSS MiB"]
    table = [[(r.get("recipe") or {}).get("method", "dense"), (r.get("recipe") or {}).get("pattern", "-"),
              f"{r['sparsity']:.2%}", f"{r['perplexity']:.2f}", f"{r['perplexity'] / dense:.2f}",
              f"{r['prune_s']:.1f}" if "prune_s" in r else "-", f"{r['peak_rss_mb']:.0f}"] for r in rows]
    finish(args, headers, table, rows)


if __name__ == "__main__":
    main()
