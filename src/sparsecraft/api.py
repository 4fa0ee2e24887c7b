"""Public entry points: prune(), evaluate(), save(), load()."""

from __future__ import annotations

import resource
from pathlib import Path

import torch
from torch import nn

from ._version import __version__
from .checkpoint import METADATA_FILE, RECIPE_FILE, read_metadata, save_model
from .data import (
    MixedSplits,
    TextSplits,
    calibration_batch,
    evaluation_windows,
    load_text,
    mix_record,
    mixed_calibration_batch,
    tokenize,
)
from .errors import ConfigError, DataError
from .evaluate import layer_sparsity, overall_sparsity, perplexity
from .models import check_causal, check_context, find_blocks, load_model
from .moe import experts_split
from .pruning import PruneReport, prune_model
from .recipe import Recipe


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_recipe(recipe: Recipe | dict | str | Path | None = None, **overrides) -> Recipe:
    """A Recipe from a Recipe, a dict or a YAML path, with keyword overrides applied."""
    return Recipe.make(recipe, **overrides)


def _splits(data: str | Path | TextSplits) -> TextSplits:
    return data if isinstance(data, TextSplits) else load_text(data)


def calibration_ids(data: str | Path | TextSplits | torch.Tensor, tokenizer, recipe: Recipe) -> torch.Tensor:
    """[nsamples, seqlen] token ids drawn (seeded) from the calibration part of `data` (of each source in
    proportion, for a mix: `data.mixed_calibration_batch`)."""
    if isinstance(data, torch.Tensor):
        if data.ndim != 2 or data.dtype not in (torch.int64, torch.int32):
            raise DataError(f"calibration ids must be an integer tensor [nsamples, seqlen], got {tuple(data.shape)} "
                            f"{data.dtype}")
        return data.long()
    splits = _splits(data)
    if isinstance(splits, MixedSplits):
        return mixed_calibration_batch(splits, tokenizer, recipe.nsamples, recipe.seqlen, recipe.seed)
    tokens = tokenize(tokenizer, splits.calibration)
    return calibration_batch(tokens, recipe.nsamples, recipe.seqlen, recipe.seed)


def prune(model: nn.Module | str, calibration="builtin", recipe: Recipe | dict | str | Path | None = None, *,
          tokenizer=None, device: str | None = None, progress: bool = True, **overrides
          ) -> tuple[nn.Module, PruneReport]:
    """Prune `model` in place (a module, or a spec such as 'default' to load) and return it with a report.

    `calibration`: 'builtin', 'wikitext2', 'c4', a text-file path, several of them ('builtin,licenses',
    'builtin:0.7,licenses:0.3': windows from each in proportion), TextSplits, or token ids [n, seqlen].
    `recipe` and keyword overrides (method=, sparsity=, pattern=, nsamples=, ...) describe the run.
    """
    recipe = make_recipe(recipe, **overrides)
    if isinstance(model, (str, Path)):
        model, loaded_tok = load_model(model)
        tokenizer = tokenizer or loaded_tok
    with experts_split(model):  # fused MoE experts as one linear layer per expert, for the search too
        report = _prune(model, calibration, recipe, tokenizer, device, progress)
    return model, report


def _prune(model: nn.Module, calibration, recipe: Recipe, tokenizer, device, progress: bool) -> PruneReport:
    ids = tokens = mix = None
    if recipe.needs_data:
        check_context(model, calibration.shape[-1] if isinstance(calibration, torch.Tensor) else recipe.seqlen)
        check_causal(model, "calibration statistics are drawn as for next-token prediction, which it does not do",
                     error=False)
    if recipe.needs_data and isinstance(calibration, torch.Tensor):
        ids = calibration_ids(calibration, tokenizer, recipe)
    elif recipe.needs_data:
        splits = _splits(calibration)
        calibration_text = splits.calibration
        if isinstance(splits, MixedSplits):  # windows from each source in proportion to its weight
            mix = (splits, [tokenize(tokenizer, s.calibration) for s in splits.sources])
            ids = mixed_calibration_batch(splits, tokenizer, recipe.nsamples, recipe.seqlen, recipe.seed,
                                          tokens=mix[1])
        else:
            tokens = tokenize(tokenizer, calibration_text)
            ids = calibration_batch(tokens, recipe.nsamples, recipe.seqlen, recipe.seed)
    search = None
    if recipe.allocation == "search":
        recipe, search = _search(model, tokens, ids, recipe, device, progress, tokenizer,
                                 calibration_text if tokens is not None or mix is not None else None, mix=mix)
    torch.manual_seed(recipe.seed)
    report = prune_model(model, ids, recipe, device=device, progress=progress)
    if search is not None:
        report.seconds += search["seconds"]
        report.search = search
    return report


