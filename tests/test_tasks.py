"""`sparsecraft eval --tasks` (issue 14, part 4): lm-eval tasks on the model as loaded, from data on disk only.

A tiny multiple-choice task is written by the test (a .jsonl of generated documents and a task YAML reading it
with `dataset_path: json`); the accuracy `eval` reports must equal the one computed here by scoring every choice's
log-likelihood with the model directly. Unknown tasks and tasks without local data are exit code 2, one line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import WORDS
from sparsecraft.cli import main

ERROR_PREFIX = "sparsecraft: error:"
CHOICES = 4


@pytest.fixture
def lm_eval(monkeypatch):
    # lm-eval imports `datasets`, which reads these once, at import: keep it offline for the rest of the session
    # too (sparsecraft sets them only around its own calls, and tests after this one must not reach the hub)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return pytest.importorskip("lm_eval")


def _eval(model_dir: Path, text: Path, *extra: str) -> list[str]:
    return ["eval", str(model_dir), "--data", str(text), "--eval-data", "none", "--seqlen", "32",
            "--max-eval-windows", "1", "--quiet", *extra]


def _task_yaml(path: Path, task: str, data: Path | str, cache: Path) -> Path:
    """A multiple-choice task over `data` (a .jsonl on disk, or a hub dataset id), acc and acc_norm."""
    source = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
              f"  cache_dir: {json.dumps(str(cache))}\n" if isinstance(data, Path) else f"dataset_path: {data}\n")
    path.write_text(f"task: {task}\n{source}test_split: test\noutput_type: multiple_choice\n"
                    'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
                    "metric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")
    return path


def _one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(ERROR_PREFIX) and all(f in err for f in fragments), err
    return err


class Scorer:
    """Each choice's log-likelihood after the question, straight from the model (the reference)."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    @torch.no_grad()
    def loglikelihood(self, context: str, continuation: str) -> float:
        ctx = self.tokenizer.encode(context)
        ids = self.tokenizer.encode(context + continuation)
        assert ids[: len(ctx)] == ctx  # byte-level pre-tokenization splits before the space
        logp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].double(), dim=-1)
        return float(sum(logp[i - 1, ids[i]] for i in range(len(ctx), len(ids))))

    def scores(self, doc: dict) -> list[float]:
        return [self.loglikelihood(doc["question"], " " + c) for c in doc["choices"]]  # lm-eval's " " delimiter


def _documents(scorer: Scorer, count: int, right: int, seed: int) -> tuple[list[dict], dict]:
    """`count` generated documents, labelled so that the model's argmax is right on exactly `right` of them;
    returns them with the reference acc and acc_norm (argmax of log-likelihood per character), computed here."""
    rng = random.Random(seed)
    docs, acc, acc_norm = [], 0, 0
    for i in range(count):
        question = " ".join(rng.choice(WORDS) for _ in range(6))
        choices = list(dict.fromkeys(rng.choice(WORDS) for _ in range(40)))[:CHOICES]
        lls = scorer.scores({"question": question, "choices": choices})
        best = max(range(CHOICES), key=lambda k: lls[k])
        label = best if i < right else (best + 1) % CHOICES
        norm = max(range(CHOICES), key=lambda k: lls[k] / len(choices[k]))
        acc += best == label
        acc_norm += norm == label
        docs.append({"question": question, "choices": choices, "label": label})
    return docs, {"acc": acc / count, "acc_norm": acc_norm / count}


