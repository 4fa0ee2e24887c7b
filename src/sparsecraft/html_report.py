"""Self-contained HTML reports (one file, PNG plots as base64 data URIs, inline CSS, no scripts, no network):

- `sweep_html`: perplexity vs sparsity for every method (log y, dense as a line, each curve's knee marked), the knee
  table, a per-layer sparsity heatmap (layer kind x block) of one row, and the numeric table.
- `dir_html`: one pruned output directory: per-layer sparsity measured from the saved weights, heatmaps, the
  per-layer table (N:M validity, reconstruction error when recorded), the recipe and the recorded perplexities.

Plots are drawn with matplotlib's Agg canvas directly (no pyplot, so no global backend is touched).
`render_check` opens a report in headless Chromium and reports whether every embedded image decoded.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .errors import ModelError, OutputError

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:.92em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f2f2f2}tr:nth-child(even) td{background:#fafafa}
td.bad{color:#b00;font-weight:bold}td.ok{color:#070}
img{max-width:100%;height:auto;display:block;margin:.5em 0;border:1px solid #eee}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em}
.note{color:#666;font-size:.88em}
"""

_BLOCK_NAME = re.compile(r"^(?P<prefix>.*?)\.(?P<block>\d+)\.(?P<rest>.+)$")


# ----------------------------------------------------------------------------------------------------- plotting


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def png_data_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def layer_grid(names: list[str]) -> tuple[list[str], list[int], dict[str, tuple[int, int]]]:
    """Rows (layer kinds, e.g. q_proj ... down_proj, in model order), columns (block indices) and each layer's cell.
    A kind is the name after the block index, shortened to its last part when that is unambiguous."""
    cells, kinds, blocks = {}, [], []
    for name in names:
        m = _BLOCK_NAME.match(name)
        if not m:
            continue
        rest, block = m.group("rest"), int(m.group("block"))
        if rest not in kinds:
            kinds.append(rest)
        if block not in blocks:
            blocks.append(block)
        cells[name] = (rest, block)
    blocks.sort()
    last = [k.rsplit(".", 1)[-1] for k in kinds]
    labels = {k: (s if last.count(s) == 1 else k) for k, s in zip(kinds, last)}
    grid = {n: (kinds.index(rest), blocks.index(b)) for n, (rest, b) in cells.items()}
    return [labels[k] for k in kinds], blocks, grid


def heatmap_figure(values: dict[str, float], title: str, label: str = "sparsity", percent: bool = True,
                   cmap: str = "viridis"):
    """Layer kind x block heatmap of `values` ({layer name: value}); None when no name carries a block index."""
    import numpy as np

    kinds, blocks, grid = layer_grid(list(values))
    if not grid:
        return None
    data = np.full((len(kinds), len(blocks)), np.nan)
    for name, (r, c) in grid.items():
        if values[name] is not None:
            data[r, c] = values[name]
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return None
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < 1e-3:
        lo, hi = lo - 0.05 * max(abs(lo), 0.1), hi + 0.05 * max(abs(hi), 0.1)
    width = min(18.0, max(6.0, 0.42 * len(blocks) + 2.5))
    fig = _figure(width, max(2.2, 0.42 * len(kinds) + 1.3))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_yticks(range(len(kinds)), kinds)
    step = max(1, math.ceil(len(blocks) / 40))
    ax.set_xticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]])
    ax.set_xlabel("block")
    ax.set_title(title)
    bar = fig.colorbar(im, ax=ax, pad=0.01)
    bar.set_label(label)
    if percent:
        from matplotlib.ticker import PercentFormatter

        bar.ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
    if len(blocks) <= 32 and len(kinds) <= 14:
        mid = (lo + hi) / 2
        for (r, c), v in np.ndenumerate(data):
            if np.isfinite(v):
                text = f"{100 * v:.0f}" if percent else f"{v:.2g}"
                ax.text(c, r, text, ha="center", va="center", fontsize=7, color="white" if v < mid else "black")
    fig.tight_layout()
    return fig


