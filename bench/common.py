"""Shared by the benchmarks: run one pruning configuration in a fresh subprocess (so peak RSS is its own)
and print tables. A spec is a dict of Recipe fields plus model/data/eval settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).resolve()


def worker(spec: dict) -> dict:
    import torch

    import sparsecraft
    from sparsecraft.api import calibration_ids, make_recipe, peak_rss_mb

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    model, tokenizer = sparsecraft.load_model(spec["model"])
    splits = sparsecraft.load_text(spec["data"])
    row = {"name": spec["name"], "load_s": time.perf_counter() - t0}
    recipe_fields = spec.get("recipe")
    if recipe_fields:
        recipe = make_recipe(recipe_fields, data=spec["data"])  # recipe_fields may be a full saved recipe
        ids = calibration_ids(splits, tokenizer, recipe) if recipe.needs_data or spec.get("search") else None
        if spec.get("search"):
            from sparsecraft.search import parse_budget, search_recipe

            recipe, result = search_recipe(model, tokenizer, splits.calibration, ids, recipe,
                                           parse_budget(spec["search"]["budget"]), spec["search"]["fitness_samples"],
                                           progress=False)
            row["search_s"] = result.seconds
            row["search"] = {"generations": result.generations, "kl": result.fitness,
                             "uniform_kl": result.uniform_fitness}
        _, report = sparsecraft.prune(model, ids, recipe, progress=False)
        row["prune_s"] = report.seconds + row.get("search_s", 0.0)
        row["recipe"] = recipe.to_dict()
        row["layer_sparsity"] = {r.name: r.target_sparsity for r in report.layers}
    from sparsecraft.domains import eval_specs, evaluate_domains, load_sources

    # the calibration source's held-out split, then each out-of-domain source (sparsecraft.domains)
    sources = load_sources(eval_specs(spec.get("eval_data", []), spec["data"]), splits, defaults_optional=False)
    result = evaluate_domains(model, sources, tokenizer=tokenizer, seqlen=spec["eval_seqlen"],
                              max_windows=spec.get("max_eval_windows"), progress=False)
    row.update(perplexity=result["perplexity"], sparsity=result["sparsity"], eval_tokens=result["tokens"],
               domains={n: d["perplexity"] for n, d in result["domains"].items()}, geomean=result["geomean"],
               peak_rss_mb=peak_rss_mb())
    return row


def run_isolated(spec: dict, script: Path = WORKER, flags: tuple[str, ...] = ()) -> dict:
    """Run a worker (`script [flags] SPEC-JSON`, printing `RESULT {...}`) in a new Python process; return its row."""
    print(f"running {spec['name']} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, str(script), *flags, json.dumps(spec)], check=False, capture_output=True,
                          text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{spec['name']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


class RowCache:
    """Benchmark rows keyed by their spec (minus `ignore` keys) in a JSON file rewritten atomically after every row,
    so a long benchmark can be built over several invocations and a killed one resumes where it stopped."""

    def __init__(self, path: str | Path | None, run=run_isolated, ignore: tuple[str, ...] = ("threads",),
                 stamp=None):
        self.path = Path(path) if path else None
        self.rows = json.loads(self.path.read_text()) if self.path and self.path.exists() else {}
        self.runner, self.ignore, self.stamp = run, ignore, stamp

    def run(self, spec: dict, fresh: bool = False) -> dict | None:
        """The row for `spec`, from the cache or measured now; None when missing and the cache has no runner
        (`RowCache(path, run=None)`: print what has been measured, measure nothing)."""
        key = json.dumps({k: v for k, v in spec.items() if k not in self.ignore}, sort_keys=True)
        if key in self.rows and not fresh:
            print(f"cached {spec['name']} (measured at {self.rows[key].get('commit', '?')})", file=sys.stderr)
            return self.rows[key]
        if self.runner is None:
            return None
        row = {**self.runner(spec), **(self.stamp() if self.stamp else {})}
        if self.path:
            self.rows[key] = row
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.rows, indent=1))
            os.replace(tmp, self.path)
        return row


def add_common_args(ap) -> None:
    """Model, data, calibration and output flags every benchmark takes."""
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-eval-windows", type=int, default=None, help="per evaluation source")
    ap.add_argument("--eval-data", action="append", default=None,
                    help="out-of-domain evaluation texts besides --data's held-out split (repeatable or "
                         "comma-separated; default licenses: Debian's /usr/share/common-licenses; 'none')")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", action="store_true")


def base_spec(args) -> tuple[dict, dict]:
    """(evaluation settings, calibration recipe fields) from the common flags."""
    from sparsecraft.domains import eval_specs

    base = {"model": args.model, "data": args.data, "eval_seqlen": args.seqlen,
            "max_eval_windows": args.max_eval_windows, "eval_data": eval_specs(args.eval_data, args.data)[1:]}
    return base, {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed}


def finish(args, headers: list[str], table: list[list[str]], results: list[dict]) -> None:
    """Print the table and the run's settings; write the raw rows as JSON with --json."""
    print_table(headers, table, args.markdown)
    other = ", ".join(list(results[0].get("domains", {}))[1:]) or "none"
    print(f"model={args.model} data={args.data} calibration={args.nsamples}x{args.seqlen} tokens seed={args.seed}, "
          f"eval={results[0]['eval_tokens']} held-out tokens in windows of {args.seqlen}; out-of-domain: {other} "
          "(its held-out split; geomean: the geometric mean over every source)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def domain_cells(row: dict, names: list[str]) -> list[str]:
    """Perplexity on each out-of-domain source of `names` and the geometric mean (for rows with `domains`)."""
    if not names:
        return []
    got = row.get("domains", {})
    return [f"{got[n]:.2f}" if n in got else "-" for n in names] + \
        [f"{row['geomean']:.2f}" if row.get("geomean") else "-"]


def print_table(headers: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
        print("\n".join("| " + " | ".join(r) + " |" for r in rows))
    else:
        from sparsecraft.report import format_table

        print(format_table(headers, rows))


if __name__ == "__main__":
    print("RESULT " + json.dumps(worker(json.loads(sys.argv[1]))))
