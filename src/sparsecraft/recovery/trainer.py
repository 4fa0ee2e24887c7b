"""The recovery fine-tuning loop, on Hugging Face accelerate.

One `Accelerator` loop: `accelerator.prepare` wraps the student and the optimizer for whatever launch configured
(one CPU or GPU; DDP or FSDP under `accelerate launch`), `accelerator.backward`, `clip_grad_norm_`, and
`save_state` / `load_state` for checkpoints (model, optimizer, RNG states, plus the registered scheduler, masks
and trainer state). Nothing in the loop depends on the number of processes except the batch each process reads.

Around every optimizer step the MaskManager masks the gradients and re-applies the masks, so pruned weights stay
exactly zero. Checkpoints are written to a temporary directory and renamed into place; `resume=True` continues
from the newest one and ends bit for bit where an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import (
    METADATA_FILE,
    RECIPE_FILE,
    atomic_directory,
    check_output,
    read_metadata,
    signals_held,
    write_json_atomic,
)
from ..data import TextSplits, evaluation_windows, load_text, tokenize
from ..errors import ConfigError, ModelError, OutputError, TrainingError
from ..models import check_causal, check_context, find_blocks, load_model, select_targets, weight_matrix
from ..moe import ExpertLinears, experts_merged, experts_split, merge_experts, split_experts
from ..patterns import check_columns
from .batches import WindowStream, pack
from .config import FinetuneConfig, make_config
from .losses import BlockOutputs, causal_lm_loss, kd_loss, squarehead_loss
from .masks import MaskManager
from .schedules import ActivationNorms, cubic_sparsity, gmp_masks, update_steps

CONFIG_FILE = "finetune.yaml"
LOG_FILE = "finetune_log.json"
CHECKPOINT_PREFIX = "checkpoint-"
MIN_CONSTANT_SPARSITY = 0.01  # below this the student is taken to be dense


@dataclass
class FinetuneResult:
    config: dict
    steps: int
    seconds: float  # training time (evaluations excluded), summed over resumed segments
    history: list[dict] = field(default_factory=list)  # per step: loss components, lr, mask sparsity
    evaluations: list[dict] = field(default_factory=list)  # periodic held-out perplexity {step, perplexity}
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    sparsity: float = 0.0  # fraction of zeros in the masked layers at the end
    sparsity_before: float = 0.0  # ... and at the start
    resumed_from: int | None = None
    eval_windows: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class _TrainState:
    """The loop's own state, saved in every checkpoint next to accelerate's."""

    def __init__(self):
        self.step = 0
        self.seconds = 0.0
        self.history: list[dict] = []
        self.evaluations: list[dict] = []
        self.perplexity_before: float | None = None

    def state_dict(self) -> dict:
        return {"step": self.step, "seconds": self.seconds, "history": self.history,
                "evaluations": self.evaluations, "perplexity_before": self.perplexity_before}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.seconds = float(state["seconds"])
        self.history = list(state["history"])
        self.evaluations = list(state["evaluations"])
        self.perplexity_before = state["perplexity_before"]


class _StopTraining(Exception):
    """Raised inside the loop by `stop_after` (tests: an interruption right after a checkpoint)."""


# --------------------------------------------------------------------------------------------- models & checks


def _as_model(spec):
    """(model, tokenizer, metadata, spec string or None) from a module or a model spec."""
    if isinstance(spec, nn.Module):
        return spec, getattr(spec, "tokenizer", None), dict(getattr(spec, "sparsecraft", {}) or {}), None
    model, tokenizer = load_model(spec)
    meta = read_metadata(spec) if Path(str(spec)).expanduser().is_dir() else {}
    return model, tokenizer, meta, str(spec)


def default_teacher(student_spec: str | None, metadata: dict, config: FinetuneConfig) -> str | None:
    """The teacher when none is given: the model a pruned directory was made from (its sparsecraft.json
    `source_model`), or for gradual pruning the dense student itself."""
    source = metadata.get("source_model")
    if source:
        return str(source)
    if config.schedule == "gmp" and student_spec is not None:
        return student_spec
    return None


def vocab_size(model: nn.Module) -> int | None:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        return int(out.weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def check_teacher(student: nn.Module, teacher: nn.Module, squarehead: bool) -> None:
    sv, tv = vocab_size(student), vocab_size(teacher)
    if sv != tv:
        raise ModelError(f"student and teacher have different vocabularies ({sv} vs {tv} tokens): distillation "
                         "needs the same tokenizer; pass the dense model the student was pruned from as --teacher")
    _, sb = find_blocks(student)
    _, tb = find_blocks(teacher)
    if len(sb) != len(tb):
        raise ModelError(f"student has {len(sb)} transformer blocks and the teacher {len(tb)}: pass the dense model "
                         "the student was pruned from as --teacher")
    if squarehead:
        sh = getattr(student.config, "hidden_size", None)
        th = getattr(teacher.config, "hidden_size", None)
        if sh != th:
            raise ModelError(f"student hidden size {sh} differs from the teacher's {th}: SquareHead compares block "
                             "outputs; pass the dense model the student was pruned from as --teacher")


def _embedding_weights(model: nn.Module) -> set[int]:
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and getattr(out, "weight", None) is not None:
        ids.add(id(out.weight))
    return ids


# ------------------------------------------------------------------------------------------------- checkpoints


def checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first (temporary directories are not complete)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _save_checkpoint(accelerator, directory: Path, step: int, keep: int) -> Path:
    final = directory / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = directory / f".{final.name}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    except BaseException:  # Ctrl-C, SIGTERM, a full disk: no half-written checkpoint stays behind
        if accelerator.is_main_process:
            with signals_held():
                shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with signals_held():
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        for old in checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ------------------------------------------------------------------------------------------------- evaluation


def _perplexity(model: nn.Module, windows: torch.Tensor, accelerator, batch_size: int) -> float:
    """Held-out perplexity, windows shared out over the processes (each runs the same number of forwards)."""
    if accelerator.num_processes == 1:
        from ..evaluate import perplexity

        return perplexity(model, windows, batch_size=batch_size, progress=False)
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = windows[rank::world]
    rounds = math.ceil(windows.shape[0] / world)
    was_training = model.training
    model.eval()
    nll = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for i in range(0, rounds, batch_size):
            count = min(batch_size, rounds - i)
            ids = windows[:1].expand(count, -1).clone()
            real = mine[i:i + count]
            ids[: real.shape[0]] = real
            ids = ids.to(accelerator.device)
            logits = model(input_ids=ids, use_cache=False).logits[: real.shape[0], :-1].float()
            if real.shape[0]:
                nll[0] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[: real.shape[0], 1:].reshape(-1),
                                          reduction="sum").double()
                nll[1] += real[:, 1:].numel()
    model.train(was_training)
    total = accelerator.reduce(nll, reduction="sum")
    return math.exp(float(total[0] / total[1]))


# ------------------------------------------------------------------------------------------------- the loop


def finetune(student, teacher=None, data: str | Path | TextSplits = "builtin",
             config: FinetuneConfig | dict | str | Path | None = None, *, tokenizer=None,
             out: str | Path | None = None, force: bool = False, checkpoint_dir: str | Path | None = None,
             resume: bool = False, evaluate: bool = True, eval_windows: int | None = None,
             device: str | None = None,
             on_step: Callable[[int, dict], None] | None = None, stop_after: int | None = None, **overrides
             ) -> tuple[nn.Module, FinetuneResult]:
    """Fine-tune `student` (a module or a model spec) keeping its sparsity mask (or pruning it gradually), with
    cross-entropy and distillation from `teacher` (a module, a model spec, or None for the default: the model
    the student was pruned from, or the dense student itself for gradual pruning).

    `data`: builtin, a text file, wikitext2/c4 (local HF datasets) or TextSplits; training uses its calibration
    (training) part, packed into windows of `seqlen`, and evaluation its held-out part. `config`: a
    FinetuneConfig / dict / YAML path; keyword overrides (steps=, distill=, lr=, ...) apply on top.
    `out`: also save the result there (atomically; `force` to replace). `checkpoint_dir`: write checkpoints
    every `checkpoint_every` steps; `resume`: continue from the newest checkpoint there.
    `evaluate`: measure held-out perplexity before and after (on at most `eval_windows` windows).
    `on_step(step, record)` is called after every optimizer step; `stop_after` stops the run (raising
    KeyboardInterrupt) right after that step's checkpoint, as a kill would.
    Returns the fine-tuned student (unwrapped) and a FinetuneResult.
    """
    with experts_split(student) if isinstance(student, nn.Module) else contextlib.nullcontext():
        return _finetune(student, teacher, data, config, tokenizer=tokenizer, out=out, force=force,
                         checkpoint_dir=checkpoint_dir, resume=resume, evaluate=evaluate, eval_windows=eval_windows,
                         device=device, on_step=on_step, stop_after=stop_after, **overrides)


def _finetune(student, teacher, data, config, *, tokenizer, out, force, checkpoint_dir, resume, evaluate,
              eval_windows, device, on_step, stop_after, **overrides) -> tuple[nn.Module, FinetuneResult]:
    """finetune() once a module student's fused MoE experts are split (moe.py); see finetune."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    if isinstance(data, (str, Path)) and overrides.get("data") is None:
        overrides["data"] = str(data)
    cfg = make_config(config, **overrides)
    if cfg.schedule == "gmp" and cfg.score == "wanda" and cfg.prune_start == 0 and cfg.initial_sparsity > 0:
        raise ConfigError("Wanda scores need activations seen in training: with initial_sparsity > 0 start the "
                          "gradual pruning later (prune_start >= 1)")
    out_path = check_output(out, force) if out is not None else None
    ckpt_dir = Path(checkpoint_dir).expanduser() if checkpoint_dir is not None else None
    if ckpt_dir is not None:
        existing = checkpoints(ckpt_dir)
        if resume and not existing:
            raise OutputError(f"no checkpoint to resume from in {ckpt_dir}: run without --resume to start")
        if existing and not resume and not force:
            raise OutputError(f"{ckpt_dir} holds checkpoints of an earlier run: pass --resume to continue it or "
                              "--force to start over")
        if resume:
            saved = ckpt_dir / CONFIG_FILE
            if saved.is_file():
                differ = cfg.differences(FinetuneConfig.from_yaml(saved))
                if differ:
                    raise ConfigError(f"--resume continues the run in {ckpt_dir}, whose settings differ in "
                                      f"{', '.join(differ)}: give the same settings (see {saved})")
    elif resume:
        raise ConfigError("resume needs a checkpoint directory (--checkpoint-dir)")

    # the student, its targets and its mask (every check that needs no teacher comes first)
    student_model, student_tok, student_meta, student_spec = _as_model(student)
    split_experts(student_model)  # fused MoE experts: one linear layer (and mask) per expert while training
    tokenizer = tokenizer or student_tok
    check_context(student_model, cfg.seqlen)
    if cfg.eval_seqlen is not None and evaluate:
        check_context(student_model, cfg.eval_seqlen, "eval_seqlen", "--eval-seqlen")
    check_causal(student_model, "next-token training would let it read the very tokens it learns to predict")
    weights = dict(zip(("ce", "kd", "squarehead"), cfg.weights))
    targets = select_targets(student_model, cfg.targets, cfg.ignore)
    if cfg.schedule == "gmp":
        for t in targets:
            check_columns(weight_matrix(t.module).shape[1], cfg.parsed_pattern, layer=t.name)
    masks = MaskManager.from_targets(targets, dense=cfg.schedule in ("gmp", "dense"))
    sparsity_before = masks.weight_sparsity()
    if cfg.schedule == "constant" and masks.sparsity() < MIN_CONSTANT_SPARSITY:
        raise ModelError(f"the student has no sparsity to keep ({masks.sparsity():.2%} zeros in its prunable layers) "
                         "but --schedule constant fine-tunes a pruned model: prune it first (sparsecraft prune) or "
                         "use --schedule gmp --sparsity S to prune gradually")

    # data
    splits = data if isinstance(data, TextSplits) else load_text(cfg.data)
    train_windows = pack(tokenize(tokenizer, splits.calibration), cfg.seqlen)
    if eval_windows is not None and (isinstance(eval_windows, bool) or eval_windows < 1):
        raise ConfigError(f"eval_windows must be >= 1, got {eval_windows}")
    held_windows = None
    if evaluate:
        held_windows = evaluation_windows(tokenize(tokenizer, splits.evaluation), cfg.eval_seqlen or cfg.seqlen)
    if held_windows is not None and eval_windows is not None:
        held_windows = held_windows[:eval_windows]
    WindowStream(train_windows, cfg.batch_size, cfg.grad_accum, cfg.seed)  # one batch at least, before any loading

    # the teacher
    teacher_model, teacher_spec = None, None
    if cfg.needs_teacher:
        if teacher is None:
            teacher = default_teacher(student_spec, student_meta, cfg)
            if teacher is None and cfg.schedule == "gmp":  # an in-memory student: its dense self, copied now
                teacher = copy.deepcopy(student_model).eval().requires_grad_(False)
            if teacher is None:
                raise ConfigError("distillation (--distill kd/squarehead) needs a teacher and the student does not "
                                  "record the model it was pruned from: pass --teacher (the dense model), or "
                                  "--distill none")
        if isinstance(teacher, nn.Module):
            teacher_model = teacher
        else:
            teacher_spec = str(teacher)
            teacher_model = _as_model(teacher)[0]
        check_teacher(student_model, teacher_model, weights["squarehead"] > 0)

    # accelerator
    if device not in (None, "auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda (the launcher picks GPUs), got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for but CUDA is not available here: use --device cpu")
    use_cpu = device == "cpu" or not torch.cuda.is_available()
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if not use_cpu and torch.cuda.is_bf16_supported() else "fp32"
    accelerator = Accelerator(cpu=use_cpu, mixed_precision="bf16" if precision == "bf16" else "no")
    moe = any(isinstance(m, ExpertLinears) for m in student_model.modules())
    if moe and "FSDP" in str(accelerator.distributed_type):
        raise ConfigError("fine-tuning a mixture-of-experts model under FSDP is not supported (its experts are "
                          "trained as one linear layer each and saved fused): use DDP (accelerate launch --multi_gpu)")
    if cfg.schedule == "gmp" and "FSDP" in str(accelerator.distributed_type):
        raise ConfigError("gradual pruning scores whole weight matrices, which FSDP shards: run --schedule gmp "
                          "with DDP (accelerate launch --multi_gpu) or one process")
    stream = WindowStream(train_windows, cfg.batch_size, cfg.grad_accum, cfg.seed, accelerator.num_processes,
                          accelerator.process_index)
    set_seed(cfg.seed)

    embeddings = _embedding_weights(student_model)
    trainable = []
    for p in student_model.parameters():
        p.requires_grad_(cfg.train_embeddings or id(p) not in embeddings)
        if p.requires_grad:
            trainable.append(p)
    student_model.to(accelerator.device)  # moves the parameters' data; the Parameter objects stay the same
    student_model.train()
    masks.to(accelerator.device)
    if teacher_model is not None:
        teacher_model.to(accelerator.device).eval().requires_grad_(False)
    norms = ActivationNorms(targets) if cfg.schedule == "gmp" and cfg.score == "wanda" else None

    fused = {"fused": True} if accelerator.device.type in ("cpu", "cuda") else {}
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
    schedule_name = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    scheduler = get_scheduler(schedule_name, optimizer, num_warmup_steps=cfg.warmup, num_training_steps=cfg.steps)
    student_blocks = find_blocks(student_model)[1]
    student_outputs = BlockOutputs(student_blocks) if weights["squarehead"] > 0 else None
    teacher_outputs = BlockOutputs(find_blocks(teacher_model)[1]) if weights["squarehead"] > 0 else None
    model, optimizer = accelerator.prepare(student_model, optimizer)
    masks.rebind(dict(model.named_parameters()))  # FSDP replaces parameters; DDP and one process keep them
    state = _TrainState()
    for obj in (scheduler, masks, state, *([norms] if norms is not None else [])):
        accelerator.register_for_checkpointing(obj)

    resumed_from = None
    if resume:
        latest = checkpoints(ckpt_dir)[-1]
        try:
            accelerator.load_state(str(latest))
        except Exception as exc:  # noqa: BLE001 - safetensors, torch.load, pickle: each has its own error types
            # a truncated or overwritten file in the checkpoint: nothing has been trained or written yet
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise OutputError(f"checkpoint {latest} cannot be read ({first}): delete it to resume from the one "
                              f"before, or run without --resume (with --force) to start over") from exc
        resumed_from = state.step
        masks.apply()
        if accelerator.is_main_process:  # a checkpoint half-written when the run was killed
            for stale in ckpt_dir.glob(f".{CHECKPOINT_PREFIX}*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
    elif ckpt_dir is not None and accelerator.is_main_process:  # a fresh start: only now, after every check
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for old in [*checkpoints(ckpt_dir), *ckpt_dir.glob(f".{CHECKPOINT_PREFIX}*.tmp")]:
            shutil.rmtree(old, ignore_errors=True)  # an earlier run's (with force) or half-written ones
        (ckpt_dir / CONFIG_FILE).write_text(cfg.to_yaml_text())
    accelerator.wait_for_everyone()

    def held_out(max_windows: int | None) -> float | None:
        if held_windows is None:
            return None
        enabled = [h for h in (student_outputs,) if h is not None]
        for h in enabled:
            h.enabled = False
        try:
            windows = held_windows[:max_windows] if max_windows else held_windows
            return _perplexity(model, windows, accelerator, cfg.eval_batch_size)
        finally:
            for h in enabled:
                h.enabled = True

    if resumed_from is None:
        state.perplexity_before = held_out(None)
    points = set(update_steps(cfg.prune_start, cfg.end_step, cfg.prune_every)) if cfg.schedule == "gmp" else set()
    pattern = cfg.parsed_pattern

    def prune_to_schedule(done: int) -> None:
        if done not in points:
            return
        target = cubic_sparsity(done, cfg.target_sparsity, cfg.initial_sparsity, cfg.prune_start, cfg.end_step)
        if target <= 0:
            return
        layer_norms = None
        if norms is not None:
            layer_norms = norms.norms(
                (lambda t: accelerator.reduce(t, reduction="sum")) if accelerator.num_processes > 1 else None)
            norms.reset()
        with torch.no_grad():
            new = gmp_masks(targets, masks.masks, target, pattern, layer_norms)
        masks.update(new, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer)

    if resumed_from is None:
        prune_to_schedule(0)
    scales = _weight_scales(model)
    vocab = getattr(getattr(student_model, "config", None), "vocab_size", None)
    bar = tqdm(total=cfg.steps, initial=state.step, desc="finetune", unit="step",
               disable=not (cfg.progress and accelerator.is_local_main_process))
    try:
        while state.step < cfg.steps:
            step = state.step
            t0 = time.perf_counter()
            parts = {"loss": 0.0, "ce": 0.0, "kd": 0.0, "squarehead": 0.0}
            for micro in range(cfg.grad_accum):
                ids = stream.batch(step, micro).to(accelerator.device)
                sync = micro == cfg.grad_accum - 1 or accelerator.num_processes == 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    losses = _losses(model, teacher_model, ids, weights, cfg, accelerator, student_outputs,
                                     teacher_outputs)
                    loss = sum(weights[k] * v for k, v in losses.items() if weights[k] > 0)
                    accelerator.backward(loss / cfg.grad_accum)
                parts["loss"] += float(loss.detach()) / cfg.grad_accum
                for k, v in losses.items():
                    parts[k] += float(v.detach()) / cfg.grad_accum
            masks.mask_gradients()
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            masks.apply()
            state.step = done = step + 1
            prune_to_schedule(done)
            state.seconds += time.perf_counter() - t0
            if accelerator.num_processes > 1:
                vals = accelerator.reduce(torch.tensor(list(parts.values()), device=accelerator.device), "mean")
                parts = dict(zip(parts, vals.tolist()))
            _check_loss(parts, done, cfg, vocab)
            record = {"step": done, **{k: round(v, 6) for k, v in parts.items()}, "lr": lr}
            if cfg.schedule == "gmp":
                record["sparsity"] = round(masks.sparsity(), 6)
            state.history.append(record)
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                state.evaluations.append({"step": done, "perplexity": held_out(cfg.periodic_eval_windows)})
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in parts.items() if k == "loss" or weights.get(k, 0) > 0})
            if on_step is not None:
                on_step(done, record)
            if ckpt_dir is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                _save_checkpoint(accelerator, ckpt_dir, done, cfg.keep_checkpoints)
                if stop_after is not None and done >= stop_after:
                    raise _StopTraining
    except _StopTraining:
        raise KeyboardInterrupt(f"stopped after step {state.step}") from None
    except TrainingError:
        _discard_run(ckpt_dir, resumed_from, accelerator)
        raise
    finally:
        bar.close()
        for hooks in (student_outputs, teacher_outputs, norms):
            if hooks is not None:
                hooks.remove()

    bad = masks.check()
    if bad:  # cannot happen: masks are re-applied after every step
        raise RuntimeError(f"mask not preserved in {bad[:3]}")
    try:
        _check_weights(model, scales, state.step, cfg, accelerator)
    except TrainingError:
        _discard_run(ckpt_dir, resumed_from, accelerator)
        raise
    after = held_out(None)
    model.eval()
    result = FinetuneResult(
        config={**cfg.to_dict(), "teacher": teacher_spec, "student": student_spec}, steps=state.step,
        seconds=state.seconds, history=state.history, evaluations=state.evaluations,
        perplexity_before=state.perplexity_before, perplexity_after=after, sparsity=masks.weight_sparsity(),
        resumed_from=resumed_from, eval_windows=0 if held_windows is None else int(held_windows.shape[0]),
        sparsity_before=sparsity_before,
    )
    unwrapped = accelerator.unwrap_model(model)
    if out_path is not None:
        save_finetuned(unwrapped, out_path, result, tokenizer=tokenizer, student_metadata=student_meta,
                       student_spec=student_spec, force=force, accelerator=accelerator, wrapped=model)
    if ckpt_dir is not None and accelerator.is_main_process and out_path is not None:
        for old in checkpoints(ckpt_dir):  # the finished model is saved: the checkpoints are no longer needed
            shutil.rmtree(old, ignore_errors=True)
        (ckpt_dir / CONFIG_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            ckpt_dir.rmdir()  # only when empty
    merge_experts(unwrapped)
    for p in unwrapped.parameters():
        p.requires_grad_(True)
    unwrapped.eval()
    return unwrapped, result


DIVERGED_CE_FACTOR = 2.0  # cross-entropy above this x ln(vocab) (twice a uniform guess's) means training diverged
WEIGHT_GROWTH_LIMIT = 100.0  # a trained weight tensor whose largest |value| grew this much (from >= 0.1) diverged


def _diverged(what: str, step: int, cfg: FinetuneConfig) -> TrainingError:
    return TrainingError(f"fine-tuning diverged at step {step} ({what}); nothing was saved: lower --lr (now "
                         f"{cfg.lr:g}), keep --max-grad-norm on (now {cfg.max_grad_norm:g}), or check the data")


def _check_loss(parts: dict, step: int, cfg: FinetuneConfig, vocab: int | None) -> None:
    """NaN/inf loss, or a cross-entropy far worse than guessing uniformly: stop before anything is saved."""
    for name, value in parts.items():
        if not math.isfinite(value):
            raise _diverged(f"loss {value}" if name == "loss" else f"{name} loss {value}", step, cfg)
    if isinstance(vocab, int) and vocab > 1 and parts.get("ce", 0.0) > DIVERGED_CE_FACTOR * math.log(vocab) + 1:
        raise _diverged(f"cross-entropy {parts['ce']:.4g}, worse than {DIVERGED_CE_FACTOR:g}x a uniform guess over "
                        f"{vocab} tokens", step, cfg)


def _discard_run(ckpt_dir: Path | None, resumed_from: int | None, accelerator) -> None:
    """A fresh run that diverged leaves nothing behind: its checkpoints (of the diverging run) and config go. A
    resumed run keeps the checkpoints it started from."""
    if ckpt_dir is None or resumed_from is not None or not accelerator.is_main_process:
        return
    for old in [*checkpoints(ckpt_dir), *ckpt_dir.glob(f".{CHECKPOINT_PREFIX}*.tmp")]:
        shutil.rmtree(old, ignore_errors=True)
    (ckpt_dir / CONFIG_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        ckpt_dir.rmdir()


def _weight_scales(model: nn.Module) -> list[float]:
    with torch.no_grad():
        return [float(p.detach().abs().max()) if p.numel() else 0.0 for p in model.parameters()]


def _check_weights(model: nn.Module, scales: list[float], step: int, cfg: FinetuneConfig, accelerator) -> None:
    """After the last step: every trained weight finite and of a sane size (a huge learning rate can blow the
    weights up without the loss, measured before the update, showing it)."""
    worst, bad = 0.0, 0.0
    with torch.no_grad():
        for p, before in zip(model.parameters(), scales):
            if not p.requires_grad or not p.numel():
                continue
            now = float(p.detach().abs().max())
            if not math.isfinite(now):
                bad = 1.0
                break
            worst = max(worst, now / max(before, 0.1))
    flags = torch.tensor([bad, worst], device=accelerator.device)
    if accelerator.num_processes > 1:  # every process decides alike (FSDP: each holds a shard)
        flags = accelerator.gather(flags).reshape(-1, 2).max(dim=0).values
    if flags[0] > 0:
        raise _diverged("the weights hold NaN or inf", step, cfg)
    if flags[1] > WEIGHT_GROWTH_LIMIT:
        raise _diverged(f"a weight tensor's largest value grew {float(flags[1]):.3g}x", step, cfg)


def _losses(model, teacher, ids, weights, cfg: FinetuneConfig, accelerator, student_outputs, teacher_outputs
            ) -> dict[str, torch.Tensor]:
    out = model(input_ids=ids, use_cache=False)
    losses = {"ce": causal_lm_loss(out.logits, ids)}
    if teacher is not None:
        with torch.no_grad(), accelerator.autocast():
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        if weights["kd"] > 0:
            losses["kd"] = kd_loss(out.logits, teacher_logits, cfg.temperature, cfg.kd_chunk)
        if weights["squarehead"] > 0:
            losses["squarehead"] = squarehead_loss(student_outputs.take(), teacher_outputs.take())
    return losses


def save_finetuned(model: nn.Module, out: Path, result: FinetuneResult, *, tokenizer=None,
                   student_metadata: dict | None = None, student_spec: str | None = None, force: bool = False,
                   accelerator=None, wrapped: nn.Module | None = None) -> Path | None:
    """Write the fine-tuned model like `prune --out` (save_pretrained + sparsecraft.json, atomically), plus
    finetune.yaml (the config) and finetune_log.json (loss curve and evaluations)."""
    from .. import __version__
    from ..evaluate import layer_sparsity, overall_sparsity

    meta = dict(student_metadata or {})
    state_dict = None
    if accelerator is not None:
        if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):  # gather the sharded weights
            state_dict = accelerator.get_state_dict(wrapped if wrapped is not None else model)
        if not accelerator.is_main_process:
            accelerator.wait_for_everyone()
            return None
    layers = layer_sparsity(model)
    cfg = result.config
    source = meta.get("source_model") or (student_spec if cfg.get("schedule") == "gmp" else None) or student_spec
    meta.update({
        "sparsecraft_version": __version__,
        "source_model": source,
        "sparsity": overall_sparsity(layers),
        "finetune": {k: v for k, v in result.to_dict().items() if k not in ("history",)},
    })
    if result.perplexity_after is not None:
        meta["evaluation"] = {"data": cfg["data"], "seqlen": cfg["eval_seqlen"] or cfg["seqlen"],
                              "windows": result.eval_windows,
                              "perplexity": result.perplexity_after,
                              "before_finetune_perplexity": result.perplexity_before,
                              **({"dense_perplexity": meta["evaluation"]["dense_perplexity"]}
                                 if "dense_perplexity" in meta.get("evaluation", {}) else {})}
    meta["layers"] = {n: {"shape": v["shape"], "zeros": v["zeros"], "sparsity": v["sparsity"]}
                      for n, v in layers.items()}
    config_text = FinetuneConfig.from_dict({k: v for k, v in cfg.items() if k not in ("teacher", "student")}
                                           ).to_yaml_text()
    recipe_text = None
    if student_spec is not None and (Path(student_spec).expanduser() / RECIPE_FILE).is_file():
        recipe_text = (Path(student_spec).expanduser() / RECIPE_FILE).read_text()

    def write(tmp: Path) -> None:
        with experts_merged(model):
            model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / METADATA_FILE, meta)
        write_json_atomic(tmp / LOG_FILE, {"history": result.history, "evaluations": result.evaluations})
        (tmp / CONFIG_FILE).write_text(config_text)
        if recipe_text is not None:
            (tmp / RECIPE_FILE).write_text(recipe_text)

    check_output(out, force)
    atomic_directory(Path(out), write)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return Path(out)


__all__ = ["FinetuneResult", "finetune", "save_finetuned"]
