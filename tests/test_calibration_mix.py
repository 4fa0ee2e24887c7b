"""Calibration from several sources at once (issue 14, part 3): `--data a,b` and `--data a:0.7,b:0.3`.

Window counts per source by largest remainder, windows drawn per source with the seed (so each source's windows are
the ones `--data <that source>` would draw), single-source specs unchanged, the rule that tells a weight from a
path, one-line errors (exit 2) for bad specs, each source's held-out split evaluated, and the mix recorded in
sparsecraft.json. Two small text files with disjoint alphabets show where every window came from (the tests'
byte-level tokenizer has one token per byte)."""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from sparsecraft import api
from sparsecraft.cli import main
from sparsecraft.data import (
    MixedSplits,
    calibration_batch,
    calibration_counts,
    load_text,
    mix_counts,
    mix_record,
    mixed_calibration_batch,
    parse_mix,
    tokenize,
)
from sparsecraft.domains import eval_specs, load_sources
from sparsecraft.errors import ConfigError, DataError

ALPHABET_A = "bcghik"
ALPHABET_B = "jquvwxyz"
SEQLEN = 32


def alphabet_text(letters: str, paragraphs: int = 10, chars: int = 2500, seed: int = 0) -> str:
    """Paragraphs of ~`chars` characters of words made only of `letters` (plus spaces, blank lines between)."""
    rng = random.Random(seed)
    paras = []
    for i in range(paragraphs):
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < chars:
            words.append("".join(rng.choice(letters) for _ in range(rng.randint(2, 8))))
        paras.append(" ".join(words) + f" {letters[i % len(letters)] * (i + 1)}")  # every paragraph distinct
    return "\n\n".join(paras) + "\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mix")
    a, b = root / "alpha.txt", root / "beta.txt"
    a.write_text(alphabet_text(ALPHABET_A, seed=1), encoding="utf-8")
    b.write_text(alphabet_text(ALPHABET_B, seed=2), encoding="utf-8")
    return a, b


def letters_of(tokenizer, window: torch.Tensor) -> set[str]:
    return set(tokenizer.decode(window.tolist())) - {" ", "\n"}


# -- counts --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights, nsamples, expected", [
    ([Fraction(7, 10), Fraction(3, 10)], 64, [45, 19]),  # 44.8, 19.2: the larger remainder gets the spare window
    ([1, 1], 64, [32, 32]),
    ([1, 1], 5, [3, 2]),  # a tie goes to the source given first
    ([1, 1, 1], 10, [4, 3, 3]),
    ([2, 1, 1], 7, [3, 2, 2]),  # 3.5, 1.75, 1.75
    ([Fraction(29, 100), Fraction(71, 100)], 100, [29, 71]),  # exact arithmetic: no 28.999... floor
    ([Fraction(1, 100), Fraction(99, 100)], 8, [0, 8]),
])
def test_window_counts_are_largest_remainder(weights, nsamples, expected):
    counts = mix_counts(weights, nsamples)
    assert counts == expected and sum(counts) == nsamples


def test_counts_from_a_spec_and_weights_normalised(files):
    a, b = files
    mix = load_text(f"{a}:0.7,{b}:0.3")
    assert isinstance(mix, MixedSplits) and mix.weights == (Fraction(7, 10), Fraction(3, 10))
    assert calibration_counts(mix, 64) == [45, 19]
    assert load_text(f"{a}:2,{b}:1").weights == (Fraction(2, 3), Fraction(1, 3))  # weights need not sum to 1
    assert load_text(f"{a},{b}").weights == (Fraction(1, 2), Fraction(1, 2))  # default: equal shares
    with pytest.raises(ConfigError, match=r"none of the 8 calibration windows: raise --nsamples \(to at least 100\)"):
        calibration_counts(load_text(f"{a}:0.01,{b}:0.99"), 8)


# -- windows -------------------------------------------------------------------------------------------------------


def test_windows_come_from_their_sources_in_proportion(files, byte_tokenizer):
    a, b = files
    mix = load_text(f"{a}:0.75,{b}:0.25")
    batch = mixed_calibration_batch(mix, byte_tokenizer, 12, SEQLEN, seed=3)
    assert batch.shape == (12, SEQLEN)
    for i, window in enumerate(batch):
        letters = letters_of(byte_tokenizer, window)
        assert letters and letters <= set(ALPHABET_A if i < 9 else ALPHABET_B), (i, letters)
    # each source's windows are exactly the ones that source alone would give with that count and the seed
    own_a = calibration_batch(tokenize(byte_tokenizer, load_text(a).calibration), 9, SEQLEN, 3)
    own_b = calibration_batch(tokenize(byte_tokenizer, load_text(b).calibration), 3, SEQLEN, 3)
    assert torch.equal(batch, torch.cat([own_a, own_b]))
    # and api.calibration_ids (what bench/ and `prune` use) draws the same
    recipe = api.make_recipe(None, data=f"{a}:0.75,{b}:0.25", nsamples=12, seqlen=SEQLEN, seed=3)
    assert torch.equal(api.calibration_ids(recipe.data, byte_tokenizer, recipe), batch)


