"""`sparsecraft prune | eval` — every SparsecraftError becomes a one-line message and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
import warnings

from .cli_args import finite_float
from .data import MixedSplits, calibration_counts
from .domains import eval_specs, evaluate_domains, load_sources
from .errors import ConfigError, SparsecraftError


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None,
                   help="builtin (default: CPython docs, held-out split), wikitext2, c4 (local HF datasets), "
                        "a UTF-8 text file, a .jsonl file ({\"text\": ...} per line) or a directory of them; "
                        "or several, comma-separated, with optional weights (builtin:0.7,licenses:0.3; default "
                        "equal): calibration windows from each in proportion, each one's held-out split evaluated")
    p.add_argument("--eval-data", action="append", default=None,
                   help="out-of-domain evaluation text, besides --data's held-out split (repeatable or "
                        "comma-separated; names as for --data, or files); default: licenses (Debian's "
                        "/usr/share/common-licenses); 'none' for --data's split only. Reports each and their "
                        "geometric mean")
    p.add_argument("--max-eval-windows", type=int, default=None,
                   help="evaluate on at most this many windows (per evaluation source)")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    from .registry import method_names

    p.add_argument("--model", default="default", help="HF model directory, .gguf file, or 'default' (SmolLM2-135M)")
    p.add_argument("--recipe", default=None, help="YAML recipe; flags given here override its values")
    p.add_argument("--method", default=None, help=f"one of: {', '.join(method_names())} (default wanda)")
    p.add_argument("--sparsity", type=finite_float, default=None, help="fraction of zeros in [0, 1) (implied by N:M)")
    p.add_argument("--pattern", default=None, help="unstructured (default) or N:M, e.g. 2:4 or 4:8")
    p.add_argument("--targets", action="append", default=None, help="regex of layer names to prune (repeatable)")
    p.add_argument("--ignore", action="append", default=None, help="regex of layer names to skip (repeatable)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 64)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 512)")
    p.add_argument("--seed", type=int, default=None, help="seed for drawing calibration windows (default 0)")
    p.add_argument("--batch-size", type=int, default=None, help="calibration windows per forward (default 8)")
    p.add_argument("--damp", type=finite_float, default=None, help="SparseGPT dampening, fraction of mean diag(H)")
    p.add_argument("--blocksize", type=int, default=None, help="SparseGPT column block size (default 128)")
    p.add_argument("--allocation", default=None, choices=["uniform", "owl", "search"],
                   help="per-layer sparsity: uniform (default), owl (outlier-weighed) or search (evolutionary, KL to "
                        "the dense model, see `sparsecraft search`); the overall sparsity is kept exact")
    p.add_argument("--search-budget", default=None, help="allocation=search: time for the search (90s, 20m, 1h)")
    p.add_argument("--owl-lambda", type=finite_float, default=None,
                   help="OWL spread: layer sparsity in s +- lambda (0.08)")
    p.add_argument("--owl-m", type=finite_float, default=None, help="OWL outlier threshold, x mean score (5)")
    p.add_argument("--refine", default=None,
                   help="refinements after the method, comma-separated, in order: dsnot (mask), refit (weights)")
    p.add_argument("--dense-targets", action="store_true", default=None,
                   help="reconstruct each layer towards the dense model's outputs (corrects earlier blocks' error)")
    p.add_argument("--permute", action="store_true", default=None,
                   help="N:M only: permute input channels so the mask keeps more importance, folded exactly into "
                        "the producer layers (MLP down_proj <- gate/up, fc2 <- fc1); the model stays drop-in")
    p.add_argument("--moe-calibration", default=None, choices=["routed", "all"],
                   help="mixture-of-experts models: collect each expert's statistics from the tokens routed to it "
                        "(default) or from every calibration token (covers rarely picked experts; the block's "
                        "output still uses the routed experts only)")
    p.add_argument("--dsnot-cycles", type=int, default=None, help="DSnoT: at most this many swaps per row (50)")
    p.add_argument("--dsnot-threshold", type=finite_float, default=None,
                   help="DSnoT: stop a row at |shift| <= this (0.1)")
    p.add_argument("--refit-ridge", type=finite_float, default=None,
                   help="refit: pull towards the one-shot weights, x mean diag(H) (0: plain least squares)")
    p.add_argument("--refit-shrink", type=finite_float, default=None,
                   help="refit: shrink the Hessian towards its diagonal, share of the off-diagonal removed in [0, 1]")
    p.add_argument("--refit-iters", type=int, default=None, help="refit: conjugate-gradient steps (50)")
    p.add_argument("--refit-damp", type=finite_float, default=None, help="refit's own dampening (default: --damp)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--dtype", default=None, help="load the model in float32, bfloat16 or float16")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-eval", action="store_true", help="skip the dense and sparse perplexity evaluation")
    p.add_argument("--allow-large", action="store_true",
                   help="run searches (and sweeps) larger than sparsecraft's sane bounds (see README)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsecraft", description="Make LLMs sparse, small and fast.")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="one-shot prune a model with calibration data")
    _add_prune_args(p)
    _add_data_args(p)

    s = sub.add_parser("search", help="search per-block sparsities (evolutionary, KL to the dense model), then prune "
                                      "(= prune --allocation search)")
    _add_prune_args(s)
    s.add_argument("--budget", default=None, help="time for the search (database + evolution): 90s, 20m (default), 1h")
    s.add_argument("--step", type=finite_float, default=None, help="sparsity step between a block's levels (0.05)")
    s.add_argument("--max-steps", type=int, default=None, help="levels on each side of the target (3)")
    s.add_argument("--fitness-samples", type=int, default=None, help="calibration windows scoring each candidate (4)")
    s.add_argument("--offspring", type=int, default=None, help="candidates per generation (8)")
    s.add_argument("--fitness-data", default=None,
                   help="score candidates on windows of this text instead of the calibration text (e.g. manpages, "
                        "the validation domain: its calibration part)")
    _add_data_args(s)

    e = sub.add_parser("eval", help="perplexity and sparsity of a model")
    e.add_argument("model", help="model directory, .gguf file or 'default'")
    e.add_argument("--seqlen", type=int, default=512, help="tokens per evaluation window")
    e.add_argument("--json", default=None, help="also write the report to this JSON file")
    e.add_argument("--layers", action="store_true", help="print the per-layer sparsity table")
    e.add_argument("--dtype", default=None)
    e.add_argument("--tasks", default=None,
                   help="also run lm-eval tasks (pip install 'sparsecraft[tasks]'), comma-separated: task names "
                        "(hellaswag,arc_easy), task YAML files or directories of them; only data already on disk "
                        "(local files or the local HF datasets cache): the hub stays offline")
    e.add_argument("--num-fewshot", type=int, default=None,
                   help="--tasks: examples in each prompt (default 0: zero-shot)")
    e.add_argument("--limit", type=int, default=None,
                   help="--tasks: at most this many documents per task (quick checks; not comparable figures)")
    _add_data_args(e)

    x = sub.add_parser("export", help="write a pruned model in a compressed-tensors sparse format (smaller files)")
    x.add_argument("src", help="sparsecraft output or HF model directory")
    x.add_argument("--format", default="bitmask", help="bitmask (sparse-bitmask, any sparsity; default) or 2:4 "
                                                       "(sparse-24-bitmask, every pruned layer must be 2:4)")
    x.add_argument("--dtype", default=None, help="int8: store the compressed layers' values as int8 with a float32 "
                                                 "scale per output row (bitmask only); or load the model in "
                                                 "float32, bfloat16 or float16 first (default: as saved)")
    x.add_argument("--out", required=True, help="output directory (written atomically)")
    x.add_argument("--force", action="store_true", help="replace --out if it exists")
    x.add_argument("--quiet", action="store_true", help="no progress bars")

    from .cli_report import add_parsers  # `sweep` and `report`

    add_parsers(sub, _add_prune_args, _add_data_args)

    from .cli_finetune import add_parser as add_finetune_parser  # `finetune`

    add_finetune_parser(sub, _add_data_args)

    from .cli_kernels import add_parsers as add_kernel_parsers  # `bench` and `generate` (CPU sparse kernels)

    add_kernel_parsers(sub)

    from .cli_activate import add_parser as add_activate_parser  # `activate` (activation sparsity)

    add_activate_parser(sub, _add_data_args)
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="print the traceback of an unexpected error")
    return parser


def _recipe(args):
    from . import api

    return api.make_recipe(
        args.recipe, method=args.method, sparsity=args.sparsity, pattern=args.pattern, targets=args.targets,
        ignore=args.ignore, data=args.data, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        batch_size=args.batch_size, damp=args.damp, blocksize=args.blocksize, allocation=args.allocation,
        owl_lambda=args.owl_lambda, owl_m=args.owl_m, refine=args.refine, dsnot_cycles=args.dsnot_cycles,
        dsnot_threshold=args.dsnot_threshold, dense_targets=args.dense_targets, permute=args.permute,
        search_budget=args.search_budget, moe_calibration=args.moe_calibration, refit_ridge=args.refit_ridge,
        refit_shrink=args.refit_shrink, refit_iters=args.refit_iters, refit_damp=args.refit_damp,
    )


def evaluation_record(recipe, dense: dict, sparse: dict) -> dict:
    """sparsecraft.json's `evaluation`: the sparse model's perplexities (built-in held-out and every out-of-domain
    source, their geometric mean) beside the dense model's on the same windows."""
    return {"data": recipe.data, "seqlen": recipe.seqlen, "windows": sparse["windows"],
            "dense_perplexity": dense["perplexity"], "perplexity": sparse["perplexity"],
            "domains": {n: {"dense_perplexity": dense["domains"][n]["perplexity"], **d}
                        for n, d in sparse["domains"].items()},
            "dense_geomean": dense["geomean"], "geomean": sparse["geomean"]}


