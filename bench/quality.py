"""Quality beyond the reference pruners on the default model, every row on the same held-out split.

For each sparsity setting: Wanda and SparseGPT with uniform allocation (the baselines), then one ingredient at a
time (OWL allocation, DSnoT mask refinement, least-squares refit, RIA with channel permutation for N:M,
evolutionary per-block search) and the best combinations. Same calibration and evaluation windows for every row;
each row in its own process. Prints perplexity, the change against plain SparseGPT, prune seconds (search
included) and peak RSS.

Rows are cached in --cache (keyed by the full row spec, with the commit that measured them), so a long table can
be built over several invocations: a killed run resumes where it stopped. `--no-cache` measures everything anew.

Every row is scored on the calibration source's held-out split, on `licenses` (the out-of-domain test text) and on
`manpages` (the validation domain the refit's robust settings are chosen on; sparsecraft.domains), by default.

    python bench/quality.py --markdown                        # the full table (hours on 2 CPU cores)
    python bench/quality.py --settings 0.7,2:4 --markdown     # the acceptance settings only
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from common import RowCache, add_common_args, base_spec, domain_cells, finish, run_isolated

# name -> (method, recipe fields, which settings: "u" unstructured, "nm" N:M, "search" = with search only where
# --search-at says)
ROWS = {
    "wanda": ("wanda", {}, "u nm"),
    "wanda + owl": ("wanda", {"allocation": "owl"}, "u"),
    "wanda + dsnot": ("wanda", {"refine": ["dsnot"]}, "u nm"),
    "ria + permute": ("ria", {"permute": True}, "nm"),
    "sparsegpt": ("sparsegpt", {}, "u nm"),
    "+ owl": ("sparsegpt", {"allocation": "owl"}, "u"),
    "+ dsnot": ("sparsegpt", {"refine": ["dsnot"]}, "u nm"),
    "+ refit": ("sparsegpt", {"refine": ["refit"]}, "u nm"),
    "+ permute": ("sparsegpt", {"permute": True}, "nm"),
    # issue 14, part 2: the refit's robust settings (refine/refit.py), chosen on the validation domain (manpages)
    "+ refit, ridge 1": ("sparsegpt", {"refine": ["refit"], "refit_ridge": 1.0}, "u nm"),
    "+ refit, shrink 0.5": ("sparsegpt", {"refine": ["refit"], "refit_shrink": 0.5}, "u nm"),
    "+ refit, 5 CG steps": ("sparsegpt", {"refine": ["refit"], "refit_iters": 5}, "u nm"),
    "+ search": ("sparsegpt", {"search": True}, "search"),
    "owl + dsnot + refit": ("sparsegpt", {"allocation": "owl", "refine": ["dsnot", "refit"]}, "u"),
    "dsnot + refit": ("sparsegpt", {"refine": ["dsnot", "refit"]}, "nm"),
    "permute + dsnot + refit": ("sparsegpt", {"permute": True, "refine": ["dsnot", "refit"]}, "nm"),
    "search + dsnot + refit": ("sparsegpt", {"search": True, "refine": ["dsnot", "refit"]}, "search"),
}


def not_measured(name: str, setting: str, width: int = 9) -> list[str]:
    """A table row for a row the cache does not hold (--cached-only)."""
    return [name, setting, "not measured"] + ["-"] * (width - 3)


def setting_fields(setting: str) -> dict:
    return {"pattern": setting} if ":" in setting else {"pattern": "unstructured", "sparsity": float(setting)}


def cells(r: dict, dense: dict, baseline: dict | None, names: list[str] | None = None) -> list[str]:
    """sparsity, held-out ppl, out-of-domain ppl and geomean, x dense and the change against plain SparseGPT (both
    on the geometric mean over the domains when there are several; the held-out change too), prune s, RSS."""
    names = OTHERS if names is None else names
    key = "geomean" if names and r.get("geomean") and dense.get("geomean") else "perplexity"
    change = f"{(r[key] / baseline[key] - 1):+.1%}" if baseline and baseline is not r and key in baseline else "-"
    held = f"{(r['perplexity'] / baseline['perplexity'] - 1):+.1%}" if baseline and baseline is not r else "-"
    return [f"{r['sparsity']:.2%}", f"{r['perplexity']:.2f}", *domain_cells(r, names),
            f"{r[key] / dense[key]:.2f}", change, held, f"{r.get('prune_s', 0):.0f}", f"{r['peak_rss_mb']:.0f}"]


OTHERS: list[str] = []  # the out-of-domain sources of this run (set in main)


def replay_check(cache: RowCache, base: dict, setting: str, searched: dict, budget: str, results: list,
                 table: list, dense: dict, baseline: dict | None) -> str:
    """Prune again from the recipe the search saved (its per-block overrides, no search) and check that it lands on
    the searched row's perplexity; also check the search kept to its time budget."""
    from sparsecraft.search import parse_budget

    spec = {**base, "name": f"{setting} + search, replayed", "recipe": searched["recipe"]}
    r = cache.run(spec)
    if r is None:
        table.append(not_measured("+ search, replayed from its recipe", setting, 10 + len(OTHERS) + bool(OTHERS)))
        return f"search at {setting}: its replay is not measured yet"
    r["setting"], r["row"] = setting, "+ search, replayed"
    results.append(r)
    same = r["perplexity"] == searched["perplexity"]
    within = searched["search_s"] <= parse_budget(budget)
    table.append([f"+ search, replayed from its recipe ({'identical' if same else 'DIFFERS'})", setting,
                  *cells(r, dense, baseline)])
    note = (f"search at {setting}: {searched['search_s']:.0f} s of a {parse_budget(budget):.0f} s budget "
          f"({'within' if within else 'OVER'}), {searched['search']['generations']} generations, KL "
          f"{searched['search']['kl']:.4f} vs uniform {searched['search']['uniform_kl']:.4f}; replaying its recipe: "
          f"perplexity {r['perplexity']:.4f} vs {searched['perplexity']:.4f} ({'identical' if same else 'DIFFERS'})")
    print(note, file=sys.stderr, flush=True)
    return note


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="0.7,2:4,4:8,0.6,0.5", help="sparsities and/or N:M patterns")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"which rows to run, from: {', '.join(ROWS)}")
    ap.add_argument("--search-at", default="0.5,0.6,0.7", help="unstructured settings that get the search rows")
    ap.add_argument("--search-budget", default="10m", help="time budget of each search row")
    ap.add_argument("--fitness-samples", type=int, default=4, help="windows scoring each search candidate")
    ap.add_argument("--cache", default=str(Path(__file__).parent / "results" / "quality-cache.json"))
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--cached-only", action="store_true",
                    help="measure nothing: print the rows already in --cache, the others as 'not measured'")
    add_common_args(ap)
    args = ap.parse_args()
    if args.eval_data is None:  # the out-of-domain test text and the validation domain refinements are chosen on
        args.eval_data = ["licenses", "manpages"]
    if args.cached_only and args.no_cache:
        sys.exit("--cached-only prints the cache; it cannot go with --no-cache")
    cache = RowCache(None if args.no_cache else args.cache, run=None if args.cached_only else run_isolated,
                     stamp=lambda: {"commit": commit()})
    base, calib = base_spec(args)
    wanted = args.rows.split(",")
    unknown = [w for w in wanted if w not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {list(ROWS)}")
    search_at = set(args.search_at.split(","))
    notes: list[str] = []
    results = [cache.run({**base, "name": "dense", "recipe": None})]
    if results[0] is None:
        sys.exit(f"--cached-only: {args.cache} has no dense row for these settings")
    dense = results[0]
    OTHERS[:] = base["eval_data"]
    width = 10 + len(OTHERS) + bool(OTHERS)
    table = [["dense", "-", *cells(dense, dense, None)]]
    table[0][-2] = "-"
    for setting in args.settings.split(","):
        kind = "nm" if ":" in setting else "u"
        baseline = None
        for name in ROWS:
            method, extra, where = ROWS[name]
            applies = ("search" in where and setting in search_at) or kind in where.split()
            if name not in wanted or not applies:
                continue
            recipe = {**calib, **setting_fields(setting), "method": method, **extra}
            search = recipe.pop("search", None)
            spec = {**base, "name": f"{setting} {name}", "recipe": recipe}
            if search:
                spec["search"] = {"budget": args.search_budget, "fitness_samples": args.fitness_samples}
            r = cache.run(spec)
            if r is None:
                table.append(not_measured(name, setting, width))
                continue
            r["setting"], r["row"] = setting, name
            results.append(r)
            if name == "sparsegpt":
                baseline = r
            table.append([name, setting, *cells(r, dense, baseline)])
            print("done: " + " | ".join(table[-1]), file=sys.stderr, flush=True)  # partial results survive a kill
            if search and name == "+ search":
                notes.append(replay_check(cache, base, setting, r, args.search_budget, results, table, dense,
                                          baseline))
    geo = " (geomean)" if OTHERS else ""
    finish(args, ["recipe", "setting", "sparsity", "held-out ppl", *[f"{n} ppl" for n in OTHERS],
                  *(["geomean"] if OTHERS else []), f"x dense{geo}", f"vs sparsegpt{geo}", "vs sparsegpt held-out",
                  "prune s", "peak RSS MiB"], table, results)
    print("\n".join(notes))


if __name__ == "__main__":
    main()
