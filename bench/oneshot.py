"""One-shot pruning of the default model: dense vs magnitude / Wanda / SparseGPT at 50%, 2:4 and 4:8.

Every row runs in its own subprocess (so peak RSS is per run) with the same calibration windows and the
same held-out evaluation windows. Prints a table (markdown with --markdown) and writes JSON with --json.

    python bench/oneshot.py                        # full: 64 x 512 calibration tokens, all held-out windows
    python bench/oneshot.py --nsamples 8 --max-eval-windows 8   # quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CONFIGS = [("magnitude", "unstructured", 0.5), ("wanda", "unstructured", 0.5), ("sparsegpt", "unstructured", 0.5),
           ("magnitude", "2:4", None), ("wanda", "2:4", None), ("sparsegpt", "2:4", None),
           ("magnitude", "4:8", None), ("wanda", "4:8", None), ("sparsegpt", "4:8", None)]


def worker(spec: dict) -> dict:
    import torch

    import sparsecraft
    from sparsecraft.api import calibration_ids, make_recipe, peak_rss_mb

    torch.set_num_threads(spec["threads"]) if spec.get("threads") else None
    t0 = time.perf_counter()
    model, tokenizer = sparsecraft.load_model(spec["model"])
    splits = sparsecraft.load_text(spec["data"])
    load_s = time.perf_counter() - t0
    row = {"method": spec["method"], "pattern": spec["pattern"], "load_s": load_s}
    if spec["method"] != "dense":
        recipe = make_recipe(method=spec["method"], pattern=spec["pattern"], sparsity=spec["sparsity"],
                             nsamples=spec["nsamples"], seqlen=spec["seqlen"], seed=spec["seed"])
        ids = calibration_ids(splits, tokenizer, recipe)
        _, report = sparsecraft.prune(model, ids, recipe, progress=False)
        row["prune_s"] = report.seconds
        row["pruned_fraction"] = sum(r.pruned for r in report.layers) / sum(r.shape[0] * r.shape[1]
                                                                           for r in report.layers)
    result = sparsecraft.evaluate(model, splits, tokenizer=tokenizer, seqlen=spec["seqlen"],
                                  max_windows=spec["max_eval_windows"], progress=False)
    row.update(perplexity=result["perplexity"], sparsity=result["sparsity"], eval_tokens=result["tokens"],
               peak_rss_mb=peak_rss_mb())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-eval-windows", type=int, default=None)
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--patterns", default="unstructured,2:4,4:8")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return
    base = {k: getattr(args, k) for k in ("model", "data", "nsamples", "seqlen", "seed", "max_eval_windows")}
    methods, patterns = args.methods.split(","), args.patterns.split(",")
    specs = [{**base, "method": "dense", "pattern": "-", "sparsity": None}]
    specs += [{**base, "method": m, "pattern": p, "sparsity": s} for m, p, s in CONFIGS
              if m in methods and p in patterns]
    rows = []
    for spec in specs:
        print(f"running {spec['method']} {spec['pattern']} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{spec['method']} {spec['pattern']} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][7:]))
    dense = rows[0]["perplexity"]
    headers = ["method", "pattern", "sparsity", "held-out ppl", "x dense", "prune s", "peak RSS MiB"]
    table = [[r["method"], r["pattern"], f"{r['sparsity']:.2%}", f"{r['perplexity']:.2f}",
              f"{r['perplexity'] / dense:.2f}", f"{r['prune_s']:.1f}" if "prune_s" in r else "-",
              f"{r['peak_rss_mb']:.0f}"] for r in rows]
    info = (f"model={args.model} data={args.data} calibration={args.nsamples}x{args.seqlen} tokens seed={args.seed}, "
            f"eval={rows[0]['eval_tokens']} held-out tokens in windows of {args.seqlen}")
    if args.markdown:
        print("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
        print("\n".join("| " + " | ".join(r) + " |" for r in table))
    else:
        from sparsecraft.report import format_table

        print(format_table(headers, table))
    print(info)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
