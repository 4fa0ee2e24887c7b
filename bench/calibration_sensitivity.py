"""How sensitive each recipe is to the calibration domain (issue 14, part 3).

The same recipe calibrated on each of `--domains` in turn (and, with `--mix`, on all of them at once: `--data
A,B`, equal shares), every row evaluated on every domain's held-out split. Each cell is the perplexity on that
domain and, in brackets, its change against the same recipe calibrated on that domain itself (the in-domain
figure): how much calibrating elsewhere costs. `cross` is the geometric mean of those changes over the domains a
row was not calibrated on (for a mix row: over every domain). Each row in its own process (bench/common.py's
worker), the same seeded windows for every recipe.

    python bench/calibration_sensitivity.py --domains builtin,licenses --settings 0.5,2:4 --mix --markdown
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from common import RowCache, print_table, run_isolated, worker

ROWS = {
    "wanda": ("wanda", {}),
    "sparsegpt": ("sparsegpt", {}),
    "sparsegpt + dsnot + refit": ("sparsegpt", {"refine": ["dsnot", "refit"]}),
    "sparsegpt + refit, ridge 1": ("sparsegpt", {"refine": ["refit"], "refit_ridge": 1.0}),
}


def setting_fields(setting: str) -> dict:
    return {"pattern": setting} if ":" in setting else {"pattern": "unstructured", "sparsity": float(setting)}


def calibrations(domains: list[str], mix: bool) -> list[str]:
    """The calibration specs of a recipe's rows: each domain, then the equal mix of them all."""
    return [*domains, *([",".join(domains)] if mix else [])]


def spec_for(args, domains: list[str], calibration: str, recipe: dict | None, name: str) -> dict:
    """A worker spec evaluating on every domain (the calibration source's split first, as the worker reports)."""
    others = [d for d in domains if d not in calibration.split(",")]  # a mix's own sources come with it
    return {"model": args.model, "data": calibration, "eval_seqlen": args.seqlen,
            "max_eval_windows": args.max_eval_windows, "eval_data": others or ["none"], "recipe": recipe,
            "name": name}


def domain_names(domains: list[str]) -> list[str]:
    from sparsecraft.data import load_text

    return [load_text(d).name for d in domains]


def sensitivity_cells(rows: dict[str, dict], domains: list[str], names: list[str], calibration: str) -> list[str]:
    """Cells of the row calibrated on `calibration`: each domain's perplexity (change against that domain
    calibrated on itself), then `cross`."""
    row = rows[calibration]
    cells, changes = [], []
    for domain, name in zip(domains, names):
        ppl = row["domains"][name]
        own = rows[domain]["domains"][name]
        if domain == calibration:
            cells.append(f"{ppl:.2f}")
            continue
        changes.append(ppl / own)
        cells.append(f"{ppl:.2f} ({ppl / own - 1:+.1%})")
    cross = math.exp(sum(math.log(c) for c in changes) / len(changes)) - 1 if changes else float("nan")
    return cells + [f"{cross:+.1%}"]


def run(args, runner) -> tuple[list[str], list[list[str]], list[dict]]:
    domains = [d.strip() for d in args.domains.split(",")]
    if len(domains) < 2 or len(set(domains)) != len(domains):
        sys.exit(f"--domains needs two or more different sources, got {args.domains!r}")
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {list(ROWS)}")
    names = domain_names(domains)  # a bad source fails before anything runs
    cache = RowCache(args.cache, run=runner)
    calib = {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed}
    dense = cache.run(spec_for(args, domains, domains[0], None, "dense"))
    table = [["dense", "-", "-", *[f"{dense['domains'][n]:.2f}" for n in names], "-"]]
    results = [dense]
    for setting in args.settings.split(","):
        for row_name in args.rows.split(","):
            method, extra = ROWS[row_name]
            recipe = {**calib, **setting_fields(setting), "method": method, **extra}
            rows = {}
            for calibration in calibrations(domains, args.mix):
                r = cache.run(spec_for(args, domains, calibration, recipe, f"{setting} {row_name} on {calibration}"))
                r.update(setting=setting, row=row_name, calibration=calibration)
                rows[calibration] = r
                results.append(r)
            for calibration in rows:
                table.append([row_name, setting, calibration,
                              *sensitivity_cells(rows, domains, names, calibration)])
                print("done: " + " | ".join(table[-1]), file=sys.stderr, flush=True)
    headers = ["recipe", "setting", "calibrated on", *[f"{n} ppl" for n in names], "cross"]
    return headers, table, results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", default="builtin,licenses", help="comma-separated calibration/evaluation sources")
    ap.add_argument("--mix", action="store_true", help="also calibrate on all the domains at once (equal shares)")
    ap.add_argument("--settings", default="0.5,2:4", help="sparsities and/or N:M patterns")
    ap.add_argument("--rows", default="wanda,sparsegpt,sparsegpt + dsnot + refit",
                    help=f"recipes, from: {', '.join(ROWS)}")
    ap.add_argument("--model", default="default")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-eval-windows", type=int, default=None, help="per evaluation source")
    ap.add_argument("--cache", default=None, help="JSON file of measured rows (resume a killed run)")
    ap.add_argument("--in-process", action="store_true",
                    help="run every row in this process (quick checks; peak RSS is then shared)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    headers, table, results = run(args, worker if args.in_process else run_isolated)
    print_table(headers, table, args.markdown)
    print(f"model={args.model} calibration={args.nsamples}x{args.seqlen} tokens seed={args.seed}; each cell: "
          "perplexity on that domain's held-out split (change vs the recipe calibrated on that domain); cross: "
          "geometric mean of the changes off the calibration domain")
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
