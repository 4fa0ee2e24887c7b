"""`sparsecraft sweep` and `sparsecraft report`: argument parsers and commands (wired into cli.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_args import finite_float
from .errors import ConfigError


def add_parsers(sub, add_prune_args, add_data_args) -> None:
    """Add the `sweep` and `report` subcommands. `sweep` takes every model/data/calibration flag of `prune`
    (so it follows any flag added there); --methods/--sparsities/--pattern replace --method/--sparsity/--pattern."""
    s = sub.add_parser("sweep", conflict_handler="resolve",
                       help="prune with every method x sparsity, held-out perplexity of each, JSON + HTML report")
    add_prune_args(s)
    add_data_args(s)
    s.add_argument("--methods", default="magnitude,wanda,sparsegpt",
                   help="comma-separated methods (default magnitude,wanda,sparsegpt)")
    s.add_argument("--sparsities", default=None,
                   help="START:STOP:STEP (STOP included) or a comma list, e.g. 0.3:0.8:0.1 or 0.5,0.7")
    s.add_argument("--pattern", default=None,
                   help="unstructured (default), N:M, or a comma list such as unstructured,2:4; an N:M pattern gives "
                        "one row per method at its implied sparsity")
    s.add_argument("--report", default=None, help="write the HTML report to this file")
    s.add_argument("--json", default=None,
                   help="the sweep table, rewritten after every row (default: the report's name with .json, "
                        "else sweep.json)")
    s.add_argument("--heatmap", default=None,
                   help="METHOD@SPARSITY (or METHOD@N:M) of the row whose per-layer sparsity the report shows")
    s.add_argument("--knee-tolerance", type=finite_float, default=None,
                   help="knee = largest sparsity whose perplexity stays within this x dense (1.5)")
    s.add_argument("--resume", action="store_true", help="keep the finished rows of an existing --json table")
    s.add_argument("--force", action="store_true", help="replace an existing --json table")
    for flag in ("--out", "--method", "--sparsity"):  # prune's, not sweep's: rejected with a hint in cmd_sweep
        s.add_argument(flag, default=None, help=argparse.SUPPRESS)
    s.add_argument("--no-eval", action="store_true", default=False, help=argparse.SUPPRESS)

    r = sub.add_parser("report", help="per-layer report of a pruned directory, or the HTML report of a sweep table")
    r.add_argument("path", help="a directory written by prune/search --out, or a sweep .json table")
    r.add_argument("--html", default=None, help="write a self-contained HTML report to this file")
    r.add_argument("--json", default=None, help="also write the measured per-layer table to this JSON file")
    r.add_argument("--heatmap", default=None, help="sweep tables: METHOD@SPARSITY of the row to show per layer")
    r.add_argument("--knee-tolerance", type=finite_float, default=None, help="sweep tables: knee limit, x dense (1.5)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")


def _base_recipe(args):
    from .cli import _recipe

    base = argparse.Namespace(**vars(args))
    base.method = base.sparsity = base.pattern = None
    return _recipe(base)


def _tolerance(value: float | None) -> float | None:
    if value is not None and not value >= 1:
        raise ConfigError(f"--knee-tolerance must be >= 1 (a multiple of the dense perplexity), got {value}")
    return value


def cmd_sweep(args) -> int:
    from .checkpoint import check_output_file
    from .cli_args import MAX_SWEEP_ROWS, check_eval_args, check_search_size, check_sweep_size
    from .html_report import sweep_html, write_text_atomic
    from .models import check_context_early, resolve_device
    from .report import format_table
    from .sweep import (
        DEFAULT_KNEE_TOLERANCE,
        check_outputs,
        find_row,
        parse_methods,
        parse_sparsities,
        plan_rows,
        run_sweep,
        summary_headers,
        summary_rows,
    )

    for flag, value in (("--out", args.out), ("--method", args.method), ("--sparsity", args.sparsity)):
        if value is not None:
            raise ConfigError(f"sweep does not take {flag}: use --methods, --sparsities, --report and --json")
    if args.no_eval:
        raise ConfigError("sweep always evaluates perplexity: drop --no-eval")
    if args.resume and args.force:
        raise ConfigError("--resume keeps the finished rows and --force discards them: pass one of them")
    tolerance = _tolerance(args.knee_tolerance) or DEFAULT_KNEE_TOLERANCE
    limit = None if args.allow_large else MAX_SWEEP_ROWS
    rows = plan_rows(parse_methods(args.methods), parse_sparsities(args.sparsities, limit), args.pattern)
    check_sweep_size(len(rows), args.allow_large)
    base = _base_recipe(args)
    check_search_size(base, args.allow_large)
    check_eval_args(args)
    report = check_output_file(args.report, "--report") if args.report else None
    json_path = Path(args.json).expanduser() if args.json else (report.with_suffix(".json") if report
                                                                 else Path("sweep.json"))
    json_path = check_output_file(json_path, "--json")
    if report is not None and report.resolve() == json_path.resolve():
        raise ConfigError(f"--report and --json are the same file {report}: give the report an .html name")
    check_outputs(json_path, report, args.force, args.resume)
    if args.heatmap:  # a clear error now rather than after the sweep
        find_row({"rows": [{"key": r.key, "method": r.method, "pattern": r.pattern, "sparsity": r.sparsity}
                           for r in rows]}, args.heatmap)
    check_context_early(args.model, base.seqlen)
    device = resolve_device(args.device)

    def on_row(row: dict, bar) -> None:
        if not args.quiet:
            bar.write(f"{row['key']}: perplexity {row['perplexity']:.4g} ({row['ratio']:.2f}x dense), sparsity "
                      f"{row['reached']:.2%}, pruned in {row['seconds']:.1f}s")

    try:
        data = run_sweep(model_spec=args.model, dtype=args.dtype, base_recipe=base, rows=rows, json_path=json_path,
                         device=device, eval_seqlen=base.seqlen, eval_batch_size=args.eval_batch_size,
                         max_eval_windows=args.max_eval_windows, resume=args.resume, progress=not args.quiet,
                         knee_tolerance=tolerance, on_row=on_row, eval_data=args.eval_data)
    except KeyboardInterrupt as exc:
        kept = "finished rows are kept in " + str(json_path) if json_path.exists() else "no row finished"
        how = f"terminated ({exc})" if getattr(exc, "signum", None) else "interrupted"
        print(f"sparsecraft: {how}; {kept} (continue with --resume)", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    print(format_table(summary_headers(data), summary_rows(data)))
    _print_knees(data, tolerance)
    print(f"sweep table: {json_path}")
    if report is not None:
        write_text_atomic(report, sweep_html(data, heatmap=args.heatmap, tolerance=tolerance))
        print(f"report: {report}")
    return 0


def _print_knees(data: dict, tolerance: float | None) -> None:
    from .report import format_table
    from .sweep import knees

    kn = knees(data, tolerance)
    if kn:
        tol = next(iter(kn.values()))["tolerance"]
        print(format_table(
            ["method", f"knee (<= {tol:g}x dense)", "perplexity", "crossing"],
            [[m, f"{k['sparsity']:g}" if k["sparsity"] is not None else "none", k["perplexity"],
              "beyond sweep" if not k["exceeded"] else (f"{k['crossing']:.3f}" if k["crossing"] is not None else "-")]
             for m, k in kn.items()]))


def cmd_report(args) -> int:
    from .checkpoint import check_output_file, write_json_atomic
    from .html_report import dir_html, dir_rows, dir_summary, measure_dir, sweep_html, write_text_atomic
    from .report import format_table

    path = Path(args.path).expanduser()
    tolerance = _tolerance(args.knee_tolerance)
    for flag in ("--html", "--json"):
        value = getattr(args, flag[2:])
        if value:
            check_output_file(value, flag)
    if args.html and args.json and Path(args.html).expanduser().resolve() == Path(args.json).expanduser().resolve():
        raise ConfigError(f"--html and --json are the same file {args.html}: give them different names")
    if path.suffix == ".json" and not path.is_dir():
        from .sweep import load_sweep, summary_headers, summary_rows

        if args.json:
            raise ConfigError("--json is for model directories; a sweep table is already JSON")
        data = load_sweep(path)
        print(format_table(summary_headers(data), summary_rows(data)))
        if data.get("dense"):
            _print_knees(data, tolerance)
        if args.html:
            write_text_atomic(args.html, sweep_html(data, heatmap=args.heatmap, tolerance=tolerance))
            print(f"report: {args.html}")
        return 0
    if args.heatmap or args.knee_tolerance is not None:
        raise ConfigError("--heatmap and --knee-tolerance are for sweep tables (.json), not model directories")
    info = measure_dir(path)
    if args.html:
        write_text_atomic(args.html, dir_html(info))
    if args.json:
        write_json_atomic(args.json, {k: v for k, v in info.items() if k != "recipe_yaml"})
    if not args.html:
        print(format_table(*dir_rows(info)))
    print(format_table(*dir_summary(info)))
    if args.html:
        print(f"report: {args.html}")
    return 0