def test_mixed_windows_are_deterministic(files, byte_tokenizer):
    a, b = files
    spec = f"{a},{b}"
    first = mixed_calibration_batch(load_text(spec), byte_tokenizer, 8, SEQLEN, seed=0)
    again = mixed_calibration_batch(load_text(spec), byte_tokenizer, 8, SEQLEN, seed=0)
    other = mixed_calibration_batch(load_text(spec), byte_tokenizer, 8, SEQLEN, seed=1)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_single_source_is_unchanged(files, byte_tokenizer):
    """A spec without a comma is the source as before: the same TextSplits and the same calibration tensors."""
    a, _ = files
    splits = load_text(str(a))
    assert type(splits) is not MixedSplits and splits == load_text(a)
    recipe = api.make_recipe(None, data=str(a), nsamples=6, seqlen=SEQLEN, seed=2)
    before = calibration_batch(tokenize(byte_tokenizer, splits.calibration), 6, SEQLEN, 2)
    assert torch.equal(api.calibration_ids(str(a), byte_tokenizer, recipe), before)
    assert torch.equal(api.calibration_ids(splits, byte_tokenizer, recipe), before)
    assert load_text(f"{a}:0.5") == splits  # one source with a weight: that source
    assert mix_record(str(a), 64) is None


# -- the rule that tells a weight from a path ------------------------------------------------------------------------


def test_paths_with_commas_and_colons(tmp_path):
    text = alphabet_text(ALPHABET_A, seed=4)
    comma = tmp_path / "a,b.txt"
    colon = tmp_path / "notes:0.3"
    comma.write_text(text, encoding="utf-8")
    colon.write_text(text, encoding="utf-8")
    assert parse_mix(str(comma)) == [(str(comma), None)]  # an existing path as a whole is one source
    assert parse_mix(str(colon)) == [(str(colon), None)]
    assert load_text(colon).name == str(colon)
    # in a mix, an item that names an existing path is that path; a weight goes after it
    assert parse_mix(f"{colon},builtin") == [(str(colon), None), ("builtin", None)]
    assert parse_mix(f"{colon}:1,builtin:3") == [(str(colon), Fraction(1)), ("builtin", Fraction(3))]
    # (a path holding a comma can only be given on its own: a mix is split at every comma)
    assert parse_mix("C:\\corpus\\a.txt,D:\\b.txt") == [("C:\\corpus\\a.txt", None), ("D:\\b.txt", None)]
    assert parse_mix("builtin:0.7, licenses:3e-1") == [("builtin", Fraction(7, 10)), ("licenses", Fraction(3, 10))]


@pytest.mark.parametrize("spec, fragment", [
    ("builtin,,licenses", "has an empty entry"),
    ("builtin,licenses,", "has an empty entry"),
    ("builtin:0,licenses:1", "weights must be finite and > 0"),
    ("builtin:-1,licenses:1", "weights must be finite and > 0"),
    ("builtin:nan,licenses:1", "weights must be finite and > 0"),
    ("builtin:inf,licenses:1", "weights must be finite and > 0"),
    ("builtin:abc,licenses", "not a number"),
    ("builtin:1,licenses", "weight every source or none"),
    ("builtin,builtin:1", "weight every source or none"),
    ("builtin,builtin", "names builtin twice"),
    (":0.5,builtin:0.5", "a weight without a source"),
    ("builtin,wikitext3", "unknown data 'wikitext3'"),
])
def test_bad_specs_raise(spec, fragment):
    with pytest.raises(DataError, match=fragment):
        load_text(spec)


def test_the_same_file_twice_is_refused(files):
    a, _ = files
    with pytest.raises(DataError, match="twice"):
        load_text(f"{a},{a.parent}/../{a.parent.name}/{a.name}")


# -- evaluation: each source's held-out split ------------------------------------------------------------------------


def test_a_mix_is_evaluated_on_each_source(files):
    a, b = files
    spec = f"{a},{b}"
    mix = load_text(spec)
    sources = load_sources(eval_specs([str(b), "none"], spec), mix)
    assert [s.name for s in sources] == [str(a), str(b)]  # b is in the mix: not evaluated twice
    for source, own in zip(sources, (load_text(a), load_text(b))):
        assert source.evaluation == own.evaluation  # its own held-out split (nothing of it in the other's text)
        held = {p for p in source.evaluation.split("\n\n") if p.strip()}
        assert not held & set(mix.calibration.split("\n\n"))


# -- the CLI ---------------------------------------------------------------------------------------------------------


COMMON = ["--nsamples", "4", "--seqlen", str(SEQLEN), "--max-eval-windows", "2", "--quiet"]


