"""`sparsecraft activate` (calibrate activation thresholds, save them with the model) and what `eval` adds for a
directory that has them (perplexity with the thresholds applied, measured activation sparsity per projection)."""

from __future__ import annotations

import time
from pathlib import Path

from .cli_args import finite_float


def add_parser(sub, add_data_args) -> None:
    from .activation import ALLOCATIONS, POLICIES, method_names

    a = sub.add_parser("activate", help="calibrate activation-sparsity thresholds (TEAL, CATS, CHESS, WINA) and save "
                                        "them with the model")
    a.add_argument("model", help="model directory (dense or pruned), .gguf file or 'default'")
    a.add_argument("--recipe", default=None, help="YAML activation recipe; flags given here override its values")
    a.add_argument("--method", default=None, help=f"one of: {', '.join(method_names())} (default teal)")
    a.add_argument("--sparsity", type=finite_float, default=None,
                   help="share of activations zeroed, weighted by the weight bytes they skip, in [0, 1) (0.4)")
    a.add_argument("--allocation", default=None, choices=list(ALLOCATIONS),
                   help="uniform (every site the target; default) or greedy (TEAL's block-wise greedy)")
    a.add_argument("--policy", default=None, choices=list(POLICIES),
                   help="all: sparsify every token (default; what eval measures); decode: single-token forwards "
                        "only, prefill stays dense")
    a.add_argument("--nsamples", type=int, default=None, help="calibration windows (16)")
    a.add_argument("--seqlen", type=int, default=None, help="tokens per window (512)")
    a.add_argument("--seed", type=int, default=None, help="seed for drawing calibration windows (0)")
    a.add_argument("--batch-size", type=int, default=None, help="calibration windows per forward (4)")
    a.add_argument("--greedy-step", type=finite_float, default=None, help="greedy: sparsity step per site (0.1)")
    a.add_argument("--greedy-samples", type=int, default=None,
                   help="greedy: calibration windows the block output error is measured on (1)")
    a.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto")
    a.add_argument("--dtype", default=None, help="load the model in float32, bfloat16 or float16")
    a.add_argument("--out", required=True, help="output directory (written atomically)")
    a.add_argument("--force", action="store_true", help="replace --out if it exists")
    a.add_argument("--no-eval", action="store_true", help="skip the dense and activation-sparse evaluation")
    add_data_args(a)


def _recipe(args):
    from .activation import ActivationRecipe

    return ActivationRecipe.make(args.recipe, method=args.method, sparsity=args.sparsity, allocation=args.allocation,
                                 policy=args.policy, data=args.data, nsamples=args.nsamples, seqlen=args.seqlen,
                                 seed=args.seed, batch_size=args.batch_size, greedy_step=args.greedy_step,
                                 greedy_samples=args.greedy_samples)


class Measured:
    """Thresholds installed from a model directory, counting what they zero while the block runs (every token
    sparsified, policy 'all')."""

    def __init__(self, model, report):
        from .activation import counting

        self.model, self.report = model, report
        self.counter = counting(model, policy="all")

    def __enter__(self):
        self.counter.__enter__()
        return self

    def __exit__(self, *exc):
        self.counter.__exit__(*exc)

    def summary(self) -> dict:
        from .activation.sites import short

        per_module = self.counter.result()
        kinds: dict[str, list[float]] = {}
        for name, value in per_module.items():
            if value is not None:
                kinds.setdefault(short(name), []).append(value)
        return {"per_projection": {k: sum(v) / len(v) for k, v in kinds.items()}, "per_module": per_module,
                "calibrated": self.report.per_projection() if self.report.sites else {},
                "target": self.report.recipe.get("sparsity"), "method": self.report.recipe.get("method"),
                "allocation": self.report.recipe.get("allocation"), "bytes": self.report.bytes}


def installed_for_eval(model, path) -> Measured | None:
    """For `eval`: install the thresholds a model directory holds (None when it holds none)."""
    from .activation import install_saved

    if not Path(str(path)).is_dir():
        return None
    report = install_saved(model, path)
    return None if report is None else Measured(model, report)


