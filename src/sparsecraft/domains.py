"""Evaluation on more than one text domain: the calibration source's held-out split, and out-of-domain texts.

A pruner that fits its calibration text hardest looks best on held-out sections of that same text; what users run
is other text. So every perplexity sparsecraft reports comes from several sources:

* the calibration source's held-out split (``builtin`` by default: CPython's documentation), and
* each ``--eval-data`` source (a name `data.load_text` knows, or a text file / .jsonl / directory), by default
  ``licenses`` (Debian's /usr/share/common-licenses, which base-files ships on every Debian system: legal prose,
  not documentation).

Each source is evaluated on its own held-out split (every fifth section, as for calibration sources), and any
paragraph of it that also occurs in the calibration text is dropped, so no evaluation text is ever calibration
text (`disjoint_from`). The report gives each source's perplexity and their geometric mean, the figure recipes are
ranked by.

A calibration mix (``--data builtin,licenses``, data.MixedSplits) is evaluated on each of its sources' own held-out
splits, in the order given (each made disjoint from the whole mix's calibration text), then the ``--eval-data``
sources that are not in the mix.

A third source, ``manpages`` (section 7 of the Linux man pages, Debian's ``manpages`` package), is the
*validation* domain: the refinement settings (refit's ridge/shrinkage/iterations, refine/refit.py) and the search's
fitness (``search_fitness_data``) are chosen on it, so that neither the calibration text nor the test texts
(held-out split, licenses) pick them.
"""

from __future__ import annotations

import math
import warnings

from .data import MixedSplits, TextSplits, load_text
from .errors import DataError

DEFAULT_EVAL_DATA = ("licenses",)
VALIDATION_DATA = "manpages"  # what refinement defaults are chosen on: neither calibration nor test text


def eval_specs(eval_data: str | list[str] | tuple[str, ...] | None, calibration: str = "builtin") -> list[str]:
    """The sources to evaluate on: `calibration` first, then each of `eval_data` (None: DEFAULT_EVAL_DATA; entries
    may be comma-separated lists; 'none': no other source), each once, in order."""
    items = DEFAULT_EVAL_DATA if eval_data is None else [eval_data] if isinstance(eval_data, str) else eval_data
    specs = [str(calibration)]
    for item in items:
        for spec in str(item).split(","):
            spec = spec.strip()
            if not spec:
                raise DataError(f"--eval-data has an empty entry in {item!r}: give names or paths separated by "
                                "commas")
            if spec == "none":
                continue
            if spec not in specs:
                specs.append(spec)
    return specs


def windows_for(sources: list[TextSplits], tokenizer, seqlen: int, max_windows: int | None = None) -> dict:
    """{source name: [count, seqlen] evaluation windows} (for loops that score many models on the same text)."""
    from .data import evaluation_windows, tokenize

    out = {}
    for splits in sources:
        windows = evaluation_windows(tokenize(tokenizer, splits.evaluation), seqlen)
        out[splits.name] = windows if max_windows is None else windows[:max_windows]
    return out


def _paragraph_keys(text: str) -> set[str]:
    return {" ".join(p.split()) for p in text.split("\n\n") if p.strip()}


def disjoint_from(splits: TextSplits, calibration_text: str) -> TextSplits:
    """`splits` with every evaluation paragraph that also occurs in `calibration_text` removed."""
    seen = _paragraph_keys(calibration_text)
    kept = [p for p in splits.evaluation.split("\n\n") if p.strip() and " ".join(p.split()) not in seen]
    if not kept:
        raise DataError(f"every evaluation paragraph of {splits.name} also occurs in the calibration text: pass "
                        "another --eval-data text")
    return TextSplits(splits.name, splits.calibration, "\n\n".join(kept))


def load_sources(specs: list[str], calibration: TextSplits | None = None, *,
                 defaults_optional: bool = True) -> list[TextSplits]:
    """Load each evaluation source, made disjoint from `calibration`'s calibration text (default: the first
    source's). A default out-of-domain source that is missing here (a non-Debian system) is skipped with a warning
    when `defaults_optional`; any other failure is the source's one-line DataError. A mix as the first source
    (MixedSplits) stands for its sources, each evaluated on its own held-out split; a later spec that is one of them
    is not evaluated twice."""
    out: list[TextSplits] = []
    skip: set[str] = set()
    for i, spec in enumerate(specs):
        if i > 0 and spec in skip:
            continue
        try:
            splits = calibration if i == 0 and calibration is not None else load_text(spec)
        except DataError as exc:
            if defaults_optional and i > 0 and spec in DEFAULT_EVAL_DATA:
                warnings.warn(f"no out-of-domain evaluation text: {exc}", UserWarning, stacklevel=2)
                continue
            raise
        if i == 0 and isinstance(splits, MixedSplits):
            skip = set(splits.specs) | {s.name for s in splits.sources}
        if i > 0 and splits.name in skip:
            continue
        out.append(splits)
    calib_text = (calibration or out[0]).calibration
    if isinstance(out[0], MixedSplits):
        return [disjoint_from(s, calib_text) for s in (*out[0].sources, *out[1:])]
    return [out[0]] + [disjoint_from(s, calib_text) for s in out[1:]]


def geometric_mean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def evaluate_domains(model, sources: list[TextSplits], *, tokenizer=None, seqlen: int = 512, batch_size: int = 4,
                     max_windows: int | None = None, progress: bool = True) -> dict:
    """Perplexity on each source's held-out split: {'perplexity' (the first source's), 'domains' {name:
    {'perplexity', 'windows', 'tokens'}}, 'geomean', 'sparsity', 'layers', ...} (sparsecraft.evaluate's keys for
    the first source, plus 'domains' and 'geomean')."""
    from .api import evaluate
    from .evaluate import perplexity

    # the first source through sparsecraft.evaluate (its checks, the sparsity accounting); the others need only
    # their windows scored
    first = dict(evaluate(model, sources[0], tokenizer=tokenizer, seqlen=seqlen, batch_size=batch_size,
                          max_windows=max_windows, progress=progress))
    domains = {sources[0].name: {k: first[k] for k in ("perplexity", "windows", "tokens")}}
    for name, windows in windows_for(sources[1:], tokenizer, seqlen, max_windows).items():
        domains[name] = {"perplexity": perplexity(model, windows, batch_size=batch_size, progress=progress),
                         "windows": int(windows.shape[0]), "tokens": int(windows.numel())}
    first["domains"] = domains
    first["geomean"] = geometric_mean(d["perplexity"] for d in domains.values())
    return first
