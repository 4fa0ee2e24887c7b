"""Calibrating thresholds one block at a time, on the model as it will run (earlier blocks already sparsified).

For each block (calibrate.py's runner primitives: the block inputs are caught once, each block's outputs with its
thresholds installed feed the next block):

1. the method names the block's sites (sites.py); their per-site sparsities come from the allocation: `uniform`
   (every site the target) or `greedy` (TEAL's block-wise greedy: from zero, repeatedly give a sparsity step of
   `greedy_step` to the site whose step raises the block's output error least per weight byte it skips, measured
   on the first `greedy_samples` windows against the block's dense output, until the byte-weighted sparsity of the
   block is the target exactly; the last step is cut to land on it);
2. the sites are calibrated in the order the block computes them, each on the values it sees with the thresholds of
   the sites before it installed, so the requested sparsity is what the installed model produces on the
   calibration data: the threshold is the exact order statistic of the site's scores (|x|, or |x| times a
   per-channel scale for WINA / CHESS, stored back on |x| as one threshold per channel).

Sparsity is weighted by the weight bytes a zero lets a kernel skip: the consumers' columns (input sites), or
up_proj's rows and down_proj's columns (the gate's output). With uniform allocation every site has the target;
with greedy the byte-weighted mean over each block's sites is the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibrate import BlockInputs, block_output, capture_block_inputs, model_device
from ..errors import ConfigError, ModelError
from ..models import find_blocks, weight_matrix
from .hooks import attach, counting, detach
from .registry import get_method
from .sites import OUTPUT, Site, block_layout, site_bytes


class _Stop(Exception):
    """Raised by a recording hook: the rest of the block is not needed for this site."""


@dataclass
class SiteResult:
    block: int
    site: Site
    target: float  # the sparsity the site was calibrated to
    threshold: torch.Tensor  # on |x|: a scalar or one per feature
    measured: float | None = None  # what the installed model produced on the calibration data
    skip_rate: torch.Tensor | None = None  # per feature, the share of calibration tokens it was zero


@dataclass
class Calibration:
    """What `calibrate_thresholds` found: the per-module thresholds and sites, and each site's result."""

    thresholds: dict[str, torch.Tensor]
    sites: dict[str, str]
    results: list[SiteResult] = field(default_factory=list)
    seconds: float = 0.0


def _join(prefix: str, index: int) -> str:
    return f"{prefix}.{index}" if prefix else str(index)


def _slice(obj, n: int, batch: int):
    """The first `n` windows of a block's inputs (tensors whose first dimension is the batch)."""
    if isinstance(obj, torch.Tensor):
        return obj[:n] if obj.dim() > 0 and obj.shape[0] == batch else obj
    if isinstance(obj, tuple):
        return tuple(_slice(o, n, batch) for o in obj)
    if isinstance(obj, list):
        return [_slice(o, n, batch) for o in obj]
    if isinstance(obj, dict):
        return {k: _slice(v, n, batch) for k, v in obj.items()}
    return obj


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _scale(site: Site, linears: dict[str, nn.Module], up_sq: torch.Tensor | None, tokens: int):
    """The per-feature factor a site's values are scored with (None: plain |x|)."""
    if site.scale is None:
        return None
    if site.scale == "colnorm":
        sq = sum(weight_matrix(linears[name]).detach().float().pow(2).sum(0) for name in site.modules)
        return sq.sqrt().cpu()
    if site.scale == "up_rms":
        return (up_sq / max(tokens, 1)).sqrt().float().cpu()
    raise ValueError(site.scale)


