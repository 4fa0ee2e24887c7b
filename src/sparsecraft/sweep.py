"""`sparsecraft sweep`: prune the same dense model with every method x sparsity, measure held-out perplexity.

The model is loaded once; a copy of its dense weights stays in memory and is put back before every row, so every
row starts from the dense model. Every row draws the same seeded calibration windows (as `sparsecraft prune` does)
and is evaluated on the same held-out windows. The JSON table is rewritten (atomically) after every finished row,
so a killed sweep keeps what it finished and `--resume` continues it.

Knee of a curve (see `knee`): the largest swept sparsity up to which perplexity stays within `tolerance` x the dense
perplexity -- at that sparsity and at every smaller swept one. `crossing` is where the curve first leaves that band,
linearly interpolated in log-perplexity between the last point inside and the first point outside.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, OutputError
from .patterns import Pattern, check_sparsity

SWEEP_FORMAT = 1
DEFAULT_KNEE_TOLERANCE = 1.5


@dataclass(frozen=True)
class RowSpec:
    method: str
    pattern: str  # "unstructured" or "N:M"
    sparsity: float

    @property
    def key(self) -> str:
        return row_key(self.method, self.pattern, self.sparsity)


def row_key(method: str, pattern: str, sparsity: float) -> str:
    """`wanda@0.5` for unstructured rows, `wanda@2:4` for N:M rows (also the --heatmap syntax)."""
    return f"{method}@{pattern if pattern != 'unstructured' else format(sparsity, 'g')}"


def parse_sparsities(spec: str | None, max_values: int | None = None) -> list[float]:
    """'a:b:step' (a to b inclusive, within float tolerance) or a comma list '0.5,0.6,0.7'; more than `max_values`
    values is an error (before they are made)."""
    if spec is None or not str(spec).strip():
        return []
    text = str(spec).strip()
    hint = "use START:STOP:STEP such as 0.3:0.8:0.1 or a comma list such as 0.5,0.6,0.7"
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError
            start, stop, step = parts
            if not step > 0 or stop < start:
                raise ConfigError(f"bad --sparsities {spec!r}: need STEP > 0 and STOP >= START; {hint}")
            span = (stop - start) / step
            if not math.isfinite(span):
                raise ConfigError(f"bad --sparsities {spec!r}: need finite START, STOP and STEP; {hint}")
            count = math.floor(span + 1e-6) + 1
            if max_values is not None and count > max_values:
                raise ConfigError(f"--sparsities {spec!r} makes {count} sparsities, beyond the sane bound of "
                                  f"{max_values} rows: use a coarser STEP, or pass --allow-large")
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"bad --sparsities {spec!r}: {hint}") from None
    if not values:
        raise ConfigError(f"bad --sparsities {spec!r}: {hint}")
    try:
        values = [check_sparsity(v) for v in values]
    except ConfigError as exc:
        raise ConfigError(f"bad --sparsities {spec!r}: {exc}") from None
    return sorted(set(values))


def parse_methods(spec: str | None) -> list[str]:
    from .registry import get_method

    names = [m.strip() for m in str(spec or "").split(",") if m.strip()]
    if not names:
        raise ConfigError("--methods needs at least one method, e.g. --methods magnitude,wanda,sparsegpt")
    for name in names:
        get_method(name)  # raises ConfigError naming the known methods
    return list(dict.fromkeys(names))


def plan_rows(methods: list[str], sparsities: list[float], patterns: str | None) -> list[RowSpec]:
    """Rows in run order: per pattern, per sparsity (ascending), per method. N:M patterns give one row per method
    at their implied sparsity; unstructured needs --sparsities."""
    pattern_list = [Pattern.parse(p.strip()) for p in str(patterns or "unstructured").split(",") if p.strip()]
    pattern_list = list(dict.fromkeys(pattern_list)) or [Pattern()]
    if sparsities and all(p.is_nm for p in pattern_list):
        raise ConfigError(f"--sparsities applies to unstructured rows, but --pattern {patterns} fixes the sparsity: "
                          "drop --sparsities or add unstructured to --pattern")
    rows = []
    for pattern in pattern_list:
        if pattern.is_nm:
            rows.extend(RowSpec(m, str(pattern), pattern.nm_sparsity) for m in methods)
        else:
            if not sparsities:
                raise ConfigError("an unstructured sweep needs --sparsities, e.g. --sparsities 0.3:0.8:0.1")
            rows.extend(RowSpec(m, "unstructured", s) for s in sparsities for m in methods)
    return rows


def knee(sparsities: list[float], perplexities: list[float], dense: float,
         tolerance: float = DEFAULT_KNEE_TOLERANCE) -> dict:
    """The knee of one method's curve: the largest swept sparsity such that perplexity <= tolerance x dense there and
    at every smaller swept sparsity (None when even the smallest is above). `crossing`: the sparsity where the curve
    first exceeds the limit, interpolated linearly in log-perplexity (None when it never does within the sweep, or
    when the very first point is already above)."""
    if not tolerance >= 1:
        raise ConfigError(f"knee tolerance must be >= 1 (a multiple of the dense perplexity), got {tolerance}")
    limit = tolerance * dense
    points = sorted(zip(sparsities, perplexities))
    best, crossing, exceeded = None, None, False
    for s, p in points:
        inside = p is not None and math.isfinite(p) and p <= limit
        if not inside:
            exceeded = True
            if best is not None and p is not None and p > 0:
                s0, p0 = best
                if math.isfinite(p) and p > p0:
                    t = (math.log(limit) - math.log(p0)) / (math.log(p) - math.log(p0))
                    crossing = s0 + t * (s - s0)
                else:
                    crossing = s
            break
        best = (s, p)
    return {
        "tolerance": tolerance,
        "limit": limit,
        "sparsity": best[0] if best else None,
        "perplexity": best[1] if best else None,
        "ratio": best[1] / dense if best else None,
        "crossing": crossing,
        "exceeded": exceeded,
    }


def knees(data: dict, tolerance: float | None = None) -> dict[str, dict]:
    """Knee of every (method, unstructured) curve in a sweep table."""
    tolerance = tolerance or data.get("knee_tolerance") or DEFAULT_KNEE_TOLERANCE
    dense = data["dense"]["perplexity"]
    out = {}
    for method in _methods(data):
        rows = [r for r in data["rows"] if r["method"] == method and r["pattern"] == "unstructured"]
        if rows:
            out[method] = knee([r["sparsity"] for r in rows], [r["perplexity"] for r in rows], dense, tolerance)
    return out


def _methods(data: dict) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in data["rows"]))


def default_heatmap_row(data: dict) -> dict | None:
    """The last row whose layers were given different target sparsities (non-uniform allocation: OWL, overrides);
    otherwise the highest-sparsity unstructured row of the method with the lowest perplexity there (else the last
    row)."""
    rows = data["rows"]
    if not rows:
        return None
    for row in reversed(rows):
        if row.get("uniform") is False:
            return row
    unstructured = [r for r in rows if r["pattern"] == "unstructured"]
    if not unstructured:
        return rows[-1]
    top = max(r["sparsity"] for r in unstructured)
    return min((r for r in unstructured if r["sparsity"] == top), key=lambda r: r["perplexity"])


def find_row(data: dict, spec: str) -> dict:
    """A row by `METHOD@SPARSITY` or `METHOD@N:M`."""
    method, _, setting = spec.partition("@")
    for row in data["rows"]:
        if row["method"] != method.strip():
            continue
        if setting.strip() == row["pattern"] or (
                row["pattern"] == "unstructured" and _float_eq(setting, row["sparsity"])):
            return row
    keys = ", ".join(r["key"] for r in data["rows"])
    raise ConfigError(f"--heatmap {spec!r} matches no row of the sweep: use METHOD@SPARSITY, one of: {keys}")


def _float_eq(text: str, value: float) -> bool:
    try:
        return abs(float(text) - value) < 1e-6
    except ValueError:
        return False


def check_outputs(json_path: Path, report: Path | None, force: bool, resume: bool) -> None:
    """Fail before any work: the sweep table (expensive) is only replaced with --force or continued with --resume;
    the HTML report (derived from the table) is simply rewritten."""
    for path in (json_path, report):
        if path is not None and path.is_dir():
            raise OutputError(f"{path} is a directory: pass a file name")
    if json_path.exists() and not (force or resume):
        raise OutputError(f"{json_path} already exists: pass --resume to continue that sweep, --force to replace it, "
                          "or choose another --json")


def load_sweep(path: str | Path) -> dict:
    import json

    path = Path(path)
    if not path.is_file():
        raise OutputError(f"sweep table {path} does not exist: run sparsecraft sweep first")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); re-run the sweep with --force") from None
    if not isinstance(data, dict) or data.get("format") != SWEEP_FORMAT or "rows" not in data:
        raise ConfigError(f"{path} is not a sparsecraft sweep table (format {SWEEP_FORMAT}): re-run the sweep")
    check_table(data, path)
    return data


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_ROW_FIELDS = {"key": str, "method": str, "pattern": str, "sparsity": "number", "reached": "number",
               "perplexity": "number?", "ratio": "number?", "seconds": "number"}
_DENSE_FIELDS = {"perplexity": "number", "sparsity": "number", "windows": "number", "tokens": "number"}


def check_table(data: dict, path: str | Path = "the sweep table") -> None:
    """Every field the summary, the knees and the HTML report read has the type they expect: a sweep table edited
    by hand (or by something hostile) is one error naming the field, not a traceback halfway through a report."""

    def bad(where: str, expected: str) -> ConfigError:
        return ConfigError(f"{path}: {where} must be {expected}: the table is damaged; re-run the sweep (--force)")

    def check_fields(record, fields: dict, where: str) -> None:
        if not isinstance(record, dict):
            raise bad(where, "an object")
        for name, kind in fields.items():
            value = record.get(name)
            ok = (_number(value) if kind == "number" else _number(value) or value is None if kind == "number?"
                  else isinstance(value, kind))
            if not ok:
                raise bad(f"{where}.{name}", "a string" if kind is str else "a number")

    rows = data.get("rows")
    if not isinstance(rows, list):
        raise bad("rows", "a list")
    for i, row in enumerate(rows):
        check_fields(row, _ROW_FIELDS, f"rows[{i}]")
        layers = row.get("layers")
        if layers is not None and not (isinstance(layers, dict) and all(
                isinstance(k, str) and _number(v) for k, v in layers.items())):
            raise bad(f"rows[{i}].layers", "an object of layer names to sparsities")
        for name in ("errors", "search"):
            if row.get(name) is not None and not isinstance(row[name], dict):
                raise bad(f"rows[{i}].{name}", "an object")
    if data.get("dense") is not None:
        check_fields(data["dense"], _DENSE_FIELDS, "dense")
        if not data["dense"]["perplexity"] > 0:
            raise bad("dense.perplexity", "a positive number")
    tolerance = data.get("knee_tolerance")
    if tolerance is not None and not (_number(tolerance) and tolerance >= 1):
        raise bad("knee_tolerance", "a number >= 1")
    for name, kind in (("config", dict), ("planned", list)):
        if data.get(name) is not None and not isinstance(data[name], kind):
            raise bad(name, "an object" if kind is dict else "a list")
    if isinstance(data.get("config"), dict) and data["config"].get("recipe") is not None \
            and not isinstance(data["config"]["recipe"], dict):
        raise bad("config.recipe", "an object")


def run_sweep(*, model_spec: str, dtype, base_recipe, rows: list[RowSpec], json_path: Path, device, eval_seqlen: int,
              eval_batch_size: int, max_eval_windows: int | None, resume: bool, progress: bool,
              knee_tolerance: float, on_row=None, eval_data=None) -> dict:
    """Run every row (skipping those already in `json_path` when resuming) and return the sweep table. Each row's
    `perplexity` is on the calibration source's held-out split (knees and plots use it); `domains` adds every
    --eval-data source (sparsecraft.domains; default: licenses) and `geomean` their geometric mean."""
    import torch
    from tqdm.auto import tqdm

    from . import api
    from ._version import __version__
    from .checkpoint import write_json_atomic
    from .domains import eval_specs, geometric_mean, load_sources, windows_for
    from .evaluate import layer_sparsity, overall_sparsity, perplexity
    from .models import check_causal, check_context, load_model

    config = {
        "model": str(model_spec), "dtype": dtype, "data": base_recipe.data,
        "recipe": {k: v for k, v in base_recipe.to_dict().items() if k not in ("method", "sparsity", "pattern")},
        "eval_seqlen": eval_seqlen, "max_eval_windows": max_eval_windows,
        "eval_data": eval_specs(eval_data, base_recipe.data)[1:],
    }
    data: dict = {"format": SWEEP_FORMAT, "sparsecraft_version": __version__, "config": config,
                  "knee_tolerance": knee_tolerance, "dense": None, "rows": [], "planned": [r.key for r in rows],
                  "complete": False}
    if resume and json_path.exists():
        old = load_sweep(json_path)
        if old.get("config") != config:
            changed = sorted(k for k in set(config) | set(old.get("config", {}))
                             if config.get(k) != old.get("config", {}).get(k))
            raise ConfigError(f"--resume: {json_path} was made with different settings ({', '.join(changed)}): "
                              "use the same flags, or --force to start over")
        wanted = {r.key for r in rows}
        data["dense"] = old.get("dense")
        data["rows"] = [r for r in old["rows"] if r["key"] in wanted]
    done = {r["key"] for r in data["rows"]}
    todo = [r for r in rows if r.key not in done]

    # every row's recipe first, so that a bad combination fails before the model is loaded
    recipes = {r.key: api.make_recipe(base_recipe, method=r.method, pattern=r.pattern, sparsity=r.sparsity)
               for r in todo}
    if max_eval_windows is not None and max_eval_windows < 1:
        raise ConfigError(f"--max-eval-windows must be >= 1, got {max_eval_windows}")
    if not todo and data["dense"] is not None:
        data["complete"] = True
        write_json_atomic(json_path, data)
        return data
    t0 = time.perf_counter()
    splits = api.load_text(base_recipe.data)  # bad text fails before the model loads
    sources = load_sources(eval_specs(eval_data, base_recipe.data), splits)
    model, tokenizer = load_model(model_spec, dtype=dtype)
    model.to(device)
    check_context(model, max(eval_seqlen, base_recipe.seqlen))
    check_causal(model, "its perplexity would score predictions made from the tokens they predict")
    all_windows = windows_for(sources, tokenizer, eval_seqlen, max_eval_windows)
    first = sources[0].name  # the calibration source (a mix: its first source)
    windows = all_windows[first]
    data["load_seconds"] = time.perf_counter() - t0
    # on the CPU, so that an accelerator holds one copy of the model
    dense_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def save() -> None:
        data["rows"].sort(key=lambda r: data["planned"].index(r["key"]) if r["key"] in data["planned"] else 1e9)
        data["complete"] = all(k in {r["key"] for r in data["rows"]} for k in data["planned"])
        write_json_atomic(json_path, data)

    def ppl() -> dict:
        """{source name: perplexity}, the calibration source's first"""
        return {name: perplexity(model, w, batch_size=eval_batch_size, progress=False)
                for name, w in all_windows.items()}

    def domain_fields(values: dict) -> dict:
        return {"domains": values, "geomean": geometric_mean(values.values())} if len(values) > 1 else {}

    if data["dense"] is None:
        t1 = time.perf_counter()
        dense_ppl = ppl()
        data["dense"] = {"perplexity": dense_ppl[first], "sparsity": overall_sparsity(layer_sparsity(model)),
                         "windows": int(windows.shape[0]), "tokens": int(windows.numel()),
                         "seconds": time.perf_counter() - t1, **domain_fields(dense_ppl)}
        save()
    bar = tqdm(todo, desc="sweep", unit="row", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.key)
        with torch.no_grad():
            model.load_state_dict(dense_state)
        recipe = recipes[spec.key]
        # the calibration text, as `sparsecraft prune` passes it: the same seeded windows for every row
        _, report = api.prune(model, splits, recipe, tokenizer=tokenizer, device=device, progress=False)
        t1 = time.perf_counter()
        values = ppl()
        value = values[first]
        row = {
            "key": spec.key, "method": spec.method, "pattern": spec.pattern, "sparsity": spec.sparsity,
            "reached": report.sparsity, "perplexity": value, "ratio": value / data["dense"]["perplexity"],
            **domain_fields(values),
            "seconds": report.seconds, "eval_seconds": time.perf_counter() - t1,
            "layers": {r.name: r.sparsity for r in report.layers},
            "uniform": len({round(r.target_sparsity, 9) for r in report.layers}) <= 1,
        }
        search = getattr(report, "search", None)
        if search:
            row["search"] = {k: search[k] for k in ("seconds", "generations", "evaluations", "kl", "uniform_kl")
                             if k in search}
        errors = {r.name: r.error for r in report.layers if r.error is not None}
        if errors:
            row["errors"] = errors
        data["rows"].append(row)
        save()
        if on_row is not None:
            on_row(row, bar)
    with torch.no_grad():
        model.load_state_dict(dense_state)
    save()
    return data


