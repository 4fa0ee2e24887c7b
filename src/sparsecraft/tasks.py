"""Zero-shot (and few-shot) lm-eval tasks on the model as loaded: `sparsecraft eval --tasks` (optional extra
`sparsecraft[tasks]`, PyPI `lm-eval`).

Tasks run only on data already on disk: everything lm-eval does here runs with the Hugging Face hub and datasets
offline, so a task whose dataset is neither in the local HF datasets cache nor in local files fails at once, with
one line naming the task and the fix, before the model is loaded."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, DataError

INSTALL_HINT = "pip install 'sparsecraft[tasks]'"
NO_DATA_HINT = ("put its dataset in the local HF datasets cache (download it once where there is a network; "
                "HF_HOME / HF_DATASETS_CACHE say where the cache is), or pass a task YAML whose dataset_kwargs "
                "data_files name files on disk")
_OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
_MANAGERS: dict = {}  # (include paths, with lm-eval's own tasks) -> TaskManager: indexing lm-eval's tasks is slow


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ConfigError(f"--tasks needs lm-eval, which is not installed ({exc.name or exc}): "
                          f"{INSTALL_HINT}") from None
    return lm_eval, HFLM, TaskManager


@contextlib.contextmanager
def offline():
    """The hub and datasets offline while lm-eval runs (the environment variables, and the flags huggingface_hub and
    datasets read them into when they were imported), restored afterwards: a missing dataset fails fast."""
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    os.environ.update({k: "1" for k in _OFFLINE_ENV})
    flags = []
    with contextlib.suppress(ImportError):
        import huggingface_hub.constants as hub_constants

        flags.append((hub_constants, "HF_HUB_OFFLINE"))
    with contextlib.suppress(ImportError):
        import datasets.config as datasets_config

        flags += [(datasets_config, "HF_HUB_OFFLINE"), (datasets_config, "HF_DATASETS_OFFLINE")]
    saved_flags = [(module, name, getattr(module, name)) for module, name in flags if hasattr(module, name)]
    for module, name, _ in saved_flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in saved_flags:
            setattr(module, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _lm_eval_quiet(quiet: bool):
    """lm-eval's INFO/WARNING log lines off (its errors become sparsecraft's one line); --quiet: its bars too."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            yield
    finally:
        logger.setLevel(level)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[0].split())[:300].strip("'\"") if lines else type(exc).__name__


def split_specs(text: str) -> list[str]:
    specs = [s.strip() for s in str(text).split(",") if s.strip()]
    if not specs:
        raise ConfigError("--tasks is empty: pass lm-eval task names (hellaswag,arc_easy), task YAML files or "
                          "directories of them, comma-separated")
    return list(dict.fromkeys(specs))


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or os.sep in spec or "/" in spec or spec.startswith((".", "~"))


def _manager(TaskManager, include: tuple[str, ...], defaults: bool):
    key = (include, defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=list(include) or None, include_defaults=defaults)
    return _MANAGERS[key]


@dataclass
class TaskPlan:
    """What `--tasks` resolved to: lm-eval task specs (names and YAML paths) and the manager that knows them."""

    specs: list[str]
    manager: object
    given: str
    names: dict[str, str] = field(default_factory=dict)  # spec -> how messages name it


def prepare(text: str, quiet: bool = False) -> TaskPlan:
    """Resolve `--tasks` and load every task's data (offline), before any model is loaded: an unknown task, a task
    file that is not one, or a task without local data is one ConfigError/DataError line."""
    _, _, TaskManager = _lm_eval()
    given = split_specs(text)
    dirs, names = [], []
    origin: dict[str, str] = {}
    for spec in given:
        path = Path(spec).expanduser()
        if path.is_dir():
            dirs.append(str(path.resolve()))
        elif path.is_file():
            origin[str(path.resolve())] = f"{_task_name(path)} ({spec})"
        elif _looks_like_path(spec):
            raise ConfigError(f"task file {spec} does not exist: pass an lm-eval task name, a task YAML file or a "
                              "directory of them")
        else:
            names.append(spec)
    with offline(), _lm_eval_quiet(quiet):
        include = tuple(dirs)
        local = _manager(TaskManager, include, False) if include else None
        defaults = any(local is None or n not in local.all_tasks for n in names)
        manager = _manager(TaskManager, include, True) if defaults else local or _manager(TaskManager, (), False)
        for name in names:
            if name not in manager.all_tasks:
                raise ConfigError(f"unknown task {name!r}: not an lm-eval task, group or tag (`lm-eval ls tasks` "
                                  "lists them), nor a task YAML file or directory")
        specs: list[str] = []
        for spec in given:
            path = Path(spec).expanduser()
            if path.is_dir():
                found = _manager(TaskManager, (str(path.resolve()),), False).all_subtasks
                if not found:
                    raise ConfigError(f"task directory {spec} defines no lm-eval task (no YAML file with a "
                                      "`task:` key)")
                specs += [t for t in found if t not in specs]
                origin.update({t: f"'{t}' (in {spec})" for t in found})
            elif path.is_file():
                specs.append(str(path.resolve()))
            else:
                specs.append(spec)
        for spec in specs:
            _load(manager, spec, origin.get(spec, repr(spec)))
    return TaskPlan(specs=specs, manager=manager, given=str(text), names=origin)