def sweep_figure(data: dict, knees: dict[str, dict]):
    """Perplexity vs sparsity, one line per method (unstructured rows), N:M rows as separate markers."""
    from matplotlib.ticker import FuncFormatter, NullFormatter, PercentFormatter

    fig = _figure(10.5, 5.6)
    ax = fig.add_subplot()
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
    dense = data["dense"]["perplexity"]
    methods = list(dict.fromkeys(r["method"] for r in data["rows"]))
    nm_markers = ["D", "s", "^", "v", "P", "X"]
    nm_patterns = list(dict.fromkeys(r["pattern"] for r in data["rows"] if r["pattern"] != "unstructured"))
    values = [dense]
    x_lo, x_hi = min(r["sparsity"] for r in data["rows"]), max(r["sparsity"] for r in data["rows"])
    for i, method in enumerate(methods):
        color = palette[i % len(palette)]
        rows = sorted((r for r in data["rows"] if r["method"] == method and r["pattern"] == "unstructured"
                       and _finite(r["perplexity"])), key=lambda r: r["sparsity"])
        if rows:
            xs, ys = [r["sparsity"] for r in rows], [r["perplexity"] for r in rows]
            values += ys
            ax.plot(xs, ys, "-o", color=color, label=method, markersize=5)
            k = knees.get(method)
            if k and k["sparsity"] is not None:
                ax.plot([k["sparsity"]], [k["perplexity"]], "o", markersize=15, markerfacecolor="none",
                        markeredgecolor=color, markeredgewidth=2)
                left = k["sparsity"] <= (x_lo + x_hi) / 2  # label towards the middle of the plot
                ax.annotate(f"{method} knee {k['sparsity']:.0%}", (k["sparsity"], k["perplexity"]),
                            textcoords="offset points", xytext=(12 if left else -12, 12 + 11 * i),
                            ha="left" if left else "right", fontsize=8, color=color)
        for j, pattern in enumerate(nm_patterns):
            pts = [r for r in data["rows"] if r["method"] == method and r["pattern"] == pattern
                   and _finite(r["perplexity"])]
            if pts:
                values += [r["perplexity"] for r in pts]
                ax.plot([r["sparsity"] for r in pts], [r["perplexity"] for r in pts], nm_markers[j % len(nm_markers)],
                        color=color, markersize=8, markeredgecolor="black", label=f"{method} {pattern}")
    ax.axhline(dense, color="gray", linestyle="--", linewidth=1.2, label=f"dense ({dense:.4g})")
    tolerance = next(iter(knees.values()))["tolerance"] if knees else None
    if tolerance:
        ax.axhline(tolerance * dense, color="gray", linestyle=":", linewidth=1,
                   label=f"knee limit ({tolerance:g}x dense)")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:.4g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain if max(values) / min(values) < 20 else NullFormatter())
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel("sparsity (target, fraction of zeros in the pruned layers)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    if min(values) > 0:
        ax.set_ylim(min(values) / 1.15, max(values) * 1.3)
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    ax.set_title("perplexity vs sparsity")
    fig.tight_layout()
    return fig


def _finite(value) -> bool:
    return value is not None and isinstance(value, int | float) and math.isfinite(value) and value > 0


# ------------------------------------------------------------------------------------------------------ HTML


def _esc(value) -> str:
    return html.escape(str(value))


def _num(value, fmt: str = "{:.4g}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return fmt.format(value)


def html_table(headers: list[str], rows: list[list], numeric: set[int] | None = None,
               classes: list[list[str]] | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, v in enumerate(row):
            cls = [c for c in ("num" if j in numeric else "", classes[i][j] if classes else "") if c]
            attr = f' class="{" ".join(cls)}"' if cls else ""
            text = _num(v) if isinstance(v, float) else ("-" if v is None else v)
            cells.append(f"<td{attr}>{_esc(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _page(title: str, body: list[str]) -> str:
    from ._version import __version__

    stamp = time.strftime("%Y-%m-%d %H:%M")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{_esc(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body)
            + f"\n<p class=\"note\">sparsecraft {_esc(__version__)}, {stamp}</p>\n</body></html>\n")


def _img(fig, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="{png_data_uri(fig)}">'


def sweep_html(data: dict, heatmap: str | None = None, tolerance: float | None = None) -> str:
    """The sweep report as one HTML page."""
    from .sweep import default_heatmap_row, find_row, knees, summary_rows

    cfg = data.get("config", {})
    recipe = cfg.get("recipe", {})
    dense = data.get("dense")
    if not dense or not data["rows"]:
        raise OutputError("the sweep table has no finished rows yet: nothing to report")
    kn = knees(data, tolerance)
    tol = next(iter(kn.values()))["tolerance"] if kn else (tolerance or data.get("knee_tolerance") or 1.5)
    body = ["<h1>sparsecraft sweep</h1>",
            f"<p class=\"meta\">model <b>{_esc(cfg.get('model'))}</b> &middot; data {_esc(cfg.get('data'))} &middot; "
            f"calibration {_esc(recipe.get('nsamples'))} x {_esc(recipe.get('seqlen'))} tokens, seed "
            f"{_esc(recipe.get('seed'))} &middot; allocation {_esc(recipe.get('allocation'))} &middot; refine "
            f"{_esc(','.join(recipe.get('refine') or []) or 'none')} &middot; evaluation {dense['tokens']} held-out "
            f"tokens ({dense['windows']} windows of {_esc(cfg.get('eval_seqlen'))}) &middot; dense perplexity "
            f"<b>{dense['perplexity']:.4g}</b></p>"]
    if not data.get("complete", True):
        missing = [k for k in data.get("planned", []) if k not in {r["key"] for r in data["rows"]}]
        body.append(f"<p class=\"note\"><b>Incomplete sweep:</b> {len(missing)} planned rows not finished "
                    f"({_esc(', '.join(missing))}).</p>")
    body += ["<h2>Perplexity vs sparsity</h2>", _img(sweep_figure(data, kn), "perplexity vs sparsity")]
    body.append("<h2>Knees</h2>")
    body.append(f"<p class=\"note\">Knee: the largest swept sparsity up to which the method's perplexity stays within "
                f"{tol:g}&times; the dense perplexity (&le; {tol * dense['perplexity']:.4g}) at that sparsity and at "
                "every smaller swept one (circled on the plot). Crossing: where the curve first exceeds that limit, "
                "interpolated linearly in log-perplexity between the neighbouring swept points. Unstructured rows "
                "only.</p>")
    krows = []
    for method, k in kn.items():
        crossing = ("beyond the sweep" if not k["exceeded"] else
                    f"{k['crossing']:.1%}" if k["crossing"] is not None else "below the first point")
        krows.append([method, _num(k["sparsity"], "{:.0%}") if k["sparsity"] is not None else "none",
                      _num(k["perplexity"]), _num(k["ratio"], "{:.2f}"), crossing])
    if krows:
        body.append(html_table(["method", "knee sparsity", "perplexity at knee", "x dense", "crossing"], krows,
                               numeric={1, 2, 3}))
    else:
        body.append("<p class=\"note\">No unstructured rows: no knees.</p>")
    row = find_row(data, heatmap) if heatmap else default_heatmap_row(data)
    if row and row.get("layers"):
        fig = heatmap_figure(row["layers"], f"per-layer sparsity: {row['key']}")
        if fig is not None:
            body += [f"<h2>Per-layer sparsity: {_esc(row['key'])}</h2>",
                     "<p class=\"note\">Rows: layer kind; columns: transformer block; cells: percent zeros. "
                     "Pick another row with <code>--heatmap METHOD@SPARSITY</code>.</p>",
                     _img(fig, f"per-layer sparsity heatmap {row['key']}")]
    from .sweep import summary_headers

    headers = summary_headers(data)
    body += ["<h2>All rows</h2>", html_table(headers, summary_rows(data), numeric=set(range(2, len(headers))))]
    body.append("<h2>Settings</h2><pre>" + _esc(_yaml(cfg)) + "</pre>")
    return _page("sparsecraft sweep", body)


def _yaml(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


# ------------------------------------------------------------------------------------- pruned output directories


def _tensor_files(path: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} for a save_pretrained directory (single file or sharded)."""
    import json

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return {k: path / v for k, v in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    return {}


def _meta_model_layers(path: Path) -> tuple[list[str], set[str], dict[str, list[str]]] | None:
    """From config.json alone (weights on the meta device): the prunable layers inside the blocks, those stored
    transposed (transformers' Conv1D), and each parameter's aliases (tied weights)."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from .models import find_blocks, is_prunable

        config = AutoConfig.from_pretrained(str(path))
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - any failure just means: fall back to loading the model
        return None
    from torch import nn

    _, blocks = find_blocks(model)
    inside = {id(m) for b in blocks for m in b.modules()}
    names = [n for n, m in model.named_modules() if is_prunable(m) and id(m) in inside]
    transposed = {n for n, m in model.named_modules() if is_prunable(m) and not isinstance(m, nn.Linear)}
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    aliases = {n: group for group in by_id.values() for n in group}
    return names, transposed, aliases


def _is_compressed(path: Path) -> bool:
    try:
        from .compressed import is_compressed_dir
    except ImportError:  # pragma: no cover - optional module
        return False
    return is_compressed_dir(path)


def measure_dir(path: str | Path) -> dict:
    """Per-layer sparsity of a pruned output directory, measured from its saved weights (safetensors, read tensor
    by tensor; falls back to loading the model when the weights are stored some other way)."""
    from .checkpoint import read_metadata
    from .patterns import Pattern, is_nm_valid

    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"{path} does not exist: pass a directory written by sparsecraft prune --out")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a model directory (no config.json): pass a directory written by "
                         "sparsecraft prune --out")
    from .models import check_model_files

    check_model_files(path)
    meta = read_metadata(path)
    recorded = meta.get("layers") or {}
    recipe = meta.get("recipe") or {}
    pattern = Pattern.parse(recipe.get("pattern", "unstructured"))
    structure = _meta_model_layers(path)
    names = list(recorded) or (structure[0] if structure else [])
    transposed = structure[1] if structure else set()
    aliases = structure[2] if structure else {}
    files = {} if _is_compressed(path) else _tensor_files(path)  # compressed layers: measured after loading

    def key_of(name: str) -> str | None:
        for candidate in [f"{name}.weight", *aliases.get(f"{name}.weight", [])]:
            if candidate in files:
                return candidate
        return None

    keys = {n: key_of(n) for n in names}
    layers: dict[str, dict] = {}
    source = "safetensors"
    if names and all(keys.values()):
        from contextlib import ExitStack

        from safetensors import safe_open

        with ExitStack() as stack:
            handles: dict[Path, object] = {}
            for name in names:
                file = files[keys[name]]
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
                tensor = handles[file].get_tensor(keys[name])
                if tensor.ndim != 2:
                    break
                transpose = name in transposed
                shape = recorded.get(name, {}).get("shape")
                if shape and list(tensor.shape) != shape and list(tensor.shape[::-1]) == shape:
                    transpose = True  # the recorded [out, in] shape wins when the config could not tell
                layers[name] = _measure(tensor.t() if transpose else tensor, pattern, is_nm_valid)
    if len(layers) != len(names) or not names:
        source = "model"
        layers = _measure_loaded(path, names, pattern, is_nm_valid)
    for name, info in layers.items():
        rec = recorded.get(name, {})
        info["target"] = rec.get("target")
        info["recorded"] = rec.get("sparsity")
        info["error"] = rec.get("error")
    total = sum(v["shape"][0] * v["shape"][1] for v in layers.values())
    return {
        "path": str(path), "source_model": meta.get("source_model"), "recipe": recipe, "pattern": str(pattern),
        "measured_from": source, "sparsity": sum(v["zeros"] for v in layers.values()) / max(total, 1),
        "recorded_sparsity": meta.get("sparsity"), "prune_seconds": meta.get("seconds"),
        "evaluation": meta.get("evaluation"), "layers": layers,
        "recipe_yaml": (path / "recipe.yaml").read_text() if (path / "recipe.yaml").is_file() else None,
    }


def _measure(matrix, pattern, is_nm_valid) -> dict:
    zeros = int((matrix == 0).sum())
    rows, cols = matrix.shape
    nm = None
    if pattern.is_nm:
        nm = bool(is_nm_valid(matrix, pattern)) if cols % pattern.m == 0 else None
    return {"shape": [rows, cols], "zeros": zeros, "sparsity": zeros / max(rows * cols, 1), "nm_valid": nm}


def _measure_loaded(path: Path, names: list[str], pattern, is_nm_valid) -> dict[str, dict]:
    from .models import find_blocks, is_prunable, load_model, weight_matrix

    model, _ = load_model(path)
    modules = dict(model.named_modules())
    if not names:
        _, blocks = find_blocks(model)
        inside = {id(m) for b in blocks for m in b.modules()}
        names = [n for n, m in modules.items() if is_prunable(m) and id(m) in inside]
    missing = [n for n in names if n not in modules]
    if missing:
        raise ModelError(f"{path}: sparsecraft.json names layers the model does not have ({missing[0]}, ...): "
                         "the directory was changed after pruning; re-create it with sparsecraft prune")
    return {n: _measure(weight_matrix(modules[n]).detach(), pattern, is_nm_valid) for n in names}


def dir_rows(info: dict) -> tuple[list[str], list[list]]:
    """Per-layer table (headers, rows) of `measure_dir` output, for text and HTML."""
    nm = info["pattern"] != "unstructured"
    headers = ["layer", "shape", "sparsity", "target"] + ([f"{info['pattern']} valid"] if nm else []) + ["error"]
    rows = []
    for name, v in info["layers"].items():
        row = [name, "x".join(map(str, v["shape"])), f"{v['sparsity']:.2%}",
               f"{v['target']:.2%}" if v.get("target") is not None else "-"]
        if nm:
            row.append({True: "yes", False: "NO", None: "n/a"}[v["nm_valid"]])
        row.append(f"{v['error']:.4f}" if v.get("error") is not None else "-")
        rows.append(row)
    return headers, rows


def dir_summary(info: dict) -> tuple[list[str], list[list]]:
    ev = info.get("evaluation") or {}
    recipe = info.get("recipe") or {}
    headers = ["model", "method", "pattern", "sparsity", "dense ppl", "perplexity", "prune s"]
    rows = [[info["path"], recipe.get("method", "-"), info["pattern"], f"{info['sparsity']:.2%}",
             ev.get("dense_perplexity"), ev.get("perplexity"),
             f"{info['prune_seconds']:.1f}" if info.get("prune_seconds") is not None else None]]
    return headers, rows


def dir_html(info: dict) -> str:
    recipe = info.get("recipe") or {}
    ev = info.get("evaluation") or {}
    body = [f"<h1>sparsecraft report: {_esc(Path(info['path']).name)}</h1>",
            f"<p class=\"meta\">{_esc(info['path'])} &middot; pruned from <b>{_esc(info.get('source_model'))}</b> "
            f"&middot; method <b>{_esc(recipe.get('method', '-'))}</b> &middot; pattern {_esc(info['pattern'])} "
            f"&middot; {len(info['layers'])} pruned layers, measured sparsity <b>{info['sparsity']:.2%}</b> "
            f"(from the saved weights, read from {_esc(info['measured_from'])})</p>"]
    if ev:
        dense, ppl = ev.get("dense_perplexity"), ev.get("perplexity")
        ratio = f"{ppl / dense:.2f}" if dense and ppl else "-"
        body.append("<h2>Perplexity (recorded at pruning time)</h2>")
        body.append(html_table(["data", "windows x seqlen", "dense", "pruned", "x dense"],
                               [[ev.get("data"), f"{ev.get('windows')} x {ev.get('seqlen')}", _num(dense), _num(ppl),
                                 ratio]], numeric={2, 3, 4}))
    else:
        body.append("<p class=\"note\">No perplexity recorded (pruned with --no-eval): run "
                    "<code>sparsecraft eval DIR</code>.</p>")
    sparsities = {n: v["sparsity"] for n, v in info["layers"].items()}
    fig = heatmap_figure(sparsities, "measured per-layer sparsity")
    if fig is not None:
        body += ["<h2>Per-layer sparsity</h2>",
                 "<p class=\"note\">Rows: layer kind; columns: transformer block; cells: percent zeros in the saved "
                 "weight.</p>", _img(fig, "per-layer sparsity heatmap")]
    errors = {n: v["error"] for n, v in info["layers"].items() if v.get("error") is not None}
    if errors:
        fig = heatmap_figure(errors, "relative reconstruction error on calibration inputs", label="error",
                             percent=False, cmap="magma")
        if fig is not None:
            body += ["<h2>Reconstruction error</h2>",
                     "<p class=\"note\">||(W - W&#770;) X|| / ||W X|| per layer on the calibration inputs, recorded "
                     "while pruning.</p>", _img(fig, "reconstruction error heatmap")]
    headers, rows = dir_rows(info)
    classes = None
    if info["pattern"] != "unstructured":
        col = headers.index(f"{info['pattern']} valid")
        classes = [["" if j != col else ("ok" if r[col] == "yes" else "bad") for j in range(len(r))] for r in rows]
    body += ["<h2>Layers</h2>", html_table(headers, rows, numeric={2, 3, len(headers) - 1}, classes=classes)]
    if info.get("recipe_yaml") or recipe:
        body += ["<h2>Recipe</h2>", "<pre>" + _esc(info.get("recipe_yaml") or _yaml(recipe)) + "</pre>"]
    return _page(f"sparsecraft report: {Path(info['path']).name}", body)


# ------------------------------------------------------------------------------------------------------ output


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a report file atomically (checkpoint.write_text_atomic), refusing a directory as the target."""
    from .checkpoint import write_text_atomic as write

    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{path} is a directory: pass a file name for the report")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write(path, text)


# ------------------------------------------------------------------------------------------- browser render check

_PROBE = ("<script>window.addEventListener('load',function(){var im=document.images,ok=0;"
          "for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0){ok++;}}"
          "document.body.setAttribute('data-render-check',ok+'/'+im.length);});</script>")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    return None


def render_check(report: str | Path, screenshot: str | Path | None = None, chromium: str | None = None,
                 timeout: float = 120.0) -> dict:
    """Open `report` in headless Chromium (no network needed: everything is inline) and return
    {"images": n, "decoded": k, "ok": k == n > 0, "screenshot": path or None, "nonblank": bool or None}.
    The check runs on a copy with a tiny inline script that counts <img> elements decoded (complete, naturalWidth
    > 0) once the page has loaded; `screenshot` also saves a 1200x2000 PNG of the page and tests it is not blank."""
    exe = chromium or find_chromium()
    if exe is None:
        raise OutputError("no chromium found: install it (apt-get install chromium) for the render check")
    text = Path(report).read_text(encoding="utf-8")
    probe = text.replace("</body>", _PROBE + "</body>", 1) if "</body>" in text else text + _PROBE
    with tempfile.TemporaryDirectory(prefix="sparsecraft-render-") as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(probe, encoding="utf-8")
        base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--hide-scrollbars",
                f"--user-data-dir={Path(tmp) / 'profile'}", "--virtual-time-budget=10000"]
        dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=timeout,
                             check=False)
        m = re.search(r'data-render-check="(\d+)/(\d+)"', dom.stdout)
        result = {"images": int(m.group(2)) if m else None, "decoded": int(m.group(1)) if m else None,
                  "returncode": dom.returncode, "stderr": dom.stderr[-2000:] if not m else "",
                  "screenshot": None, "nonblank": None}
        result["ok"] = bool(m) and result["images"] > 0 and result["decoded"] == result["images"]
        if screenshot is not None:
            shot = Path(screenshot).resolve()
            subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,2000",
                            Path(report).resolve().as_uri()], capture_output=True, timeout=timeout, check=False)
            if shot.is_file():
                from PIL import Image

                with Image.open(shot) as img:
                    colors = img.convert("RGB").getcolors(maxcolors=1 << 16)
                result["screenshot"] = str(shot)
                result["nonblank"] = colors is None or len(colors) > 16
    return result