def cmd_prune(args) -> int:
    return _prune(args, _recipe(args))


def cmd_search(args) -> int:
    from . import api

    recipe = api.make_recipe(_recipe(args), allocation="search", search_budget=args.budget, search_step=args.step,
                             search_max_steps=args.max_steps, search_fitness_samples=args.fitness_samples,
                             search_offspring=args.offspring, search_fitness_data=args.fitness_data)
    return _prune(args, recipe)


def _prune(args, recipe) -> int:
    """Load, (search,) prune, evaluate, save and print the table — shared by `prune` and `search`."""
    from . import api
    from .checkpoint import check_output
    from .cli_args import check_eval_args, check_search_size
    from .models import check_context_early, load_model, resolve_device
    from .report import format_table

    out = check_output(args.out, args.force, what="--out", create_parents=False)
    check_eval_args(args)
    check_search_size(recipe, args.allow_large)
    device = resolve_device(args.device)
    progress = not args.quiet
    t0 = time.perf_counter()
    if recipe.needs_data or not args.no_eval:
        check_context_early(args.model, recipe.seqlen)
    splits = api.load_text(recipe.data)  # bad text fails before the model loads
    if recipe.needs_data and isinstance(splits, MixedSplits):
        calibration_counts(splits, recipe.nsamples)  # and so does a mix that leaves a source without a window
    sources = None if args.no_eval else load_sources(eval_specs(args.eval_data, recipe.data), splits)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    model.to(device)
    load_s = time.perf_counter() - t0

    def evaluate() -> dict:
        return evaluate_domains(model, sources, tokenizer=tokenizer, seqlen=recipe.seqlen,
                                batch_size=args.eval_batch_size, max_windows=args.max_eval_windows,
                                progress=progress)

    dense = None if args.no_eval else evaluate()
    _, report = api.prune(model, splits, recipe, tokenizer=tokenizer, device=device, progress=progress)
    if report.search:
        found = report.search
        print(f"search: {found['generations']} generations, {found['evaluations']} evaluations in "
              f"{found['seconds']:.0f}s (budget {found['budget_s']:.0f}s); KL to dense {found['uniform_kl']:.4f} "
              f"(uniform) -> {found['kl']:.4f}")
    sparse = None if args.no_eval else evaluate()
    evaluation = None if sparse is None else evaluation_record(recipe, dense, sparse)
    api.save(model, out, tokenizer=tokenizer, report=report, evaluation=evaluation, source=str(args.model),
             force=args.force)
    names = list(sparse["domains"]) if sparse is not None else []
    others = names[1:]

    def ppl_cells(result):
        if result is None:
            return [None] * (1 + len(others) + bool(others))
        cells = [result["domains"][n]["perplexity"] for n in names]
        return cells + ([result["geomean"]] if others else [])

    rows = []
    if dense is not None:
        rows.append(["dense", "-", f"{dense['sparsity']:.2%}", *ppl_cells(dense), "-"])
    rows.append([recipe.method, recipe.pattern, f"{report.sparsity:.2%}", *ppl_cells(sparse),
                 f"{report.seconds:.1f}"])
    ppl_headers = [f"ppl {n}" for n in names] + (["geomean"] if others else []) if names else ["perplexity"]
    print(format_table(["model", "pattern", "sparsity", *ppl_headers, "prune s"], rows))
    print(f"load {load_s:.1f}s, peak RSS {api.peak_rss_mb():.0f} MiB; saved to {out} (recipe in {out}/recipe.yaml)")
    return 0