@pytest.mark.parametrize("spec, fragment", [
    ("{a},,{b}", "has an empty entry"),
    ("{a}:0,{b}:1", "weights must be finite and > 0"),
    ("{a}:nan,{b}:1", "weights must be finite and > 0"),
    ("{a},{a}", "twice"),
    ("{a},nosuchsource", "unknown data 'nosuchsource'"),
    ("{a}:1,{b}", "weight every source or none"),
    ("{a}:0.1,{b}:0.9", "none of the 4 calibration windows"),
])
def test_bad_specs_exit_2_with_one_line(spec, fragment, files, llama_dir, tmp_path, capsys):
    a, b = files
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["prune", "--model", str(llama_dir), "--method", "wanda", "--data", spec.format(a=a, b=b),
               "--out", str(out), *COMMON])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("sparsecraft: error:") and fragment in lines[0], err
    assert "Traceback" not in err and not out.exists()


def test_prune_on_two_files(files, llama_dir, tmp_path, capsys):
    a, b = files
    out = tmp_path / "pruned"
    spec = f"{a}:3,{b}:1"
    assert main(["prune", "--model", str(llama_dir), "--method", "wanda", "--sparsity", "0.5", "--data", spec,
                 "--eval-data", "none", "--out", str(out), *COMMON]) == 0
    printed = capsys.readouterr().out
    assert f"ppl {a}" in printed and f"ppl {b}" in printed and "geomean" in printed
    meta = json.loads((out / "sparsecraft.json").read_text())
    assert meta["recipe"]["data"] == spec
    assert meta["calibration"] == {"data": spec, "sources": [{"source": str(a), "weight": 0.75, "windows": 3},
                                                             {"source": str(b), "weight": 0.25, "windows": 1}]}
    assert list(meta["evaluation"]["domains"]) == [str(a), str(b)]
    assert meta["evaluation"]["data"] == spec
    assert 0.45 < meta["sparsity"] < 0.55
    # the recipe written beside the model reproduces the mix
    assert f"data: {spec}" in (out / "recipe.yaml").read_text().replace("'", "")


def test_eval_reports_each_source_of_a_mix(files, llama_dir, tmp_path, capsys):
    a, b = files
    report = tmp_path / "eval.json"
    assert main(["eval", str(llama_dir), "--data", f"{a},{b}", "--seqlen", str(SEQLEN), "--max-eval-windows", "2",
                 "--eval-data", "none", "--quiet", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert list(result["domains"]) == [str(a), str(b)] and result["data"] == f"{a},{b}"
    printed = capsys.readouterr().out
    assert str(a) in printed and str(b) in printed and "geometric mean" in printed


def test_search_fitness_windows_of_a_mix_come_from_each_source(files, byte_tokenizer, monkeypatch):
    """allocation=search on a mix: the candidates are scored on windows drawn per source too (seed + 1)."""
    from conftest import build_model
    from sparsecraft import search

    a, b = files
    spec = f"{a}:1,{b}:1"
    seen = {}

    class Stop(Exception):
        pass

    def capture(model, ids, windows, *args, **kwargs):
        seen["ids"], seen["windows"] = ids, windows
        raise Stop

    monkeypatch.setattr(search, "search_levels", capture)
    with pytest.raises(Stop):
        api.prune(build_model("llama"), spec, method="wanda", sparsity=0.5, allocation="search", nsamples=4,
                  seqlen=SEQLEN, search_fitness_samples=2, tokenizer=byte_tokenizer, progress=False)
    mix = load_text(spec)
    assert torch.equal(seen["ids"], mixed_calibration_batch(mix, byte_tokenizer, 4, SEQLEN, 0))
    assert torch.equal(seen["windows"], mixed_calibration_batch(mix, byte_tokenizer, 2, SEQLEN, 1))
    assert letters_of(byte_tokenizer, seen["windows"][0]) <= set(ALPHABET_A)
    assert letters_of(byte_tokenizer, seen["windows"][1]) <= set(ALPHABET_B)


def test_bench_calibration_sensitivity_on_the_tiny_model(files, llama_dir, capsys):
    """bench/calibration_sensitivity.py: one recipe calibrated on A, on B and on the mix, evaluated on both."""
    import importlib.util
    import sys

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("calibration_sensitivity", bench / "calibration_sensitivity.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        a, b = files
        module.main(["--domains", f"{a},{b}", "--mix", "--settings", "0.5", "--rows", "wanda", "--model",
                     str(llama_dir), "--nsamples", "4", "--seqlen", str(SEQLEN), "--max-eval-windows", "2",
                     "--in-process"])
    finally:
        sys.path.remove(str(bench))
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.strip().startswith("wanda")]
    assert len(rows) == 3, out  # calibrated on A, on B, on A,B
    assert "cross" in out and "%" in rows[0]
