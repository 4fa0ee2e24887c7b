"""Calibration / evaluation text sources and token windows."""

from __future__ import annotations

import pytest
import torch

from sparsecraft import data
from sparsecraft.data import calibration_batch, evaluation_windows, load_text, tokenize
from sparsecraft.errors import ConfigError, DataError, SparsecraftError


@pytest.fixture(scope="module")
def builtin():
    return load_text("builtin")


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def test_builtin_splits_non_empty(builtin):
    assert builtin.name == "builtin"
    assert len(builtin.calibration) > 100_000
    assert len(builtin.evaluation) > 20_000
    # about a fifth of the corpus is held out
    assert 0.1 < len(builtin.evaluation) / (len(builtin.calibration) + len(builtin.evaluation)) < 0.35


def test_builtin_splits_disjoint(builtin):
    from pydoc_data.topics import topics

    for key, text in topics.items():
        text = text.strip()
        assert not (text in builtin.calibration and text in builtin.evaluation), f"topic {key!r} is in both"
    # No held-out paragraph of real prose (>= 200 characters) was seen in calibration, even though CPython's
    # topics nest and repeat each other's sections.
    leaked = [p for p in paragraphs(builtin.evaluation) if len(p) >= 200 and p in builtin.calibration]
    assert not leaked, f"{len(leaked)} evaluation paragraphs also in calibration, e.g. {leaked[0][:80]!r}"
    # and everything that is used comes from the corpus
    corpus = "\n\n".join(t.strip() for t in topics.values())
    for p in paragraphs(builtin.evaluation)[:50] + paragraphs(builtin.calibration)[:50]:
        assert p in corpus


def test_builtin_split_is_deterministic(builtin):
    again = load_text("builtin")
    assert again == builtin


def test_file_split(tmp_path):
    # ten paragraphs of ~2.1k characters: each is one section, every fifth one (4 and 9) is held out
    paras = [f"Paragraph number {i}. " + " ".join(f"word{i}_{j}" for j in range(250)) for i in range(10)]
    assert all(len(p) > data.SECTION_CHARS for p in paras)
    path = tmp_path / "ten.txt"
    path.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    splits = load_text(str(path))
    assert splits.name == str(path)
    assert paragraphs(splits.evaluation) == [paras[4], paras[9]]
    assert paragraphs(splits.calibration) == [p for i, p in enumerate(paras) if i not in (4, 9)]


def test_file_split_short_paragraphs_are_grouped(tmp_path):
    paras = [f"Short paragraph {i} " + "x" * 300 for i in range(60)]  # ~320 chars each: 7 per section
    path = tmp_path / "many.txt"
    path.write_text("\n\n".join(paras), encoding="utf-8")
    splits = load_text(path)
    cal, ev = paragraphs(splits.calibration), paragraphs(splits.evaluation)
    assert cal and ev
    assert not set(cal) & set(ev)
    assert sorted(cal + ev) == sorted(paras)
    assert 0.1 < len(ev) / len(paras) < 0.35


def test_file_split_without_blank_lines(tmp_path):
    lines = [f"line {i} " + "y" * 200 for i in range(100)]
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    splits = load_text(path)
    cal, ev = splits.calibration.splitlines(), splits.evaluation.splitlines()
    cal, ev = [x for x in cal if x], [x for x in ev if x]
    assert cal and ev
    assert not set(cal) & set(ev)
    assert sorted(cal + ev) == sorted(lines)


def test_small_file_used_whole(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("just a few words\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="too small to hold text out"):
        splits = load_text(path)
    assert splits.calibration.strip() == splits.evaluation.strip() == "just a few words"


def test_one_line_file_is_cut_at_whitespace_and_held_out(tmp_path):
    words = [f"w{i}" for i in range(40_000)]  # ~240k characters on one line, no newline at all
    path = tmp_path / "oneline.txt"
    path.write_text(" ".join(words), encoding="utf-8")
    splits = load_text(path)
    cal, ev = splits.calibration.split(), splits.evaluation.split()
    assert sorted(cal + ev, key=lambda w: int(w[1:])) == words  # every word once, none cut in two
    assert 0.15 < len(ev) / len(words) < 0.25 and not set(cal) & set(ev)
    lines = (splits.calibration + "\n" + splits.evaluation).split("\n")
    assert max(len(line) for line in lines) <= 4 * data.SECTION_CHARS


def test_crlf_and_byte_order_mark_read_as_plain_text(tmp_path):
    paras = [f"Paragraph {i}. " + " ".join(f"v{i}_{j}" for j in range(300)) for i in range(10)]
    unix, windows = tmp_path / "unix.txt", tmp_path / "windows.txt"
    unix.write_text("\n\n".join(paras), encoding="utf-8")
    windows.write_bytes(b"\xef\xbb\xbf" + "\r\n\r\n".join(paras).encode())
    a, b = load_text(unix), load_text(windows)
    assert (a.calibration, a.evaluation) == (b.calibration, b.evaluation)
    assert "\r" not in b.calibration and not b.calibration.startswith("\ufeff")


def test_jsonl_and_directory_sources(tmp_path):
    import json

    docs = [f"Document {i}. " + " ".join(f"d{i}_{j}" for j in range(400)) for i in range(10)]
    (tmp_path / "corpus").mkdir()
    jsonl = tmp_path / "corpus" / "b.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs[5:])) + "\n")
    (tmp_path / "corpus" / "a.txt").write_text("\n\n".join(docs[:5]))
    (tmp_path / "corpus" / "notes.md").write_text("ignored")
    whole = load_text(tmp_path / "corpus")
    assert paragraphs(whole.calibration) + paragraphs(whole.evaluation) != []
    assert sorted(paragraphs(whole.calibration) + paragraphs(whole.evaluation)) == sorted(docs)
    only = load_text(jsonl)
    assert sorted(paragraphs(only.calibration) + paragraphs(only.evaluation)) == sorted(docs[5:])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match="line 2 has no string 'text' field"):
        load_text(bad)
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        load_text(bad)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="holds no .txt or .jsonl files"):
        load_text(tmp_path / "empty_dir")


