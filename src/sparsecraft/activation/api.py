"""activate(): calibrate thresholds on a model and install them; saving, loading and checking them; the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..models import weight_matrix
from .calibrate import Calibration, calibrate_thresholds
from .hooks import install, installed
from .recipe import ActivationRecipe
from .sites import INPUT, OUTPUT, short

THRESHOLDS_FILE = "activation/thresholds.safetensors"
METADATA_KEY = "activation"


@dataclass
class ActivationReport:
    recipe: dict
    sites: list[dict]  # one per calibrated site: block, key, kind, modules, target, measured
    bytes: dict  # per token: dense, nonzero (after weight pruning), skipped (by activation sparsity), read
    seconds: float
    module_sites: dict[str, str] = field(default_factory=dict)  # module name -> 'input' | 'output'
    features: dict[str, int] = field(default_factory=dict)  # module name -> features its threshold covers

    @property
    def target(self) -> float:
        """The byte-weighted sparsity over the calibrated sites (the recipe's, up to rounding)."""
        w = sum(s["bytes"] for s in self.sites)
        return sum(s["target"] * s["bytes"] for s in self.sites) / max(w, 1)

    @property
    def measured(self) -> float:
        """The byte-weighted sparsity the installed model produced on the calibration windows."""
        w = sum(s["bytes"] for s in self.sites)
        return sum((s["measured"] or 0.0) * s["bytes"] for s in self.sites) / max(w, 1)

    def per_projection(self) -> dict[str, float]:
        """Measured sparsity per projection kind (q_proj, ..., act_fn), mean over the blocks."""
        acc: dict[str, list[float]] = {}
        for s in self.sites:
            for m in s["modules"]:
                acc.setdefault(short(m), []).append(s["measured"] or 0.0)
        return {k: sum(v) / len(v) for k, v in acc.items()}

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "target": self.target, "measured": self.measured,
                "per_projection": self.per_projection(), "bytes": self.bytes, "seconds": self.seconds,
                "sites": self.sites, "module_sites": self.module_sites, "features": self.features}


def _skipped_bytes(model: nn.Module, found: Calibration) -> dict:
    """Weight bytes per token of the linear layers in the blocks: dense, their nonzeros (after weight pruning),
    those of the nonzeros that activation zeros let a kernel skip (per-feature zero rates on calibration data times
    the nonzeros of the weight columns / rows they gate), and what is left to read."""
    from ..evaluate import layer_sparsity

    modules = dict(model.named_modules())
    layers = layer_sparsity(model)
    dense = nonzero = 0
    for name, info in layers.items():
        w = weight_matrix(modules[name])
        dense += w.numel() * w.element_size()
        nonzero += (w.numel() - info["zeros"]) * w.element_size()
    skipped = 0.0
    for r in found.results:
        if r.skip_rate is None:
            continue
        rate = r.skip_rate.double().cpu()
        for name, what in r.site.skips:
            w = weight_matrix(modules[name]).detach()
            nnz = (w != 0).sum(0 if what == "columns" else 1).double().cpu()
            skipped += float((rate * nnz).sum()) * w.element_size()
    return {"dense": dense, "nonzero": nonzero, "skipped": skipped, "read": nonzero - skipped,
            "skipped_share_of_dense": skipped / max(dense, 1),
            "read_share_of_dense": (nonzero - skipped) / max(dense, 1)}


def activate(model: nn.Module | str, calibration="builtin", recipe: ActivationRecipe | dict | str | None = None, *,
             tokenizer=None, device: str | torch.device | None = None, progress: bool = True, **overrides
             ) -> tuple[nn.Module, ActivationReport]:
    """Calibrate activation thresholds on `model` (a module or a model spec) and install them (forward hooks, the
    weights are untouched). `calibration`: a data name, a text file, TextSplits or token ids [n, seqlen];
    `recipe` and keyword overrides (method=, sparsity=, allocation=, nsamples=, ...) as in ActivationRecipe."""
    from ..api import calibration_ids
    from ..models import check_context, load_model, resolve_device
    from ..recipe import Recipe

    recipe = ActivationRecipe.make(recipe, **overrides)
    if isinstance(model, (str, Path)):
        model, loaded = load_model(model)
        tokenizer = tokenizer or loaded
    if isinstance(calibration, torch.Tensor):
        check_context(model, calibration.shape[-1])
    else:
        check_context(model, recipe.seqlen)
    ids = calibration_ids(calibration, tokenizer, Recipe(nsamples=recipe.nsamples, seqlen=recipe.seqlen,
                                                         seed=recipe.seed))
    dev = resolve_device(device) if device is not None else None
    torch.manual_seed(recipe.seed)
    found = calibrate_thresholds(model, ids, recipe.method, recipe.sparsity, allocation=recipe.allocation,
                                 batch_size=recipe.batch_size, greedy_step=recipe.greedy_step,
                                 greedy_samples=recipe.greedy_samples, device=dev, progress=progress)
    install(model, found.thresholds, found.sites, recipe.policy)
    report = _report(model, found, recipe)
    model.sparsecraft_activation = report
    return model, report