def _task_name(path: Path) -> str:
    """A task YAML's `task:` name, quoted, for messages (the file name if it cannot be read as plain YAML)."""
    import yaml

    try:
        name = yaml.safe_load(path.read_text(encoding="utf-8")).get("task")
    except Exception:  # noqa: BLE001 - lm-eval's own tags (!function), not a mapping, ...: lm-eval will say
        name = None
    return repr(name) if isinstance(name, str) else repr(path.name)


def _load(manager, spec: str, shown: str) -> None:
    """Build one task (lm-eval reads its dataset here) or raise the one-line error for it."""
    try:
        manager.load([spec])
    except (ConnectionError, FileNotFoundError) as exc:  # offline hub miss, DatasetNotFoundError, missing files
        raise DataError(f"task {shown} has no local data: {_one_line(exc)}: {NO_DATA_HINT}") from None
    except KeyError as exc:
        raise ConfigError(f"task {shown} could not be loaded: {_one_line(exc)} (a task YAML needs a `task:` key "
                          "and a dataset)") from None
    except Exception as exc:  # noqa: BLE001 - whatever lm-eval raises on a broken task config
        raise ConfigError(f"task {shown} could not be loaded: {type(exc).__name__}: {_one_line(exc)}") from None


def _prefix_token_id(model, tokenizer) -> int | None:
    """lm-eval scores an empty context after BOS (or EOS); a tokenizer with neither gets the model's own, or 0."""
    if tokenizer.bos_token_id is not None or tokenizer.eos_token_id is not None:
        return None
    config = getattr(model, "config", None)
    for key in ("bos_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return 0


def run(plan: TaskPlan, model, tokenizer, batch_size: int = 4, num_fewshot: int | None = 0,
        limit: int | None = None, quiet: bool = False) -> dict[str, dict]:
    """lm-eval's simple_evaluate on `model` as it is (sparse weights, kernels, activation sparsity installed), on
    its own device: {task or group: {acc, acc_stderr, acc_norm, acc_norm_stderr, ..., samples, num_fewshot}}."""
    lm_eval, HFLM, _ = _lm_eval()
    was_training = model.training
    try:
        with offline(), _lm_eval_quiet(quiet):
            # a copy of the tokenizer: lm-eval may give it a pad token
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size,
                      prefix_token_id=_prefix_token_id(model, tokenizer))
            out = lm_eval.simple_evaluate(model=lm, tasks=list(plan.specs), task_manager=plan.manager,
                                          num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                                          log_samples=False)
    except (ConnectionError, FileNotFoundError) as exc:
        raise DataError(f"--tasks {plan.given}: a task has no local data: {_one_line(exc)}: {NO_DATA_HINT}") from None
    finally:
        model.train(was_training)
    return summarize(out)


def summarize(out: dict) -> dict[str, dict]:
    """lm-eval's `results` ('acc,none': ..., 'acc_stderr,none': ...) as plain metric names per task/group."""
    rows: dict[str, dict] = {}
    samples = out.get("n-samples", {})
    shots = out.get("n-shot", {})
    for name, metrics in out.get("results", {}).items():
        row: dict = {}
        for key, value in metrics.items():
            if "," not in key or key.startswith(("alias", "name")):
                continue
            metric, filt = key.split(",", 1)
            label = metric if filt == "none" else f"{metric},{filt}"
            if isinstance(value, bool) or not isinstance(value, int | float):
                value = None  # 'N/A' (a group's stderr, ...)
            elif not math.isfinite(value):
                value = None
            row[label] = value
        n = samples.get(name, {})
        row["samples"] = n.get("effective") if isinstance(n, dict) else None
        row["num_fewshot"] = shots.get(name)
        rows[name] = row
    return rows


def format_tasks(rows: dict[str, dict]) -> str:
    from .report import format_table

    def cell(row, metric):
        value = row.get(metric)
        if value is None:
            return "-"
        err = row.get(f"{metric}_stderr")
        return f"{value:.4f}" if err is None else f"{value:.4f} +- {err:.4f}"

    return format_table(["task", "samples", "fewshot", "acc", "acc_norm"],
                        [[name, row.get("samples"), row.get("num_fewshot"), cell(row, "acc"), cell(row, "acc_norm")]
                         for name, row in rows.items()])


def from_args(args) -> TaskPlan | None:
    """`sparsecraft eval`'s --tasks, --num-fewshot and --limit checked, and the tasks prepared (None: no --tasks)."""
    if args.tasks is None:
        for flag, value in (("--num-fewshot", args.num_fewshot), ("--limit", args.limit)):
            if value is not None:
                raise ConfigError(f"{flag} applies to lm-eval tasks: pass --tasks too (e.g. --tasks hellaswag)")
        return None
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0 (examples in each prompt), got {args.num_fewshot}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1 (documents per task), got {args.limit}")
    return prepare(args.tasks, quiet=args.quiet)


def run_from_args(plan: TaskPlan, args, model, tokenizer) -> dict[str, dict]:
    return run(plan, model, tokenizer, batch_size=args.eval_batch_size, num_fewshot=args.num_fewshot or 0,
               limit=args.limit, quiet=args.quiet)