def _search(model, tokens, ids, recipe: Recipe, device, progress: bool, tokenizer=None,
            calibration_text: str | None = None, mix=None) -> tuple[Recipe, dict]:
    """allocation=search: find per-block sparsities (search.py) and return the recipe that replays them
    (uniform allocation + overrides), with a summary of the search. Candidates are scored on windows drawn with
    seed + 1 from `search_fitness_data`'s calibration part when the recipe names one (the validation domain, so the
    search does not overfit the calibration windows), else from the calibration text, or, when only token ids were
    given, on the first calibration windows. `mix`: (MixedSplits, each source's calibration tokens) when the
    calibration is a mix: the fitness windows are then drawn from each source in proportion too."""
    from .search import fitness_windows, parse_budget, search_levels, searched_recipe

    budget = parse_budget(recipe.search_budget)
    if recipe.search_fitness_data is not None:
        windows = fitness_windows(tokenizer, recipe, calibration_text)
    elif mix is not None:
        windows = mixed_calibration_batch(mix[0], tokenizer, recipe.search_fitness_samples, recipe.seqlen,
                                          recipe.seed + 1, every_source=False, tokens=mix[1])
    elif tokens is None:
        windows = ids[:recipe.search_fitness_samples]
    else:
        windows = calibration_batch(tokens, recipe.search_fitness_samples, recipe.seqlen, recipe.seed + 1)
    result = search_levels(model, ids, windows, recipe, budget, step=recipe.search_step,
                           max_steps=recipe.search_max_steps, offspring=recipe.search_offspring, device=device,
                           progress=progress)
    summary = {"budget_s": budget, "seconds": result.seconds, "generations": result.generations,
               "evaluations": result.evaluations, "kl": result.fitness, "uniform_kl": result.uniform_fitness,
               "levels": {str(k): v for k, v in result.levels.items()}, "history": result.history}
    return searched_recipe(recipe, result, find_blocks(model)[0]), summary