def _other_domains(data: dict) -> list[str]:
    """The out-of-domain sources of a sweep table, in order (none in tables made before sparsecraft.domains)."""
    dense = data.get("dense") or {}
    return list(dense.get("domains", {}))[1:]


def summary_rows(data: dict) -> list[list]:
    """Rows for report.format_table (headers: summary_headers(data)): the dense model, then every sweep row."""
    dense = data.get("dense") or {}
    others = _other_domains(data)

    def extra(r):
        if not others:
            return []
        return [r.get("domains", {}).get(n) for n in others] + [r.get("geomean")]

    out = []
    if dense:
        out.append(["dense", "-", "-", f"{dense['sparsity']:.2%}", dense["perplexity"], *extra(dense), "1.00", "-"])
    for r in data["rows"]:
        out.append([r["method"], r["pattern"], f"{r['sparsity']:g}", f"{r['reached']:.2%}", r["perplexity"],
                    *extra(r), f"{r['ratio']:.2f}", f"{r['seconds']:.1f}"])
    return out


SUMMARY_HEADERS = ["method", "pattern", "target", "sparsity", "perplexity", "x dense", "prune s"]


def summary_headers(data: dict) -> list[str]:
    others = _other_domains(data)
    if not others:
        return SUMMARY_HEADERS
    return SUMMARY_HEADERS[:5] + [f"ppl {n}" for n in others] + ["geomean"] + SUMMARY_HEADERS[5:]