@pytest.mark.parametrize("spec", ["missing.txt", "no/such/dir/file", "./nope"])
def test_missing_file(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_text(spec)


def test_empty_and_binary_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n \n")
    with pytest.raises(DataError, match="empty"):
        load_text(empty)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00\x80" * 100)
    with pytest.raises(DataError, match="UTF-8"):
        load_text(binary)


def test_unknown_data_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="unknown data 'wikitext3'"):
        load_text("wikitext3")


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_hf_dataset_unavailable_is_data_error(name, monkeypatch):
    # offline: either `datasets` is missing or the data are not cached; both must be a DataError
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        load_text(name)
    assert isinstance(info.value, SparsecraftError)
    assert name in str(info.value)


def test_hf_dataset_missing_package(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match="pip install datasets"):
        load_text("wikitext2")


# --- token windows -----------------------------------------------------------------------------------------------

def test_calibration_batch_shapes_and_windows():
    tokens = torch.arange(1000)
    batch = calibration_batch(tokens, 8, 32, seed=0)
    assert batch.shape == (8, 32) and batch.dtype == tokens.dtype
    # every row is a contiguous window of the stream
    assert (batch[:, 1:] - batch[:, :-1] == 1).all()
    assert batch.min() >= 0 and batch.max() < 1000
    exact = calibration_batch(torch.arange(32), 3, 32, seed=0)  # only one possible window
    assert (exact == torch.arange(32)).all()


def test_calibration_batch_seeded():
    tokens = torch.arange(10_000)
    a = calibration_batch(tokens, 16, 64, seed=0)
    b = calibration_batch(tokens, 16, 64, seed=0)
    c = calibration_batch(tokens, 16, 64, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 0], c[:, 0])
    # the global RNG neither influences nor is consumed by the draw
    torch.manual_seed(123)
    state = torch.get_rng_state()
    assert torch.equal(calibration_batch(tokens, 16, 64, seed=0), a)
    assert torch.equal(torch.get_rng_state(), state)


def test_calibration_batch_too_short():
    with pytest.raises(DataError, match="31 tokens, shorter than one window of 32"):
        calibration_batch(torch.arange(31), 4, 32, seed=0)


@pytest.mark.parametrize("nsamples", [0, -1, 2.0, True, None])
def test_calibration_batch_bad_nsamples(nsamples):
    with pytest.raises(ConfigError, match="nsamples"):
        calibration_batch(torch.arange(100), nsamples, 8, seed=0)


@pytest.mark.parametrize("seqlen", [0, -3, 8.5])
def test_calibration_batch_bad_seqlen(seqlen):
    with pytest.raises(ConfigError, match="seqlen"):
        calibration_batch(torch.arange(100), 2, seqlen, seed=0)


def test_evaluation_windows():
    w = evaluation_windows(torch.arange(100), 32)
    assert w.shape == (3, 32)
    assert torch.equal(w.reshape(-1), torch.arange(96))  # non-overlapping, trailing partial window dropped
    with pytest.raises(DataError, match="shorter than one window"):
        evaluation_windows(torch.arange(10), 32)


def test_tokenize(byte_tokenizer):
    ids = tokenize(byte_tokenizer, "héllo wörld")
    assert ids.ndim == 1 and ids.dtype == torch.long
    assert len(ids) == len("héllo wörld".encode())  # byte-level, no merges learned for this text
    assert byte_tokenizer.decode(ids.tolist()) == "héllo wörld"
    with pytest.raises(DataError, match="no tokenizer"):
        tokenize(None, "text")