def evaluate(model: nn.Module, data="builtin", *, tokenizer=None, seqlen: int = 512, batch_size: int = 4,
             max_windows: int | None = None, progress: bool = True) -> dict:
    """Held-out perplexity over non-overlapping windows of `data`'s evaluation part, plus sparsity."""
    is_ids = isinstance(data, torch.Tensor)
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ConfigError(f"evaluation seqlen must be an integer >= 2, got {seqlen!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"evaluation batch size must be an integer >= 1 (--eval-batch-size), got {batch_size!r}")
    check_context(model, seqlen)
    check_causal(model, "its perplexity would score predictions made from the tokens they predict")
    tokens = data.reshape(-1) if is_ids else tokenize(tokenizer, _splits(data).evaluation)
    windows = evaluation_windows(tokens, seqlen)
    if max_windows is not None:
        if max_windows < 1:
            raise ConfigError(f"max_windows must be >= 1, got {max_windows}")
        windows = windows[:max_windows]
    layers = layer_sparsity(model)
    return {
        "perplexity": perplexity(model, windows, batch_size=batch_size, progress=progress),
        "data": "tokens" if is_ids else str(getattr(data, "name", data)),
        "seqlen": seqlen,
        "windows": int(windows.shape[0]),
        "tokens": int(windows.numel()),
        "sparsity": overall_sparsity(layers),
        "layers": layers,
    }


def save(model: nn.Module, path: str | Path, *, tokenizer=None, report: PruneReport | None = None,
         evaluation: dict | None = None, source: str | None = None, force: bool = False,
         extra: dict | None = None) -> Path:
    """Write a `save_pretrained` directory (safetensors) plus sparsecraft.json and, when a report is given,
    recipe.yaml (the recipe that made it, for `prune --recipe`), atomically."""
    metadata = {"sparsecraft_version": __version__, "source_model": source}
    if report is not None:
        metadata.update(report.to_dict())
    if evaluation is not None:
        metadata["evaluation"] = evaluation
    metadata.update(extra or {})
    if report is not None and "calibration" not in metadata:
        try:
            mix = mix_record(report.recipe.get("data", "builtin"), report.recipe.get("nsamples", 64))
        except DataError:  # a recipe whose data was never read (token ids given): nothing to record
            mix = None
        if mix is not None and Recipe.from_dict(report.recipe).needs_data:
            metadata["calibration"] = mix  # what each source contributed: weight and calibration windows
    files = {RECIPE_FILE: Recipe.from_dict(report.recipe).to_yaml_text()} if report is not None else {}
    return save_model(model, path, tokenizer=tokenizer, metadata=metadata, force=force, files=files)


def load(path: str | Path, dtype: str | torch.dtype | None = None, kernels: bool | None = None) -> nn.Module:
    """Load a model saved by `save` (or any model spec `load_model` accepts); metadata in `.sparsecraft`.

    `kernels`: run the linear layers on sparsecraft's CPU sparse kernels (`sparsecraft.kernels.SparseLinear`;
    sparse layers packed as bitmask + values). None (default): yes for compressed-tensors directories when the
    kernels are built (with a warning when they are not), no otherwise. The model's state_dict is unchanged.
    A directory exported with int8 values (`export(..., dtype="int8")`) runs its int8 layers from the stored int8
    values and scales on the kernels, and its layers left dense (lm_head) as int8 too (quantized at load, per row,
    like the others; the embedding keeps its dtype); without kernels it is the dequantized dense model.
    """
    model, tokenizer = load_model(path, dtype=dtype)
    model.sparsecraft = read_metadata(path) if Path(path).is_dir() else {}
    model.tokenizer = tokenizer
    _kernels_hook(model, path, kernels)
    if Path(path).is_dir():
        from .activation import install_saved

        install_saved(model, path)  # activation-sparsity thresholds stored with the model, if any
        from .kernels.linear import SparseLinear

        if any(isinstance(m, SparseLinear) for m in model.modules()):
            from .kernels.colskip import apply_column_skip

            apply_column_skip(model)  # on the kernels: thresholded dense layers skip the weight rows x drops
    return model


def _kernels_hook(model: nn.Module, path: str | Path, kernels: bool | None) -> None:
    """After loading: swap linear layers for SparseLinear when asked (or by default for compressed directories)."""
    from . import kernels as sk
    from .compressed import is_compressed_dir, value_dtype

    compressed = Path(path).is_dir() and is_compressed_dir(path)
    int8 = compressed and value_dtype(path) == "int8" and (kernels or (kernels is None and sk.available()))
    if int8:
        sk.sparsify_compressed(model, path)  # int8 layers straight from the stored values and scales
        # and the layers left dense (lm_head) int8 too, as llama.cpp's Q8_0 has them; the embedding stays
        sk.sparsify_model(model, quantize="int8", quantize_dense=True)
    elif kernels:
        sk.sparsify_model(model)
    elif kernels is None and compressed:
        sk.sparsify_if_available(model)


def export(src: str | Path, out: str | Path, format: str = "bitmask", *, force: bool = False,
           dtype: str | None = None):
    """Write the model directory `src` to `out` in a compressed-tensors sparse format: 'bitmask' (sparse-bitmask,
    any sparsity) or '2:4' (sparse-24-bitmask). `load` reads it back bit for bit. `dtype="int8"` (bitmask only)
    stores int8 values with a float32 scale per output row (sparsecraft.quantize); a float dtype casts the model
    first. Returns an ExportReport."""
    from .compressed import export as _export

    return _export(src, out, format, force=force, dtype=dtype)


__all__ = ["METADATA_FILE", "calibration_ids", "evaluate", "export", "load", "make_recipe", "peak_rss_mb", "prune",
           "save"]
