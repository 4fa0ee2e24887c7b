"""Quality beyond the reference pruners on the default model, every row measured in one run on the held-out split.

For each sparsity setting: Wanda and SparseGPT with uniform allocation (the baselines), then SparseGPT with one
ingredient at a time (OWL allocation, DSnoT mask refinement, dense-target reconstruction, least-squares refit,
evolutionary per-block search) and the combinations. Same calibration and evaluation windows for every row; each
row in its own process. Prints perplexity, the change against plain SparseGPT, prune seconds (search included)
and peak RSS.

    python bench/quality.py                                  # 50/60/70% unstructured, 2:4, 4:8 (hours)
    python bench/quality.py --settings 0.7,2:4 --markdown    # the acceptance settings only
"""

from __future__ import annotations

import argparse
import sys

from common import add_common_args, base_spec, finish, run_isolated

INGREDIENTS = {  # name -> recipe fields added to the SparseGPT baseline
    "sparsegpt": {},
    "+ owl": {"allocation": "owl"},
    "+ dsnot": {"refine": ["dsnot"]},
    "+ dense targets": {"dense_targets": True},
    "+ refit": {"refine": ["refit"]},
    "all": {"allocation": "owl", "refine": ["dsnot", "refit"]},
    "+ search": {"search": True},
    "search + dsnot + refit": {"search": True, "refine": ["dsnot", "refit"]},
}


def setting_fields(setting: str) -> dict:
    return {"pattern": setting} if ":" in setting else {"pattern": "unstructured", "sparsity": float(setting)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="0.5,0.6,0.7,2:4,4:8", help="sparsities and/or N:M patterns")
    ap.add_argument("--rows", default=",".join(["wanda", *INGREDIENTS]), help="which rows to run")
    ap.add_argument("--search-budget", default="20m", help="time budget of each search row")
    ap.add_argument("--fitness-samples", type=int, default=4, help="windows scoring each search candidate")
    add_common_args(ap)
    args = ap.parse_args()
    base, calib = base_spec(args)
    wanted = args.rows.split(",")
    results = [run_isolated({**base, "name": "dense", "recipe": None})]
    dense = results[0]["perplexity"]
    table = [["dense", "-", f"{results[0]['sparsity']:.2%}", f"{dense:.2f}", "-", "-", "-",
              f"{results[0]['peak_rss_mb']:.0f}"]]
    for setting in args.settings.split(","):
        fields = {**calib, **setting_fields(setting)}
        rows = {"wanda": {**fields, "method": "wanda"}}
        for name, extra in INGREDIENTS.items():
            if ":" in setting:  # N:M fixes every layer's sparsity: nothing to allocate or search
                if extra.get("search") or extra == {"allocation": "owl"}:
                    continue
                extra = {k: v for k, v in extra.items() if k != "allocation"}
            rows[name] = {**fields, "method": "sparsegpt", **extra}
        baseline = None
        for name, recipe in rows.items():
            if name not in wanted:
                continue
            search = recipe.pop("search", None)
            spec = {**base, "name": f"{setting} {name}", "recipe": recipe}
            if search:
                spec["search"] = {"budget": args.search_budget, "fitness_samples": args.fitness_samples}
            r = run_isolated(spec)
            r["setting"], r["row"] = setting, name
            results.append(r)
            if name == "sparsegpt":
                baseline = r["perplexity"]
            change = f"{(r['perplexity'] / baseline - 1):+.1%}" if baseline and name != "sparsegpt" else "-"
            table.append([name, setting, f"{r['sparsity']:.2%}", f"{r['perplexity']:.2f}",
                          f"{r['perplexity'] / dense:.2f}", change, f"{r['prune_s']:.0f}", f"{r['peak_rss_mb']:.0f}"])
            print("done: " + " | ".join(table[-1]), file=sys.stderr, flush=True)  # partial results survive a kill
    finish(args, ["recipe", "setting", "sparsity", "held-out ppl", "x dense", "vs sparsegpt", "prune s",
                  "peak RSS MiB"], table, results)


if __name__ == "__main__":
    main()