def print_activation(summary: dict) -> None:
    from .report import format_table

    calibrated = summary.get("calibrated", {})
    rows = [[k, f"{calibrated[k]:.2%}" if k in calibrated else "-", f"{v:.2%}"]
            for k, v in summary["per_projection"].items()]
    print(f"activation sparsity: {summary.get('method')} ({summary.get('allocation')}), target "
          f"{summary.get('target')}; every token sparsified (prefill and decode alike)")
    print(format_table(["projection", "calibration", "measured (evaluation)"], rows))
    b = summary.get("bytes") or {}
    if b:
        print(f"weight bytes per token (blocks' linear layers): dense {b['dense'] / 2**20:.2f} MiB, nonzero "
              f"{b['nonzero'] / 2**20:.2f} MiB, skipped by activation zeros {b['skipped'] / 2**20:.2f} MiB -> read "
              f"{b['read'] / 2**20:.2f} MiB ({b['read_share_of_dense']:.1%} of dense)")


def cmd_activate(args) -> int:
    from . import api
    from .activation import activate, remove, save_activation
    from .checkpoint import RECIPE_FILE, check_output, read_metadata
    from .cli import evaluation_record
    from .cli_args import check_eval_args
    from .domains import eval_specs, evaluate_domains, load_sources
    from .models import check_context_early, load_model, resolve_device
    from .report import format_table

    out = check_output(args.out, args.force, what="--out", create_parents=False)
    check_eval_args(args)
    recipe = _recipe(args)  # a bad method, sparsity or policy fails before anything loads
    device = resolve_device(args.device)
    check_context_early(args.model, recipe.seqlen)
    source_dir = Path(str(args.model)) if args.model != "default" and Path(str(args.model)).is_dir() else None
    base = read_metadata(source_dir) if source_dir else {}
    base.pop("activation", None)
    splits = api.load_text(recipe.data)
    sources = None if args.no_eval else load_sources(eval_specs(args.eval_data, recipe.data), splits)
    progress = not args.quiet
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    model.to(device)
    load_s = time.perf_counter() - t0

    def evaluate():
        return evaluate_domains(model, sources, tokenizer=tokenizer, seqlen=recipe.seqlen,
                                batch_size=args.eval_batch_size, max_windows=args.max_eval_windows, progress=progress)

    dense = None if args.no_eval else evaluate()
    model, report = activate(model, splits, recipe, tokenizer=tokenizer, device=device, progress=progress)
    sparse = summary = None
    if not args.no_eval:
        with Measured(model, report) as measured:
            sparse = evaluate()
        summary = measured.summary()
    evaluation = None
    if sparse is not None:
        evaluation = {**evaluation_record(recipe, dense, sparse),
                      "measured": summary["per_module"], "per_projection": summary["per_projection"]}
    files = {}
    if source_dir and (source_dir / RECIPE_FILE).is_file():
        files[RECIPE_FILE] = (source_dir / RECIPE_FILE).read_text()
    save_activation(model, out, tokenizer=tokenizer, source=str(args.model), evaluation=evaluation,
                    force=args.force, base_metadata=base, files=files)
    if summary is not None:
        print_activation(summary)
        names = list(sparse["domains"])
        rows = [["dense" if source_dir is None or not base.get("recipe") else "weights only", "-",
                 *[dense["domains"][n]["perplexity"] for n in names]],
                [f"{recipe.method} ({recipe.allocation})", f"{report.measured:.2%}",
                 *[sparse["domains"][n]["perplexity"] for n in names]]]
        if len(names) > 1:
            rows[0].append(dense["geomean"])
            rows[1].append(sparse["geomean"])
        print(format_table(["model", "activation sparsity (calibration)", *[f"ppl {n}" for n in names],
                            *(["geomean"] if len(names) > 1 else [])], rows))
    else:
        print(f"activation sparsity {report.measured:.2%} on the calibration windows ({recipe.method}, "
              f"{recipe.allocation})")
    remove(model)
    print(f"load {load_s:.1f}s, calibration {report.seconds:.1f}s; saved to {out} (thresholds in "
          f"{out}/activation/thresholds.safetensors)")
    return 0