def _write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def test_local_tasks_match_the_direct_loglikelihood_argmax(lm_eval, llama_dir, text_file, tmp_path, capsys):
    scorer = Scorer(llama_dir)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    expected = {}
    for name, count, right, seed in (("tiny_mc_a", 8, 5, 1), ("tiny_mc_b", 6, 2, 2)):
        docs, expected[name] = _documents(scorer, count, right, seed)
        _task_yaml(tasks / f"{name}.yaml", name, _write_jsonl(tmp_path / f"{name}.jsonl", docs), tmp_path / "cache")
        expected[name]["samples"] = count
    assert expected["tiny_mc_a"]["acc"] == 5 / 8 and expected["tiny_mc_b"]["acc"] == 2 / 6  # labelled so

    report = tmp_path / "report.json"
    assert main(_eval(llama_dir, text_file, "--tasks", str(tasks), "--json", str(report))) == 0
    out = capsys.readouterr().out
    result = json.loads(report.read_text())
    assert set(result["tasks"]) == set(expected)
    for name, want in expected.items():
        got = result["tasks"][name]
        assert got["acc"] == want["acc"] and got["acc_norm"] == want["acc_norm"], (name, got, want)
        assert got["samples"] == want["samples"] and got["num_fewshot"] == 0
        n, p = want["samples"], want["acc"]
        assert got["acc_stderr"] == pytest.approx((p * (1 - p) / (n - 1)) ** 0.5, rel=1e-9)  # sample stderr
        assert f"{want['acc']:.4f} +- " in out.split(name, 1)[1].splitlines()[0]
    assert "perplexity" in out and result["domains"]  # the perplexity report is still there


def test_a_task_file_and_limit(lm_eval, llama_dir, text_file, tmp_path, capsys):
    docs = [{"question": f"{w} models are", "choices": ["small", "fast", "zero"], "label": 0} for w in WORDS[:5]]
    task = _task_yaml(tmp_path / "one.yaml", "tiny_mc_one", _write_jsonl(tmp_path / "one.jsonl", docs),
                      tmp_path / "cache")
    report = tmp_path / "report.json"
    assert main(_eval(llama_dir, text_file, "--tasks", str(task), "--limit", "3", "--json", str(report))) == 0
    got = json.loads(report.read_text())["tasks"]["tiny_mc_one"]
    assert got["samples"] == 3 and got["acc"] in (0, 1 / 3, 2 / 3, 1)
    assert "tiny_mc_one" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["hub", "missing-file"])
def test_task_without_local_data_is_one_line(lm_eval, llama_dir, text_file, tmp_path, capsys, where):
    data = "sparsecraft-tests/no-such-dataset" if where == "hub" else tmp_path / "absent.jsonl"
    task = _task_yaml(tmp_path / "nodata.yaml", "tiny_nodata", data, tmp_path / "cache")
    report = tmp_path / "report.json"
    assert main(_eval(llama_dir, text_file, "--tasks", str(task), "--json", str(report))) == 2
    err = _one_line_error(capsys, f"task 'tiny_nodata' ({task}) has no local data")
    assert "HF datasets cache" in err and "data_files" in err  # the fix
    assert not report.exists()


def test_unknown_task_is_one_line(lm_eval, llama_dir, text_file, capsys):
    assert main(_eval(llama_dir, text_file, "--tasks", "sparsecraft_no_such_task")) == 2
    _one_line_error(capsys, "unknown task 'sparsecraft_no_such_task'")


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--tasks", "nowhere/task.yaml"], "task file nowhere/task.yaml does not exist"),
    (["--tasks", " , "], "--tasks is empty"),
    (["--limit", "3"], "--limit applies to lm-eval tasks: pass --tasks too"),
    (["--tasks", "x.yaml", "--num-fewshot", "-1"], "--num-fewshot must be >= 0"),
])
def test_bad_task_flags_are_one_line(lm_eval, llama_dir, text_file, capsys, extra, fragment):
    assert main(_eval(llama_dir, text_file, *extra)) == 2
    _one_line_error(capsys, fragment)


def test_without_lm_eval_the_error_names_the_extra(llama_dir, text_file, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    assert main(_eval(llama_dir, text_file, "--tasks", "hellaswag")) == 2
    _one_line_error(capsys, "pip install 'sparsecraft[tasks]'")
