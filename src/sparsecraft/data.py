"""Calibration and evaluation text: the built-in corpus, plain text files, local HF datasets.

Every source is split into a calibration part and a disjoint evaluation part:
- ``builtin``: CPython's ``pydoc_data.topics`` (real English documentation prose). Topics are sorted by
  key, cut at paragraph boundaries into sections of about 2,000 characters (a section never spans two
  topics), and every fifth section (index % 5 == 4) is held out for evaluation: about 20% of the text,
  drawn from across the whole corpus, none of it ever seen in calibration.
- a text file: the same, treating the file as one document (lines instead of paragraphs when it has
  no blank lines, and whitespace inside a line longer than a section); a file too small for five sections is
  used whole for both parts (with a warning). A ``.jsonl`` file is one document per line (its ``text`` field);
  a directory is one document per ``*.txt`` / ``*.jsonl`` file in it, sorted by name.
- ``licenses``: Debian's license texts, ``/usr/share/common-licenses`` (package ``base-files``, present on every
  Debian/Ubuntu system; GPL, LGPL, GFDL, Apache, MPL, Artistic, BSD, CC0): legal English prose from another domain
  than the built-in corpus, the default out-of-domain evaluation text (sparsecraft.domains). One document per
  file (symlinks to the same file read once), paragraphs already seen in an earlier file dropped (license versions
  repeat each other), the same every-fifth-section held-out split.
- ``manpages``: section 7 (overviews, conventions) of the Linux man-pages project, as Debian's ``manpages`` package
  installs it (``apt-get install manpages``; its file list in /var/lib/dpkg/info/manpages.list), the roff source
  read as plain text (tables and code examples dropped): systems prose, the validation domain that refinement
  settings are chosen on (neither the calibration text nor the out-of-domain test text).
- ``wikitext2``: the train split for calibration, the test split for evaluation (as in the papers).
- ``c4``: the first shard of the train split for calibration, validation for evaluation.
- several sources at once, ``builtin,licenses`` or with mix weights ``builtin:0.7,licenses:0.3`` (`MixedSplits`):
  calibration windows come from each source in proportion to its weight, and evaluation reports each source's own
  held-out split (see `parse_mix` for the rule that tells a weight from a path).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from .errors import ConfigError, DataError

HOLDOUT_EVERY = 5
SECTION_CHARS = 2000


@dataclass(frozen=True)
class TextSplits:
    name: str
    calibration: str
    evaluation: str


def _cut_long(part: str, size: int) -> list[str]:
    """A paragraph or line longer than eight sections (a text file written as one line, say), cut at whitespace into
    pieces of about `size` characters; anything shorter stays whole, as real paragraphs do."""
    if len(part) <= 8 * size:
        return [part]
    pieces, start = [], 0
    while len(part) - start > 2 * size:
        cut = part.rfind(" ", start + size // 2, start + size)
        cut = cut if cut > start else start + size  # no space: cut mid-word
        pieces.append(part[start:cut])
        start = cut + (part[cut:cut + 1] == " ")
    pieces.append(part[start:])
    return [p for p in pieces if p.strip()]


def sections(text: str, size: int = SECTION_CHARS) -> list[str]:
    """Cut `text` into consecutive pieces of about `size` characters at paragraph (else line, else whitespace)
    breaks."""
    sep = "\n\n" if "\n\n" in text else "\n"
    pieces, current = [], []
    for part in (p for p in text.split(sep) if p.strip()):
        cut = _cut_long(part, size)
        if len(cut) > 1:  # a long line on its own: its pieces are sections, whitespace kept inside each
            if current:
                pieces.append(sep.join(current))
                current = []
            pieces.extend(cut)
            continue
        current.append(part)
        if sum(len(c) for c in current) >= size:
            pieces.append(sep.join(current))
            current = []
    if current:
        pieces.append(sep.join(current))
    return pieces


def split_documents(name: str, docs: list[str]) -> TextSplits:
    """Hold out every fifth ~2k-character section of `docs` for evaluation."""
    parts = [piece for doc in docs for piece in sections(doc)]
    if not parts:
        raise DataError(f"{name} holds no text")
    if len(parts) < HOLDOUT_EVERY:
        warnings.warn(f"{name} is too small to hold text out ({len(parts)} sections of ~{SECTION_CHARS} characters, "
                      f"fewer than {HOLDOUT_EVERY}): it is used whole for calibration and evaluation, so evaluation "
                      "sees calibration text", UserWarning, stacklevel=2)
        whole = "\n\n".join(parts)
        return TextSplits(name, whole, whole)
    held = [p for i, p in enumerate(parts) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    # Documents can repeat each other's paragraphs (CPython's topics nest sections): drop from calibration
    # every paragraph that is also held out, so that no evaluation text is ever seen in calibration.
    held_paragraphs = {q.strip() for p in held for q in p.split("\n\n")}
    calib = ["\n\n".join(q for q in p.split("\n\n") if q.strip() not in held_paragraphs)
             for i, p in enumerate(parts) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    return TextSplits(name, "\n\n".join(c for c in calib if c.strip()), "\n\n".join(held))


def builtin_splits() -> TextSplits:
    from pydoc_data.topics import topics

    return split_documents("builtin", [topics[key].strip() for key in sorted(topics)])


LICENSES_DIR = Path("/usr/share/common-licenses")


def license_splits(directory: Path | None = None) -> TextSplits:
    directory = LICENSES_DIR if directory is None else directory
    if not directory.is_dir():
        raise DataError(f"{directory} does not exist (Debian's base-files package ships it): install base-files, "
                        "or pass another out-of-domain text with --eval-data path/to/text.txt")
    files = sorted({p.resolve() for p in directory.iterdir() if p.is_file()})
    seen: set[str] = set()
    docs = []
    for path in files:
        kept = []
        for paragraph in _read_text(path).split("\n\n"):
            key = " ".join(paragraph.split())
            if key and key not in seen:
                seen.add(key)
                kept.append(paragraph.strip("\n"))
        if kept:
            docs.append("\n\n".join(kept))
    if not docs:
        raise DataError(f"{directory} holds no text: pass another out-of-domain text with --eval-data")
    return split_documents("licenses", docs)


MANPAGES_LIST = Path("/var/lib/dpkg/info/manpages.list")
_ROFF_CHARS = {"em": "\u2014", "en": "\u2013", "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d", "oq": "\u2018",
               "cq": "\u2019", "bu": "\u2022", "co": "\u00a9", "mu": "\u00d7", "rg": "\u00ae", "hy": "-",
               "ti": "~", "ha": "^", "rs": "\\", "<=": "\u2264", ">=": "\u2265", "->": "\u2192", "de": "\u00b0"}
_ROFF_ESCAPE = re.compile(r"\\(?:f(?:\[[^\]]*\]|\(..|.)|\((..)|\[([^\]]*)\]|\*(?:\[[^\]]*\]|\(..|.)"
                          r"|s[+-]?\d|[&|^c%:]|(.))")
_ROFF_SKIP = {"TS": "TE", "EX": "EE"}  # tables and code examples: not prose
_ROFF_BREAK = {"SH", "SS", "PP", "LP", "P", "TP", "IP", "HP", "sp", "TQ"}
_ROFF_ALTERNATE = {"BR", "RB", "IR", "RI", "BI", "IB"}


def _roff_unescape(text: str) -> str:
    def one(m: re.Match) -> str:
        named = m.group(1) or m.group(2)
        if named is not None:
            return _ROFF_CHARS.get(named, "")
        plain = m.group(3)
        if plain is None:
            return ""
        return {"-": "-", "e": "\\", "~": " ", " ": " ", "0": " ", "'": "'", "`": "`", ".": "."}.get(plain, "")
    return _ROFF_ESCAPE.sub(one, text)


def roff_text(source: str) -> str:
    """A man page's roff source as plain paragraphs: requests dropped (section headings and font macros keep
    their words), escapes resolved, tables and code examples left out."""
    import shlex

    paragraphs: list[str] = []
    current: list[str] = []
    until = None

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for line in source.split("\n"):
        if until is not None:
            until = None if line.startswith(("." + until, "'" + until)) else until
            continue
        if line.startswith((".\\\"", "'\\\"", '.\\"')) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            name, _, rest = line[1:].strip().partition(" ")
            if name in _ROFF_SKIP:
                until = _ROFF_SKIP[name]
                continue
            if name == "so":  # a page that only points to another
                return ""
            try:
                args = shlex.split(rest.replace("\\\"", "\x00"), posix=True)
            except ValueError:
                args = rest.split()
            args = [a.replace("\x00", '"') for a in args]
            if name in _ROFF_BREAK:
                flush()
                if name in ("SH", "SS") and args:
                    paragraphs.append(_roff_unescape(" ".join(args)).strip())
                continue
            if name in ("B", "I", "SM", "SB"):
                text = " ".join(args)
            elif name in _ROFF_ALTERNATE:
                text = "".join(args)
            else:
                continue
        else:
            text = line
        text = _roff_unescape(text).strip()
        if text:
            current.append(text)
    flush()
    return "\n\n".join(p for p in paragraphs if p)


def manpage_splits(listing: Path | None = None) -> TextSplits:
    import gzip

    listing = MANPAGES_LIST if listing is None else listing
    if not listing.is_file():
        raise DataError(f"{listing} does not exist: install Debian's man pages (apt-get install manpages), or pass "
                        "another validation text (a file)")
    paths = sorted({Path(p).resolve() for p in listing.read_text().split() if re.search(r"/man7/[^/]+\.7(\.gz)?$", p)})
    docs = []
    for path in paths:
        if not path.is_file():
            continue
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = roff_text(raw.decode("utf-8", errors="replace"))
        if text.strip():
            docs.append(text)
    if not docs:
        raise DataError(f"{listing} lists no section-7 man pages on disk: reinstall manpages (apt-get install "
                        "--reinstall manpages)")
    return split_documents("manpages", docs)


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading byte-order mark is not text
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text: pass a plain text file") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _jsonl_documents(path: Path) -> list[str]:
    """The `text` field of every line of a JSON-lines file."""
    import json

    docs = []
    for number, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number} is not JSON ({exc.msg}): a .jsonl file holds one JSON object "
                            "per line, with a 'text' field") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path} line {number} has no string 'text' field: a .jsonl file holds one JSON object "
                            "per line, with a 'text' field")
        docs.append(record["text"])
    return docs


def _documents(path: Path) -> list[str]:
    return _jsonl_documents(path) if path.suffix.lower() == ".jsonl" else [_read_text(path)]


def file_splits(path: Path) -> TextSplits:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".txt", ".jsonl"))
        if not files:
            raise DataError(f"directory {path} holds no .txt or .jsonl files: pass a text file or a directory of them")
        docs = [doc for f in files for doc in _documents(f)]
    elif not path.is_file():
        raise DataError(f"text file {path} does not exist")
    else:
        docs = _documents(path)
    if not any(doc.strip() for doc in docs):
        raise DataError(f"text file {path} is empty")
    check_printable(str(path), docs)
    return split_documents(str(path), docs)


NONPRINTABLE_ERROR = 0.25  # a fraction of the non-whitespace characters: above it, the text is refused
NONPRINTABLE_WARNING = 0.02  # ... above this, a warning


def check_printable(name: str, docs: list[str], sample: int = 1_000_000) -> None:
    """Text that is mostly control characters (a file of NUL bytes, a binary file that happens to be UTF-8) would
    calibrate and evaluate on noise: refuse it, and warn when a noticeable part of it is such characters."""
    text = "".join(docs)
    if len(text) > sample:  # an even sample of the whole text
        text = text[:: len(text) // sample]
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return
    bad = sum(not c.isprintable() for c in chars)
    fraction = bad / len(chars)
    if fraction > NONPRINTABLE_ERROR:
        raise DataError(f"{name} is not text: {fraction:.0%} of its characters are control characters (NUL and the "
                        "like); pass a natural-language text file")
    if fraction > NONPRINTABLE_WARNING:
        warnings.warn(f"{name}: {fraction:.1%} of its characters are control characters; calibration and "
                      "evaluation read them as text", UserWarning, stacklevel=3)


_HF_DATASETS = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {}, "train", "test", "text", "\n\n"),
    "c4": (("allenai/c4",), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz",
                                             "validation": "en/c4-validation.00000-of-00008.json.gz"}},
           "train", "validation", "text", "\n\n"),
}


def hf_splits(name: str) -> TextSplits:
    args, kwargs, calib_split, eval_split, column, joiner = _HF_DATASETS[name]
    from .tasks import offline  # the env variables and the flags datasets / the hub read them into at import

    with offline():  # never wait on a network that is not there
        try:
            import datasets
        except ImportError:
            raise DataError(
                f"dataset {name!r} needs the `datasets` package (pip install datasets) and a local copy of the "
                "data; or use --data builtin or --data path/to/text.txt"
            ) from None
        try:
            ds = datasets.load_dataset(*args, **kwargs)
        except Exception as exc:  # datasets raises many types when offline or missing
            raise DataError(
                f"dataset {name!r} is not available locally ({type(exc).__name__}); download it where there is "
                "a network into the HF cache, or use --data builtin or --data path/to/text.txt"
            ) from None
    if name == "c4":  # the papers draw from a bounded prefix of the shards
        calib_docs = ds[calib_split][column][:20000]
        eval_docs = ds[eval_split][column][:1100]
    else:
        calib_docs, eval_docs = ds[calib_split][column], ds[eval_split][column]
    return TextSplits(name, joiner.join(calib_docs), joiner.join(eval_docs))


def _load_one(spec: str) -> TextSplits:
    if spec == "builtin":
        return builtin_splits()
    if spec == "licenses":
        return license_splits()
    if spec == "manpages":
        return manpage_splits()
    if spec in _HF_DATASETS:
        return hf_splits(spec)
    path = Path(spec).expanduser()
    if path.exists() or path.suffix or "/" in spec:
        return file_splits(path)
    raise DataError(f"unknown data {spec!r}: use builtin, licenses, manpages, wikitext2, c4 or a path to a text file")


NAMED_SOURCES = ("builtin", "licenses", "manpages", *_HF_DATASETS)
MIX_EXAMPLE = "e.g. --data builtin,licenses or --data builtin:0.7,licenses:0.3"


@dataclass(frozen=True)
class MixedSplits(TextSplits):
    """Several calibration sources at once (`load_text('a,b')`, `load_text('a:0.7,b:0.3')`).

    `sources`: each source's own TextSplits, in the order given; `specs`: the specs they were loaded from;
    `weights`: their shares, normalised to sum to 1 (exact fractions; equal when none were given). `calibration` and
    `evaluation` are the sources' texts joined (for code that reads one text), but calibration windows are drawn per
    source (`mixed_calibration_batch`) and evaluation reports each source's held-out split on its own
    (`domains.load_sources`)."""

    sources: tuple[TextSplits, ...] = ()
    specs: tuple[str, ...] = ()
    weights: tuple[Fraction, ...] = ()


def _exact(text: str, value: float) -> Fraction:
    try:
        return Fraction(text)  # the decimal as written: 0.7 is 7/10
    except ValueError:
        return Fraction(value)


def parse_mix(spec: str | Path) -> list[tuple[str, Fraction | None]]:
    """The sources of a data spec with their (unnormalised) weights, None where none was given.

    The rule: a spec that names an existing file or directory as a whole is that one source (so a path may hold
    commas and colons). Otherwise the spec is split at commas; an item that names an existing path is that source;
    else, when the text after the item's last ':' parses as a number (``float``), that is the item's weight (it must
    be finite and > 0) and the text before it the source (so ``C:\\corpus.txt`` stays a path, ``notes.txt:0.3`` is
    notes.txt at weight 0.3). Weights are given to every source or to none; a source may appear once. A path that
    holds a comma can only be given on its own (a mix is split at every comma)."""
    spec = str(spec)
    if ("," not in spec and ":" not in spec) or Path(spec).expanduser().exists():
        return [(spec, None)]
    items: list[tuple[str, Fraction | None]] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise DataError(f"data {spec!r} has an empty entry: give sources separated by single commas, "
                            f"{MIX_EXAMPLE}")
        source, weight = item, None
        head, colon, tail = item.rpartition(":")
        if colon and not Path(item).expanduser().exists():
            try:
                value = float(tail)
            except ValueError:
                if head.strip() in NAMED_SOURCES:
                    raise DataError(f"the weight of {head.strip()} in data {spec!r} is {tail!r}, not a number: "
                                    f"{MIX_EXAMPLE}") from None
            else:
                if not math.isfinite(value) or value <= 0:
                    raise DataError(f"the weight of {head.strip() or '?'} in data {spec!r} is {tail.strip()}: "
                                    f"weights must be finite and > 0, {MIX_EXAMPLE}")
                if not head.strip():
                    raise DataError(f"data {spec!r} has a weight without a source ({item!r}): {MIX_EXAMPLE}")
                source, weight = head.strip(), _exact(tail.strip(), value)
        items.append((source, weight))
    given = [w is not None for _, w in items]
    if any(given) and not all(given):
        missing = ", ".join(s for s, w in items if w is None)
        raise DataError(f"data {spec!r} gives weights to some sources but not to {missing}: weight every source or "
                        f"none (none: equal shares), {MIX_EXAMPLE}")
    seen: dict[str, str] = {}
    for source, _ in items:
        key = source if source in NAMED_SOURCES else str(Path(source).expanduser().resolve())
        if key in seen:
            raise DataError(f"data {spec!r} names {source} twice: give each source once (its weight sets its share)")
        seen[key] = source
    return items


def load_text(spec: str | Path = "builtin") -> TextSplits:
    """Resolve a data spec: 'builtin', 'licenses', 'manpages', 'wikitext2', 'c4', or a path to a UTF-8 text file, a
    .jsonl file (one {"text": ...} per line) or a directory of them; or several of these separated by commas, with
    optional weights (``builtin:0.7,licenses:0.3``; see `parse_mix`): a MixedSplits."""
    spec = str(spec)
    items = parse_mix(spec)
    if len(items) == 1:  # one source (a weight on its own changes nothing)
        return _load_one(items[0][0])
    sources = tuple(_load_one(source) for source, _ in items)
    raw = [Fraction(1) if w is None else w for _, w in items]
    total = sum(raw)
    return MixedSplits(",".join(item.strip() for item in spec.split(",")),
                       "\n\n".join(s.calibration for s in sources), "\n\n".join(s.evaluation for s in sources),
                       sources=sources, specs=tuple(source for source, _ in items),
                       weights=tuple(w / total for w in raw))


def mix_counts(weights, nsamples: int) -> list[int]:
    """Windows per source: nsamples * weight rounded by largest remainder (exact arithmetic; ties go to the
    source given first), so the counts sum to `nsamples`."""
    shares = [Fraction(w) for w in weights]
    total = sum(shares)
    quotas = [nsamples * w / total for w in shares]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda i: (counts[i] - quotas[i], i))  # largest remainder first
    for i in order[: nsamples - sum(counts)]:
        counts[i] += 1
    return counts


def calibration_counts(splits: MixedSplits, nsamples: int) -> list[int]:
    """`mix_counts` of a mix's calibration windows; every source must get at least one window."""
    if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 1:
        raise ConfigError(f"nsamples must be a positive integer, got {nsamples!r}")
    counts = mix_counts(splits.weights, nsamples)
    for source, weight, count in zip(splits.sources, splits.weights, counts):
        if count == 0:
            raise ConfigError(f"data {splits.name!r} gives {source.name} (weight {float(weight):.3g}) none of the "
                              f"{nsamples} calibration windows: raise --nsamples (to at least {math.ceil(1 / weight)}) "
                              "or that source's weight")
    return counts