def _report(model: nn.Module, found: Calibration, recipe: ActivationRecipe) -> ActivationReport:
    from .sites import site_bytes

    modules = dict(model.named_modules())
    sites = []
    for r in found.results:
        linears = {n: modules[n] for n, _ in r.site.skips}
        sites.append({"block": r.block, "key": r.site.key, "kind": r.site.kind, "modules": r.site.modules,
                      "target": r.target, "measured": r.measured, "bytes": site_bytes(r.site, linears),
                      "per_channel": r.threshold.dim() > 0})
    features = {n: r.site.features for r in found.results for n in r.site.modules}
    return ActivationReport(recipe.to_dict(), sites, _skipped_bytes(model, found), found.seconds,
                            dict(found.sites), features)


def thresholds_bytes(thresholds: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().float().contiguous() for k, v in thresholds.items()})


def save_activation(model: nn.Module, path: str | Path, *, tokenizer=None, source: str | None = None,
                    evaluation: dict | None = None, force: bool = False, base_metadata: dict | None = None,
                    files: dict | None = None) -> Path:
    """Write the model (weights unchanged: a plain transformers load gives the dense model) with its installed
    thresholds in activation/thresholds.safetensors and the report under 'activation' in sparsecraft.json."""
    from .._version import __version__
    from ..checkpoint import save_model

    report: ActivationReport | None = getattr(model, "sparsecraft_activation", None)
    thresholds = installed(model)
    if not thresholds or report is None:
        raise ConfigError("the model has no activation thresholds installed: run sparsecraft.activate first")
    metadata = dict(base_metadata or {})
    metadata.update({"sparsecraft_version": __version__, "source_model": source or metadata.get("source_model")})
    act = report.to_dict()
    if evaluation is not None:
        act["evaluation"] = evaluation
    metadata[METADATA_KEY] = act
    extra = dict(files or {})
    extra[THRESHOLDS_FILE] = thresholds_bytes(thresholds)
    from .hooks import remove

    remove(model)  # saved without hooks in the way of save_pretrained; put back after
    try:
        return save_model(model, path, tokenizer=tokenizer, metadata=metadata, force=force, files=extra)
    finally:
        install(model, thresholds, report.module_sites, report.recipe.get("policy", "all"))


def read_thresholds(path: str | Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(thresholds, the 'activation' metadata) stored in a model directory, or None when it has none."""
    from ..checkpoint import METADATA_FILE, read_metadata

    path = Path(path)
    file = path / THRESHOLDS_FILE
    meta = read_metadata(path).get(METADATA_KEY) if path.is_dir() else None
    if not file.is_file() and meta is None:
        return None
    if not file.is_file():
        raise ModelError(f"{path / METADATA_FILE} describes activation thresholds but {file} is missing: copy the "
                         "whole directory, or run sparsecraft activate again")
    if not isinstance(meta, dict) or not isinstance(meta.get("module_sites"), dict):
        raise ModelError(f"{file} has no matching 'activation' entry (with module_sites) in {METADATA_FILE}: the "
                         "directory was damaged; run sparsecraft activate again")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        thresholds = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"cannot read {file} ({type(exc).__name__}): the file is incomplete or corrupt; run "
                         "sparsecraft activate again") from None
    return thresholds, meta


def check_thresholds(model: nn.Module, thresholds: dict[str, torch.Tensor], sites: dict, where: str = "thresholds",
                     features: dict | None = None) -> None:
    """Refuse thresholds that do not fit `model`: unknown module names, a site kind on the wrong module, a shape
    that is neither a scalar nor one value per feature, NaN or negative values."""
    modules = dict(model.named_modules())
    fix = "they were calibrated for another model: run sparsecraft activate on this one"
    if set(thresholds) != set(sites):
        odd = sorted(set(thresholds) ^ set(sites))[0]
        raise ModelError(f"{where}: the thresholds and their site list disagree about {odd!r}: the directory was "
                         "damaged; run sparsecraft activate again")
    for name, t in thresholds.items():
        module = modules.get(name)
        if module is None:
            raise ModelError(f"{where}: the model has no module {name!r}: {fix}")
        kind = sites[name]
        if kind not in (INPUT, OUTPUT):
            raise ModelError(f"{where}: {name!r} has site kind {kind!r}, not 'input' or 'output': run "
                             "sparsecraft activate again")
        if kind == INPUT:
            if not hasattr(module, "weight"):
                raise ModelError(f"{where}: {name!r} is a {type(module).__name__}, not a linear layer: {fix}")
            n = weight_matrix(module).shape[1]
        else:
            n = (features or {}).get(name)
        if t.dim() > 1 or (t.dim() == 1 and n is not None and t.shape[0] != n):
            raise ModelError(f"{where}: threshold of {name!r} has shape {tuple(t.shape)}, but the layer has {n} "
                             f"input features: {fix}")
        if not torch.all(t >= 0):
            raise ModelError(f"{where}: threshold of {name!r} holds negative or NaN values: the file was damaged; "
                             "run sparsecraft activate again")


def install_saved(model: nn.Module, path: str | Path) -> ActivationReport | None:
    """Install the thresholds stored in the model directory `path` (if any) on `model`, after checking that they
    fit it; returns the stored report."""
    stored = read_thresholds(path)
    if stored is None:
        return None
    thresholds, meta = stored
    check_thresholds(model, thresholds, meta["module_sites"], where=str(Path(path) / THRESHOLDS_FILE),
                     features=meta.get("features"))
    report = ActivationReport(meta.get("recipe", {}), meta.get("sites", []), meta.get("bytes", {}),
                              meta.get("seconds", 0.0), dict(meta["module_sites"]), dict(meta.get("features", {})))
    install(model, thresholds, report.module_sites, report.recipe.get("policy", "all"))
    model.sparsecraft_activation = report
    return report