class _Values:
    """Records a site's |values| (and, for CHESS, the up projection's mean square) over calibration batches."""

    def __init__(self, site: Site, modules: dict[str, nn.Module], stop: bool):
        self.site, self.parts, self.up_sq, self.tokens = site, [], None, 0
        self.handles = []
        target = modules[site.modules[0]]
        needs_up = site.scale == "up_rms"

        def record(x):
            flat = x.detach().reshape(-1, x.shape[-1]).abs().float().cpu()
            self.parts.append(flat)
            self.tokens += flat.shape[0]

        if site.kind == OUTPUT:
            def hook(module, args, out):
                record(out)
                if stop and not needs_up:
                    raise _Stop
            self.handles.append(target.register_forward_hook(hook))
        else:
            def pre(module, args):
                record(args[0])
                if stop:
                    raise _Stop
            self.handles.append(target.register_forward_pre_hook(pre))
        if needs_up:
            def up_hook(module, args, out):
                sq = out.detach().reshape(-1, out.shape[-1]).double().pow(2).sum(0).cpu()
                self.up_sq = sq if self.up_sq is None else self.up_sq + sq
                if stop:
                    raise _Stop
            self.handles.append(modules[site.up].register_forward_hook(up_hook))

    def remove(self):
        for h in self.handles:
            h.remove()

    def scores(self, linears) -> tuple[torch.Tensor, torch.Tensor | None]:
        values = torch.cat(self.parts)
        scale = _scale(self.site, linears, self.up_sq, self.tokens)
        return (values if scale is None else values * scale), scale


def _run(block: nn.Module, inputs: BlockInputs, indices=None) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for i in indices if indices is not None else range(len(inputs.args)):
            try:
                outs.append(block_output(block(*inputs.args[i], **inputs.kwargs[i])))
            except _Stop:
                pass
    return outs


def order_statistic(scores: torch.Tensor, sparsity: float) -> float:
    """The score t with floor-free round(sparsity * N) scores below it (0 for sparsity 0)."""
    flat = scores.reshape(-1)
    k = int(round(sparsity * flat.numel()))
    if k <= 0:
        return 0.0
    k = min(k, flat.numel() - 1)
    return float(torch.kthvalue(flat, k + 1).values)


def _threshold(t: float, scale: torch.Tensor | None) -> torch.Tensor:
    """A score threshold as a threshold on |x| (per feature when the score is scaled)."""
    if scale is None:
        return torch.tensor(t, dtype=torch.float32)
    out = torch.full_like(scale, math.inf) if t > 0 else torch.zeros_like(scale)
    positive = scale > 0
    out[positive] = t / scale[positive]
    return out.float()


def _greedy(block, inputs: BlockInputs, sites: list[Site], modules, linears, target: float, step: float,
            samples: int, max_level: float) -> list[float]:
    """TEAL's greedy allocation on one block: per-site sparsities whose byte-weighted mean is `target`."""
    recorders = [_Values(s, modules, stop=False) for s in sites]
    try:
        _run(block, inputs)
    finally:
        for r in recorders:
            r.remove()
    grids = []
    for r in recorders:
        scores, scale = r.scores(linears)
        grids.append((torch.sort(scores.reshape(-1)).values, scale))
        r.parts = []
    batch = _hidden(inputs.args[0], inputs.kwargs[0]).shape[0]
    n = min(samples, batch)
    g_args = [_slice(inputs.args[0], n, batch)]
    g_kwargs = [_slice(inputs.kwargs[0], n, batch)]
    probe = BlockInputs(g_args, g_kwargs)
    dense = _run(block, probe)[0]

    def error(levels: list[float]) -> float:
        attached = []
        try:
            for site, level, (sorted_scores, scale) in zip(sites, levels, grids):
                k = min(int(round(level * sorted_scores.numel())), sorted_scores.numel() - 1)
                t = float(sorted_scores[k]) if k > 0 else 0.0
                for name in site.modules:
                    attached.append(attach(modules[name], _threshold(t, scale), site.kind))
            out = _run(block, probe)[0]
        finally:
            for site in sites:
                for name in site.modules:
                    detach(modules[name])
        return float((out - dense).double().pow(2).sum())

    weights = [site_bytes(s, linears) for s in sites]
    total = sum(weights)
    levels = [0.0] * len(sites)
    current_err, reached = 0.0, 0.0
    while reached < target - 1e-12:
        best = None
        for i in range(len(sites)):
            if levels[i] >= max_level - 1e-12:
                continue
            trial = list(levels)
            trial[i] = min(max_level, levels[i] + step)
            added = (trial[i] - levels[i]) * weights[i] / total
            err = error(trial)
            cost = (err - current_err) / added
            if best is None or cost < best[0]:
                best = (cost, i, trial[i], err, added)
        if best is None:
            raise ConfigError(f"activation sparsity {target} cannot be reached with every site at most "
                              f"{max_level} sparse: ask for less")
        _, i, level, err, added = best
        if reached + added >= target - 1e-12:
            levels[i] += (target - reached) * total / weights[i]
            break
        levels[i], current_err, reached = level, err, reached + added
    return levels


