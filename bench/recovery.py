"""Recovery fine-tuning on the default model: one-shot SparseGPT, then fine-tuning with the mask kept.

For each setting (2:4 and 70% unstructured by default) the one-shot SparseGPT model is pruned once and cached
on disk (bench/results/recovery-models/), then fine-tuned with the same number of steps, data and learning
rate under each loss: (a) CE only, (b) CE + KD on the logits, (c) CE + KD + SquareHead. For unstructured
settings, gradual magnitude pruning (GMP, cubic schedule, SquareHead + KD) from the dense model with the same
number of steps is in the same table. Prints the held-out perplexity before/after, the fraction of the
dense-to-sparse perplexity gap closed (relative to one-shot SparseGPT), training seconds and peak RSS. Every
row runs in its own process; rows are cached in --cache (keyed by their spec), so a killed run resumes.

    python bench/recovery.py --markdown                            # the full table (hours on 2 CPU cores)
    python bench/recovery.py --quick                               # a smoke run: 4 steps, 2 eval windows
    python bench/recovery.py --settings 2:4 --rows squarehead --steps 100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import RowCache, print_table, run_isolated

HERE = Path(__file__).resolve().parent
ROWS = {  # name -> (distill preset, schedule)
    "ce": ("none", "constant"),
    "kd": ("kd", "constant"),
    "squarehead": ("squarehead", "constant"),
    "gmp": ("squarehead", "gmp"),
    "squarehead-adapted": ("squarehead", "constant"),  # the teacher first fine-tuned on the data (dense, CE)
}
LABELS = {"ce": "+ CE", "kd": "+ CE + KD", "squarehead": "+ CE + KD + SquareHead", "gmp": "GMP (SquareHead + KD)",
          "squarehead-adapted": "+ CE + KD + SquareHead, adapted teacher"}


def _setting_name(setting: str) -> str:
    return setting.replace(":", "_")


def train_config(args) -> dict:
    """The fine-tuning settings every row shares."""
    return {"steps": args.steps, "seqlen": args.seqlen, "batch_size": args.batch_size, "lr": args.lr,
            "warmup_steps": args.warmup_steps, "temperature": args.temperature, "data": args.data,
            "eval_seqlen": args.eval_seqlen, "checkpoint_every": 0, "progress": False}


def worker(spec: dict) -> dict:
    """One row, in its own process: 'dense' (evaluate), 'oneshot' (prune + save + evaluate) or a fine-tune."""
    import torch

    import sparsecraft
    from sparsecraft.api import peak_rss_mb
    from sparsecraft.data import load_text

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    splits = load_text(spec["data"])
    row: dict = {"name": spec["name"]}
    t0 = time.perf_counter()
    if spec["kind"] in ("dense", "oneshot"):
        cached = spec["kind"] == "oneshot" and (Path(spec["path"]) / "config.json").is_file()
        model, tokenizer = sparsecraft.load_model(spec["path"] if cached else spec["model"])
        report = None
        if cached:  # pruned once, by an earlier run: only evaluate it
            from sparsecraft.checkpoint import read_metadata

            row["prune_s"] = read_metadata(spec["path"]).get("seconds", 0.0)
        elif spec["kind"] == "oneshot":
            from sparsecraft.api import calibration_ids, make_recipe

            recipe = make_recipe(data=spec["data"], **spec["recipe"])
            ids = calibration_ids(splits, tokenizer, recipe)
            _, report = sparsecraft.prune(model, ids, recipe, progress=False)
            row["prune_s"] = report.seconds
        result = sparsecraft.evaluate(model, splits, tokenizer=tokenizer, seqlen=spec["eval_seqlen"],
                                      max_windows=spec.get("max_eval_windows"), progress=False)
        if report is not None:
            sparsecraft.save(model, spec["path"], tokenizer=tokenizer, report=report, source=spec["model"],
                             force=True, evaluation={"data": spec["data"], "seqlen": spec["eval_seqlen"],
                                                     "windows": result["windows"], "perplexity": result["perplexity"]})
        row.update(perplexity=result["perplexity"], sparsity=result["sparsity"], eval_tokens=result["tokens"])
    else:
        from sparsecraft.recovery.trainer import finetune

        _, result = finetune(spec["student"], spec["teacher"], spec["data"], spec["config"], evaluate=True,
                             eval_windows=spec.get("max_eval_windows"), out=spec.get("out"), force=True)
        row.update(perplexity=result.perplexity_after, perplexity_before=result.perplexity_before,
                   sparsity=result.sparsity, train_s=result.seconds, history=result.history,
                   evaluations=result.evaluations)
    row.update(seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="2:4,0.7", help="N:M patterns and/or unstructured sparsities")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"fine-tuning rows, from: {', '.join(ROWS)}")
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default="builtin")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps of every fine-tuning row")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per training window")
    ap.add_argument("--batch-size", type=int, default=2, help="windows per optimizer step")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--eval-seqlen", type=int, default=512, help="held-out windows (as bench/oneshot.py)")
    ap.add_argument("--max-eval-windows", type=int, default=None)
    ap.add_argument("--nsamples", type=int, default=64, help="one-shot calibration windows of 512 tokens")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 steps, 2 eval windows (add --nsamples 8 for a "
                                                     "faster one-shot prune when none is cached)")
    ap.add_argument("--models", default=str(HERE / "results" / "recovery-models"),
                    help="where the one-shot pruned models are cached")
    ap.add_argument("--cache", default=str(HERE / "results" / "recovery-cache.json"))
    ap.add_argument("--no-cache", action="store_true", help="re-run every fine-tuning row")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.steps, args.max_eval_windows = 4, args.max_eval_windows or 2
    wanted = args.rows.split(",")
    unknown = [w for w in wanted if w not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {list(ROWS)}")
    cache = RowCache(args.cache, run=lambda spec: run_isolated(spec, Path(__file__).resolve(), ("--worker",)))
    base = {"model": args.model, "data": args.data, "eval_seqlen": args.eval_seqlen,
            "max_eval_windows": args.max_eval_windows}
    dense = cache.run({**base, "kind": "dense", "name": "dense"})
    results = [dense]
    headers = ["setting", "model", "steps", "sparsity", "ppl before", "ppl after", "gap closed", "train s",
               "total s", "peak RSS MiB"]
    table = [["-", "dense", "-", f"{dense['sparsity']:.2%}", "-", f"{dense['perplexity']:.2f}", "-", "-", "-",
              f"{dense['peak_rss_mb']:.0f}"]]
    models = Path(args.models)
    teacher = args.model
    if "squarehead-adapted" in wanted:  # SquareHead's protocol: the dense teacher fine-tuned on the same data first
        teacher = str(models / f"teacher-dense-ce-{args.steps}")
        config = {**train_config(args), "distill": "none", "schedule": "dense"}
        spec = {**base, "kind": "finetune", "name": "dense teacher adapted (CE)", "config": config,
                "student": args.model, "teacher": None, "out": teacher}
        r = cache.run(spec, fresh=not (Path(teacher) / "config.json").is_file())  # the model is cached on disk
        results.append(r)
        table.append(["-", f"dense, CE-adapted teacher ({args.steps} steps)", str(args.steps),
                      f"{r['sparsity']:.2%}", f"{r['perplexity_before']:.2f}", f"{r['perplexity']:.2f}", "-",
                      f"{r['train_s']:.0f}", f"{r['seconds']:.0f}", f"{r['peak_rss_mb']:.0f}"])
    for setting in args.settings.split(","):
        fields = {"pattern": setting} if ":" in setting else {"pattern": "unstructured", "sparsity": float(setting)}
        recipe = {"method": "sparsegpt", "nsamples": args.nsamples, "seqlen": 512, "seed": 0, **fields}
        path = models / f"sparsegpt-{_setting_name(setting)}-n{args.nsamples}"
        spec = {**base, "kind": "oneshot", "name": f"{setting} one-shot sparsegpt", "recipe": recipe,
                "path": str(path)}
        oneshot = cache.run(spec, fresh=not (path / "config.json").is_file())  # the model is cached on disk
        results.append(oneshot)
        gap = oneshot["perplexity"] - dense["perplexity"]
        table.append([setting, "one-shot sparsegpt", "-", f"{oneshot['sparsity']:.2%}", "-",
                      f"{oneshot['perplexity']:.2f}", "0%", "-", f"{oneshot['prune_s']:.0f}",
                      f"{oneshot['peak_rss_mb']:.0f}"])
        for name in wanted:
            distill, schedule = ROWS[name]
            if schedule == "gmp" and ":" in setting:
                continue  # GMP is compared at the unstructured settings
            config = {**train_config(args), "distill": distill, "schedule": schedule}
            if schedule == "gmp":
                config.update(fields)
            spec = {**base, "kind": "finetune", "name": f"{setting} {name}", "config": config,
                    "student": args.model if schedule == "gmp" else str(path),
                    "teacher": teacher if name == "squarehead-adapted" else args.model,
                    "oneshot": oneshot["perplexity"]}
            r = cache.run(spec, fresh=args.no_cache)
            r["setting"], r["row"] = setting, name
            results.append(r)
            closed = (oneshot["perplexity"] - r["perplexity"]) / gap if gap > 0 else float("nan")
            before = r["perplexity_before"]
            table.append([setting, LABELS[name], str(args.steps), f"{r['sparsity']:.2%}",
                          f"{before:.2f}" if before else "-", f"{r['perplexity']:.2f}", f"{closed:.0%}",
                          f"{r['train_s']:.0f}", f"{r['seconds']:.0f}", f"{r['peak_rss_mb']:.0f}"])
            print("done: " + " | ".join(table[-1]), file=sys.stderr, flush=True)
    print_table(headers, table, args.markdown)
    print(f"model={args.model} data={args.data}; fine-tuning: {args.steps} steps x {args.batch_size} x {args.seqlen} "
          f"tokens, AdamW lr {args.lr:g} (cosine, 5% warmup), embeddings frozen; one-shot: SparseGPT "
          f"{args.nsamples} x 512 calibration tokens; eval={dense['eval_tokens']} held-out tokens in windows of "
          f"{args.eval_seqlen}; gap closed = (one-shot ppl - ppl) / (one-shot ppl - dense ppl)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
