"""`sparsecraft finetune`: recovery fine-tuning (mask kept, distillation) and gradual pruning, on the command line.

Runs unchanged on several GPUs: `accelerate launch [--multi_gpu | --use_fsdp] -m sparsecraft.cli finetune ...`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .cli_args import finite_float


def add_parser(sub, add_data_args) -> None:
    from .recovery.config import DISTILL_PRESETS, LR_SCHEDULES, PRECISIONS, SCHEDULES, SCORES

    f = sub.add_parser("finetune", help="fine-tune a sparse model keeping its mask (distillation), or prune gradually")
    f.add_argument("student", help="pruned sparsecraft directory, HF model directory, .gguf file or 'default'")
    f.add_argument("--teacher", default=None,
                   help="dense teacher (model spec); default: the student's source model from its sparsecraft.json, "
                        "or the student itself with --schedule gmp")
    f.add_argument("--config", default=None, help="finetune YAML (FinetuneConfig); flags given here override it")
    f.add_argument("--out", required=True, help="output directory (written atomically)")
    f.add_argument("--force", action="store_true",
                   help="replace --out if it exists and discard old checkpoints in --checkpoint-dir")
    f.add_argument("--steps", type=int, default=None, help="optimizer steps (200)")
    f.add_argument("--distill", default=None, choices=list(DISTILL_PRESETS),
                   help="loss preset: none = CE, kd = CE + KD, squarehead = CE + KD + SquareHead (default)")
    f.add_argument("--ce-weight", type=finite_float, default=None, help="weight of the cross-entropy loss")
    f.add_argument("--kd-weight", type=finite_float, default=None, help="weight of the logit KL loss")
    f.add_argument("--squarehead-weight", type=finite_float, default=None, help="weight of the SquareHead loss")
    f.add_argument("--temperature", type=finite_float, default=None, help="KD temperature (1)")
    f.add_argument("--schedule", default=None, choices=list(SCHEDULES),
                   help="constant: keep the student's zeros (default); gmp: prune gradually (cubic schedule); "
                        "dense: train every weight, no mask (e.g. adapt a dense teacher to the data first)")
    f.add_argument("--sparsity", type=finite_float, default=None, help="gmp: final fraction of zeros (implied by N:M)")
    f.add_argument("--pattern", default=None, help="gmp: unstructured (default) or N:M such as 2:4")
    f.add_argument("--initial-sparsity", type=finite_float, default=None, help="gmp: sparsity at --prune-start (0)")
    f.add_argument("--score", default=None, choices=list(SCORES), help="gmp: magnitude (default) or wanda scores")
    f.add_argument("--prune-start", type=int, default=None, help="gmp: first pruning step t0 (0)")
    f.add_argument("--prune-end", type=int, default=None, help="gmp: step T at which --sparsity is reached (3/4 of "
                                                               "--steps)")
    f.add_argument("--prune-every", type=int, default=None, help="gmp: steps between mask updates (10)")
    f.add_argument("--targets", action="append", default=None, help="regex of layer names to mask (repeatable)")
    f.add_argument("--ignore", action="append", default=None, help="regex of layer names to leave dense")
    f.add_argument("--train-embeddings", action="store_true", default=None,
                   help="also train the (dense) token embeddings / LM head")
    f.add_argument("--seqlen", type=int, default=None, help="tokens per packed training window (512)")
    f.add_argument("--batch-size", type=int, default=None, help="windows per process per micro-batch (2)")
    f.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (1)")
    f.add_argument("--lr", type=finite_float, default=None, help="peak AdamW learning rate (1e-4)")
    f.add_argument("--weight-decay", type=finite_float, default=None, help="AdamW weight decay (0)")
    f.add_argument("--lr-schedule", default=None, choices=list(LR_SCHEDULES), help="decay after warmup (cosine)")
    f.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (5%% of --steps)")
    f.add_argument("--max-grad-norm", type=finite_float, default=None, help="gradient clipping, 0 = off (1.0)")
    f.add_argument("--precision", default=None, choices=list(PRECISIONS),
                   help="auto: bf16 on a GPU that supports it, else fp32")
    f.add_argument("--seed", type=int, default=None, help="seed of the batch order and of torch (0)")
    f.add_argument("--eval-every", type=int, default=None, help="held-out perplexity every N steps (0 = off)")
    f.add_argument("--periodic-eval-windows", type=int, default=None,
                   help="windows of each periodic evaluation (8)")
    f.add_argument("--eval-seqlen", type=int, default=None, help="tokens per held-out window (default --seqlen)")
    f.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: OUT.checkpoints)")
    f.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N steps, 0 = never (50)")
    f.add_argument("--keep-checkpoints", type=int, default=None, help="how many checkpoints to keep (2)")
    f.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    f.add_argument("--device", default="auto", help="auto, cpu or cuda (under accelerate launch: its choice)")
    f.add_argument("--no-eval", action="store_true", help="skip the held-out perplexity before and after")
    add_data_args(f)


def cmd_finetune(args) -> int:
    from .api import peak_rss_mb
    from .checkpoint import check_output, check_writable
    from .cli_args import check_positive
    from .errors import OutputError
    from .models import check_context_early
    from .recovery import make_config
    from .recovery.trainer import finetune
    from .report import format_table

    out = check_output(args.out, args.force, what="--out", create_parents=False)
    check_positive("--max-eval-windows", args.max_eval_windows)
    if args.checkpoint_dir:
        ckpt_arg = check_writable(args.checkpoint_dir, "--checkpoint-dir", create_parents=True)
        if ckpt_arg.exists() and not ckpt_arg.is_dir():
            raise OutputError(f"--checkpoint-dir {ckpt_arg} is not a directory: choose another path")
    config = make_config(
        args.config, steps=args.steps, distill=args.distill, ce_weight=args.ce_weight, kd_weight=args.kd_weight,
        squarehead_weight=args.squarehead_weight, temperature=args.temperature, schedule=args.schedule,
        sparsity=args.sparsity, pattern=args.pattern, initial_sparsity=args.initial_sparsity, score=args.score,
        prune_start=args.prune_start, prune_end=args.prune_end, prune_every=args.prune_every, targets=args.targets,
        ignore=args.ignore, train_embeddings=args.train_embeddings, data=args.data, seqlen=args.seqlen,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay,
        lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm,
        precision=args.precision, seed=args.seed, eval_every=args.eval_every,
        periodic_eval_windows=args.periodic_eval_windows, eval_seqlen=args.eval_seqlen,
        eval_batch_size=args.eval_batch_size,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints,
        progress=False if args.quiet else None,
    )
    check_context_early(args.student, config.seqlen)
    if not args.no_eval:
        check_context_early(args.student, config.eval_seqlen, "eval_seqlen", "--eval-seqlen")
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else Path(str(out).rstrip("/") + ".checkpoints")
    t0 = time.perf_counter()
    try:
        _, result = finetune(args.student, args.teacher, config.data, config, out=out, force=args.force,
                             checkpoint_dir=ckpt, resume=args.resume, evaluate=not args.no_eval, device=args.device,
                             eval_windows=args.max_eval_windows)
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP: say where the run can continue from
        from .recovery.trainer import checkpoints

        if not ckpt.is_dir() or not checkpoints(ckpt):
            raise
        how = f"terminated ({exc})" if getattr(exc, "signum", None) else "interrupted"
        print(f"sparsecraft: {how}; nothing was written to {out}; checkpoints are kept in {ckpt} (continue with "
              "--resume)", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # one report per run, not one per process
        return 0
    last = result.history[-1] if result.history else {}
    rows = [[args.student, "before", f"{result.sparsity_before:.2%}", result.perplexity_before, "-"],
            [str(out), "after", f"{result.sparsity:.2%}", result.perplexity_after, f"{result.seconds:.0f}"]]
    print(format_table(["model", "finetune", "sparsity", "perplexity", "train s"], rows))
    losses = ", ".join(f"{k} {last[k]:.4f}" for k in ("loss", "ce", "kd", "squarehead") if last.get(k))
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from is not None else ""
    print(f"{result.steps} steps{resumed}; last step: {losses}; total {time.perf_counter() - t0:.0f}s, "
          f"peak RSS {peak_rss_mb():.0f} MiB; saved to {out} (config in {out}/finetune.yaml)")
    return 0