def calibrate_thresholds(model: nn.Module, ids: torch.Tensor, method: str, sparsity: float, *,
                         allocation: str = "uniform", batch_size: int = 4, greedy_step: float = 0.1,
                         greedy_samples: int = 1, max_level: float = 0.95, device: torch.device | None = None,
                         progress: bool = True) -> Calibration:
    """Calibrate and install thresholds on `model` (see the module docstring); returns what was installed."""
    import time

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    spec = get_method(method)
    prefix, blocks = find_blocks(model)
    if len(blocks) == 1 and blocks[0] is model:
        raise ModelError("activation sparsity calibrates one transformer block at a time, and this model has no "
                         "ModuleList of blocks: pass a transformer language model")
    device = device or model_device(model)
    batches = list(ids.split(batch_size))
    inputs = capture_block_inputs(model, blocks[0], batches, device)
    modules = dict(model.named_modules())
    found = Calibration({}, {})
    for index in tqdm(range(len(blocks)), desc=f"calibrating {method} thresholds", disable=not progress,
                      unit="block"):
        block = blocks[index]
        home = model_device(block)
        block.to(device)
        layout = block_layout(block, _join(prefix, index), inputs.args[0], inputs.kwargs[0])
        sites = spec.sites(layout)
        if allocation == "greedy" and sparsity > 0:
            levels = _greedy(block, inputs, sites, modules, layout.linears, sparsity, greedy_step, greedy_samples,
                             max_level)
        else:
            levels = [sparsity] * len(sites)
        block_results = []
        for site, level in zip(sites, levels):  # in the order the block computes them
            recorder = _Values(site, modules, stop=True)
            try:
                _run(block, inputs)
            finally:
                recorder.remove()
            scores, scale = recorder.scores(layout.linears)
            threshold = _threshold(order_statistic(scores, level), scale)
            del scores, recorder
            for name in site.modules:
                attach(modules[name], threshold, site.kind)
                found.thresholds[name] = threshold
                found.sites[name] = site.kind
            block_results.append(SiteResult(index, site, float(level), threshold))
        with counting(_Sub(modules, [n for s in sites for n in s.modules])) as counter:
            outputs = _run(block, inputs)
        rates = counter.per_feature()
        measured = counter.result()
        for r in block_results:
            r.measured = measured.get(r.site.modules[0])
            r.skip_rate = rates.get(r.site.modules[0])
        found.results.extend(block_results)
        if index < len(blocks) - 1:
            inputs.replace_hidden(outputs)
        del outputs
        block.to(home)
    found.seconds = time.perf_counter() - t0
    return found


class _Sub(nn.Module):
    """A view of some modules of a model, so `counting` can be limited to one block's masks."""

    def __init__(self, modules: dict[str, nn.Module], names: list[str]):
        super().__init__()
        self._items = [(n, modules[n]) for n in dict.fromkeys(names)]

    def named_modules(self, *args, **kwargs):
        return iter(self._items)