def cmd_eval(args) -> int:
    from . import api
    from .checkpoint import check_output_file, read_metadata, write_json_atomic
    from .cli_args import check_eval_args
    from .models import check_context_early, load_model
    from .report import format_table

    if args.json:
        check_output_file(args.json, "--json")
    check_eval_args(args)
    if args.seqlen < 2:
        raise ConfigError(f"--seqlen must be >= 2 (a window predicts its tokens from the ones before), got "
                          f"{args.seqlen}")
    check_context_early(args.model, args.seqlen)
    meta = read_metadata(args.model) if args.model != "default" and os.path.isdir(args.model) else {}
    splits = api.load_text(args.data or "builtin")  # bad text fails before the model loads
    sources = load_sources(eval_specs(args.eval_data, args.data or "builtin"), splits)
    from . import tasks as lm_tasks

    plan = lm_tasks.from_args(args)  # lm-eval and each task's local data, before the model loads (None: no --tasks)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    from .cli_activate import installed_for_eval, print_activation

    activation = installed_for_eval(model, args.model)  # thresholds in the directory: applied and measured
    with activation or contextlib.nullcontext():
        result = evaluate_domains(model, sources, tokenizer=tokenizer, seqlen=args.seqlen,
                                  batch_size=args.eval_batch_size, max_windows=args.max_eval_windows,
                                  progress=not args.quiet)
        if plan is not None:  # the model as loaded and evaluated: sparse weights, kernels, activation sparsity
            result["tasks"] = lm_tasks.run_from_args(plan, args, model, tokenizer)
    if activation is not None:
        result["activation"] = activation.summary()
        print_activation(result["activation"])
    result["data"] = str(args.data or "builtin")  # as given, as before
    if args.layers:
        print(format_table(["layer", "shape", "sparsity"],
                           [[n, "x".join(map(str, v["shape"])), f"{v['sparsity']:.2%}"]
                            for n, v in result["layers"].items()]))
    recipe = meta.get("recipe", {})
    rows = [[args.model, recipe.get("method", "-"), recipe.get("pattern", "-"), name, d["windows"],
             f"{result['sparsity']:.2%}", d["perplexity"]] for name, d in result["domains"].items()]
    if len(rows) > 1:
        rows.append([args.model, recipe.get("method", "-"), recipe.get("pattern", "-"), "geometric mean", "-",
                     f"{result['sparsity']:.2%}", result["geomean"]])
    if not isinstance(splits, MixedSplits):  # a mix's rows are its sources, by name
        rows[0][3] = result["data"]
    print(format_table(["model", "method", "pattern", "data", "windows", "sparsity", "perplexity"], rows))
    if plan is not None:
        print(lm_tasks.format_tasks(result["tasks"]))
    if args.json:
        write_json_atomic(args.json, {**result, "model": args.model, "recipe": recipe})
    return 0