def mix_record(spec: str, nsamples: int) -> dict | None:
    """What a mixed data spec calibrates on, for sparsecraft.json: {'data', 'sources': [{'source', 'weight',
    'windows'}]}; None for a single source."""
    items = parse_mix(spec)
    if len(items) == 1:
        return None
    raw = [Fraction(1) if w is None else w for _, w in items]
    counts = mix_counts(raw, nsamples)
    total = sum(raw)
    return {"data": str(spec), "sources": [{"source": s, "weight": float(w / total), "windows": n}
                                           for (s, _), w, n in zip(items, raw, counts)]}


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a long text as one 1-D LongTensor (no truncation)."""
    if tokenizer is None:
        raise DataError("the model has no tokenizer: pass token ids instead of text, or a model directory with one")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids
    return ids[0]


def calibration_batch(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens drawn at random positions (seeded) from a token stream."""
    if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 1:
        raise ConfigError(f"nsamples must be a positive integer, got {nsamples!r}")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1:
        raise ConfigError(f"seqlen must be a positive integer, got {seqlen!r}")
    if tokens.numel() < seqlen:
        raise DataError(
            f"calibration text has {tokens.numel()} tokens, shorter than one window of {seqlen}: "
            "give more text or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def mixed_calibration_batch(splits: MixedSplits, tokenizer, nsamples: int, seqlen: int, seed: int, *,
                            every_source: bool = True, tokens: list[torch.Tensor] | None = None) -> torch.Tensor:
    """`nsamples` windows of a mix: source i's `mix_counts` share, drawn from its own calibration text exactly as
    `calibration_batch(its tokens, count, seqlen, seed)` (the windows `--data <that source> --nsamples <count>`
    would use), stacked in the order the sources were given. `every_source`: refuse a source that rounds to no
    window (else it is skipped). `tokens`: the sources' calibration tokens when already tokenized."""
    counts = calibration_counts(splits, nsamples) if every_source else mix_counts(splits.weights, nsamples)
    tokens = tokens if tokens is not None else [tokenize(tokenizer, s.calibration) for s in splits.sources]
    parts = []
    for source, ids, count in zip(splits.sources, tokens, counts):
        if count:
            try:
                parts.append(calibration_batch(ids, count, seqlen, seed))
            except DataError as exc:
                raise DataError(f"{source.name}: {exc}") from None
    return torch.cat(parts)


def evaluation_windows(tokens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens; the trailing partial window is dropped."""
    count = tokens.numel() // seqlen
    if count == 0:
        raise DataError(
            f"evaluation text has {tokens.numel()} tokens, shorter than one window of {seqlen}: "
            "give more text or a smaller --seqlen"
        )
    return tokens[: count * seqlen].reshape(count, seqlen)