def cmd_export(args) -> int:
    from .checkpoint import check_output
    from .compressed import export

    check_output(args.out, args.force, what="--out", create_parents=False)
    t0 = time.perf_counter()
    r = export(args.src, args.out, args.format, force=args.force, dtype=args.dtype)
    ratio = r.stored_bytes / r.dense_bytes if r.dense_bytes else 0.0
    values = f" ({r.value_dtype} values)" if r.value_dtype else ""
    print(f"{r.format}{values}: {len(r.layers)} layers compressed, {len(r.dense_layers)} kept dense; tensors "
          f"{r.dense_bytes / 2**20:.2f} MiB dense -> {r.stored_bytes / 2**20:.2f} MiB ({ratio:.1%}) in "
          f"{time.perf_counter() - t0:.1f}s; saved to {r.path} (sparsecraft.load / sparsecraft eval read it)")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad flag raises UsageError (exit 2 through `main`) instead of printing the
    usage block and exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


class UsageError(SparsecraftError):
    """A command line argparse cannot parse."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the process is, so that every cleanup a Ctrl-C runs runs for them too."""

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


@contextlib.contextmanager
def _termination_as_interrupt():
    """While a command runs (main thread only): SIGTERM and SIGHUP raise Terminated; a second one while cleaning up
    is ignored, so the cleanup finishes."""
    import signal
    import threading

    names = [n for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = []

    def handler(signum, frame):
        if not raised:
            raised.append(signum)
            raise Terminated(signum)

    previous = {}
    for name in names:
        sig = getattr(signal, name)
        try:
            previous[sig] = signal.signal(sig, handler)
        except (OSError, ValueError):
            pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command. Foreseen failures (SparsecraftError, unreadable or unwritable files) print one line and
    return 2; anything else prints one line and returns 1 (`--debug` prints the traceback too); Ctrl-C, SIGTERM and
    SIGHUP clean up and return 128 + the signal number."""
    from .checkpoint import WRITTEN

    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    bars = None
    WRITTEN.clear()
    try:
        with _termination_as_interrupt():
            parser = build_parser()
            args = parser.parse_args(argv)
            debug = debug or getattr(args, "debug", False)
            from transformers.utils import logging as hf_logging

            bars = hf_logging.is_progress_bar_enabled()
            if getattr(args, "quiet", False):  # also silence transformers' own bars ("Loading weights")
                hf_logging.disable_progress_bar()
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return _run(args)
    except SparsecraftError as exc:
        if debug:
            traceback.print_exc()
        print(f"sparsecraft: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        done = [str(p) for p in dict.fromkeys(WRITTEN) if p.exists()]
        what = f"wrote only {', '.join(done)}" if done else "nothing was written"
        how = f"terminated ({exc})" if isinstance(exc, Terminated) else "interrupted"
        print(f"sparsecraft: {how}; {what}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    except MemoryError:
        if debug:
            traceback.print_exc()
        print("sparsecraft: error: out of memory: use a smaller model, --batch-size, --nsamples or --seqlen",
              file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if debug:
            traceback.print_exc()
        if "out of memory" in str(exc) or "can't allocate memory" in str(exc):
            print("sparsecraft: error: out of memory: use a smaller model, --batch-size, --nsamples or --seqlen",
                  file=sys.stderr)
            return 2
        print(f"sparsecraft: error: unexpected RuntimeError: {_first_line(exc)} (run with --debug for the "
              "traceback)", file=sys.stderr)
        return 1
    except OSError as exc:  # a file that cannot be read or written (disk full, permissions, ...)
        if debug:
            traceback.print_exc()
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"sparsecraft: error: {exc.strerror or _first_line(exc)}{where}: check the path, its permissions and "
              "free space", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the one place that turns a bug into one line
        if debug:
            traceback.print_exc()
        print(f"sparsecraft: error: unexpected {type(exc).__name__}: {_first_line(exc)} (run with --debug for the "
              "traceback)", file=sys.stderr)
        return 1
    finally:
        if bars:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """sparsecraft's own warnings as one line (`sparsecraft: warning: ...`); others as Python prints them."""
    if issubclass(category, UserWarning) and f"{os.sep}sparsecraft{os.sep}" in str(filename):
        print(f"sparsecraft: warning: {message}", file=sys.stderr)
    else:
        (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))


def _run(args) -> int:
    from .cli_activate import cmd_activate
    from .cli_finetune import cmd_finetune
    from .cli_kernels import cmd_bench, cmd_generate
    from .cli_report import cmd_report, cmd_sweep

    return {"activate": cmd_activate, "prune": cmd_prune, "search": cmd_search, "eval": cmd_eval,
            "sweep": cmd_sweep, "report": cmd_report, "export": cmd_export, "finetune": cmd_finetune,
            "bench": cmd_bench, "generate": cmd_generate}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
