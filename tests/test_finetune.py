"""Recovery fine-tuning: exact masks, the losses against hand computation, the GMP schedule, kill-and-resume
equivalence, the CLI and its errors. Tiny random models and short runs only."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sparsecraft
from conftest import build_model, floor_count, make_text
from sparsecraft.checkpoint import read_metadata
from sparsecraft.cli import main
from sparsecraft.data import split_documents
from sparsecraft.errors import ConfigError, DataError, ModelError
from sparsecraft.models import select_targets, weight_matrix
from sparsecraft.patterns import Pattern, is_nm_valid
from sparsecraft.recovery import FinetuneConfig, finetune
from sparsecraft.recovery.batches import WindowStream, pack
from sparsecraft.recovery.losses import causal_lm_loss, kd_loss, squarehead_loss
from sparsecraft.recovery.masks import MaskManager
from sparsecraft.recovery.schedules import cubic_sparsity, gmp_masks, layer_keep_mask, update_steps
from sparsecraft.recovery.trainer import checkpoints
from test_cli import assert_one_line_error

SMALL = {"seqlen": 16, "batch_size": 1, "progress": False}


@pytest.fixture(scope="module")
def splits():
    with pytest.warns(UserWarning, match="too small to hold text out"):  # 4 sections: evaluation reuses them
        return split_documents("tiny", [make_text(10, 150)])


def pruned(model, pattern="2:4", sparsity=None):
    sparsecraft.prune(model, None, method="magnitude", pattern=pattern, sparsity=sparsity, progress=False)
    return model


def zeros(model) -> dict[str, torch.Tensor]:
    return {t.name: t.module.weight.detach() == 0 for t in select_targets(model)}


# ------------------------------------------------------------------------------------------------------ masks


def test_mask_kept_exactly_with_large_lr(splits, byte_tokenizer, tmp_path):
    teacher = build_model("llama")
    student = pruned(copy.deepcopy(teacher), "unstructured", 0.6)
    before = zeros(student)
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    ckpt = tmp_path / "ckpt"
    model, result = finetune(student, teacher, splits, tokenizer=byte_tokenizer, steps=50, lr=0.1,
                             weight_decay=0.1, max_grad_norm=0, warmup_steps=0, lr_schedule="constant",
                             checkpoint_dir=ckpt, checkpoint_every=25, evaluate=False, **SMALL)
    assert result.steps == 50 and len(result.history) == 50
    after = zeros(model)
    for name, mask in before.items():
        assert torch.equal(after[name], mask), name  # exactly the same zeros: none revived, none added
    moved = [n for n, p in model.named_parameters() if "layers" in n and not torch.equal(p, start[n])]
    assert len(moved) == len(list(n for n, _ in model.named_parameters() if "layers" in n))
    assert result.sparsity == pytest.approx(0.6, abs=1e-3)

    # the optimizer state saved at step 25: Adam moments exactly zero at every masked entry
    opt = torch.load(checkpoints(ckpt)[-1] / "optimizer.bin", weights_only=False)
    trainable = [n for n, _ in model.named_parameters() if n not in ("model.embed_tokens.weight", "lm_head.weight")]
    masked = 0
    for index, name in enumerate(trainable):
        module_name = name.rsplit(".", 1)[0]
        if module_name not in before or not name.endswith("weight"):
            continue
        state = opt["state"][index]
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].shape == before[module_name].shape
            assert bool((state[key][before[module_name]] == 0).all()), (name, key)
            assert bool((state[key][~before[module_name]] != 0).any())
        masked += 1
    assert masked == 14


def test_dense_schedule_trains_every_weight(splits, byte_tokenizer):
    """schedule=dense (adapting a teacher): no mask, so pruned zeros are trained like every other weight."""
    model = pruned(build_model("llama"), "unstructured", 0.5)
    before = zeros(model)
    model, result = finetune(model, None, splits, tokenizer=byte_tokenizer, steps=3, lr=0.01, distill="none",
                             schedule="dense", warmup_steps=0, evaluate=False, **SMALL)
    after = zeros(model)
    assert result.sparsity < 0.01
    assert all(not after[name][mask].any() for name, mask in before.items())  # every former zero moved


def test_mask_manager_gradient_and_state_with_adamw():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    keep = torch.rand(4, 8) > 0.5
    with torch.no_grad():
        layer.weight.mul_(keep)
    masks = MaskManager({"w": layer.weight}, {"w": layer.weight.detach() != 0})
    opt = torch.optim.AdamW(layer.parameters(), lr=0.5, weight_decay=0.5)
    for _ in range(20):
        layer(torch.randn(16, 8)).pow(2).sum().backward()
        masks.mask_gradients()
        assert bool((layer.weight.grad[~keep] == 0).all())
        opt.step()
        opt.zero_grad()
        masks.apply()
    assert torch.equal(layer.weight != 0, keep)
    for key in ("exp_avg", "exp_avg_sq"):
        assert bool((opt.state[layer.weight][key][~keep] == 0).all())
    # a mask update (gradual pruning) zeroes the newly pruned weights and their optimizer state
    tighter = keep & (torch.rand(4, 8) > 0.5)
    masks.update({"w": tighter}, opt)
    assert torch.equal(layer.weight != 0, tighter) and masks.check() == []
    for key in ("exp_avg", "exp_avg_sq"):
        assert bool((opt.state[layer.weight][key][~tighter] == 0).all())
    # NaN/inf never leak into masked entries
    with torch.no_grad():
        layer.weight.fill_(float("nan"))
    masks.apply()
    assert bool((layer.weight[~tighter] == 0).all())


# ----------------------------------------------------------------------------------------------------- losses


def test_causal_lm_loss_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]]])
    ids = torch.tensor([[0, 2, 1]])

    def nll(row, target):
        return math.log(sum(math.exp(v) for v in row)) - row[target]

    expected = (nll([1.0, 2.0, 0.5], 2) + nll([0.0, -1.0, 3.0], 1)) / 2
    assert float(causal_lm_loss(logits, ids)) == pytest.approx(expected, rel=1e-6)


def test_kd_loss_by_hand_with_temperature_and_chunks():
    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]], requires_grad=True)
    t = torch.tensor([[[0.0, 2.0, 1.0], [1.0, 1.0, 1.0]]])
    T = 2.0

    def softmax(row):
        e = [math.exp(v / T) for v in row]
        return [x / sum(e) for x in e]

    expected = 0.0
    for srow, trow in zip(s[0].tolist(), t[0].tolist()):
        ps, pt = softmax(srow), softmax(trow)
        expected += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    expected = expected / 2 * T * T
    whole = kd_loss(s, t, temperature=T, chunk=1024)
    assert float(whole.detach()) == pytest.approx(expected, rel=1e-6)
    (grad_whole,) = torch.autograd.grad(whole, s)
    chunked = kd_loss(s, t, temperature=T, chunk=1)  # each token its own recomputed chunk
    assert float(chunked.detach()) == pytest.approx(expected, rel=1e-6)
    (grad_chunked,) = torch.autograd.grad(chunked, s)
    assert torch.allclose(grad_whole, grad_chunked, atol=1e-7)
    assert float(kd_loss(t, t, temperature=T)) == pytest.approx(0.0, abs=1e-7)


def test_squarehead_loss_by_hand():
    s1, t1 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    s2, t2 = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[3.0, 0.0, 0.0]])
    # block 1: MSE = (0 + 1 + 1 + 4) / 4 = 1.5, teacher mean square = (1 + 1 + 4 + 4) / 4 = 2.5
    # block 2: MSE = (9 + 0 + 1) / 3, teacher mean square = 9 / 3
    expected = 1.5 / 2.5 + (10 / 3) / 3
    assert float(squarehead_loss([s1, s2], [t1, t2])) == pytest.approx(expected, rel=1e-6)
    assert float(squarehead_loss([t1, t2], [t1, t2])) == 0.0


def test_distillation_losses_are_zero_against_itself(splits, byte_tokenizer):
    teacher = build_model("llama")
    with torch.no_grad():  # one zeroed layer, so that `constant` has a mask; the student is the teacher's copy
        teacher.model.layers[0].mlp.up_proj.weight.mul_(0)
    student = copy.deepcopy(teacher)
    _, result = finetune(student, teacher, splits, tokenizer=byte_tokenizer, steps=1, distill="squarehead",
                         evaluate=False, **SMALL)
    first = result.history[0]
    assert first["kd"] == pytest.approx(0.0, abs=1e-6) and first["squarehead"] == pytest.approx(0.0, abs=1e-6)
    assert first["ce"] > 1 and first["loss"] == pytest.approx(first["ce"], rel=1e-5)


# -------------------------------------------------------------------------------------------------- schedule


def test_cubic_schedule_values():
    assert cubic_sparsity(0, 0.7, 0.0, 0, 10) == 0.0
    assert cubic_sparsity(5, 0.7, 0.0, 0, 10) == pytest.approx(0.7 - 0.7 * 0.5 ** 3)
    assert cubic_sparsity(2, 0.7, 0.1, 0, 10) == pytest.approx(0.7 + (0.1 - 0.7) * 0.8 ** 3)
    assert cubic_sparsity(10, 0.7, 0.0, 0, 10) == 0.7
    assert cubic_sparsity(15, 0.7, 0.0, 0, 10) == 0.7
    assert cubic_sparsity(3, 0.5, 0.2, 5, 9) == 0.2  # before t0
    values = [cubic_sparsity(t, 0.9, 0.0, 0, 20) for t in range(21)]
    assert values == sorted(values)
    assert update_steps(0, 10, 3) == [0, 3, 6, 9, 10]
    assert update_steps(2, 8, 2) == [2, 4, 6, 8]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_layer_keep_mask_counts_and_monotone(pattern):
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    pat = Pattern.parse(pattern)
    final = 0.5 if pat.is_nm else 0.7
    keep = torch.ones_like(w, dtype=torch.bool)
    for s in (0.1, 0.3, final * 0.9, final):
        new = layer_keep_mask(w * keep, keep, s, pat)
        assert not bool((new & ~keep).any())  # never revived
        if pat.is_nm:
            assert ((~new).sum(1) == floor_count(16, s)).all()
        else:
            assert int((~new).sum()) == floor_count(96, s)
        keep = new
    if pat.is_nm:
        assert is_nm_valid(w * keep, pat)


@pytest.mark.parametrize("pattern, score", [("unstructured", "magnitude"), ("2:4", "magnitude"),
                                            ("unstructured", "wanda")])
def test_gmp_reaches_exact_sparsity(splits, byte_tokenizer, pattern, score):
    model = build_model("llama")
    sparsity = None if pattern == "2:4" else 0.7
    model, result = finetune(model, None, splits, tokenizer=byte_tokenizer, schedule="gmp", pattern=pattern,
                             sparsity=sparsity, score=score, steps=8, prune_every=2, prune_end=6, distill="none",
                             evaluate=False, **SMALL)
    target = 0.5 if pattern == "2:4" else 0.7
    curve = [r["sparsity"] for r in result.history]
    assert curve == sorted(curve) and curve[0] == 0 and 0 < curve[1] < curve[5] == curve[-1]
    for t in select_targets(model):
        w = weight_matrix(t.module)
        if pattern == "2:4":
            assert is_nm_valid(w, Pattern(2, 4)) and int((w == 0).sum()) == w.numel() // 2
        elif score == "wanda":  # compared per row
            assert ((w == 0).sum(1) == floor_count(w.shape[1], 0.7)).all()
        else:  # compared across the layer
            assert int((w == 0).sum()) == floor_count(w.numel(), 0.7)
    if score == "magnitude":  # Wanda floors per row (64 x 0.7 -> 44 of 64), so a little under 70% here
        assert result.sparsity == pytest.approx(target, abs=1e-4)
    assert result.config["schedule"] == "gmp"


def test_gmp_distills_from_a_copy_of_the_dense_in_memory_student(splits, byte_tokenizer):
    """An in-memory student records no source model; for gradual pruning its dense self (copied before the first
    step) is the default teacher, so KD starts at zero and the given module is pruned in place."""
    model = build_model("llama")
    seen = []
    out, result = finetune(model, None, splits, tokenizer=byte_tokenizer, schedule="gmp", sparsity=0.5, steps=3,
                           prune_start=1, prune_every=1, distill="kd", lr=0.01, evaluate=False,
                           on_step=lambda step, record: seen.append(record), **SMALL)
    assert seen[0]["kd"] == pytest.approx(0.0, abs=1e-6)  # step 0: still dense, the teacher is itself
    assert seen[-1]["kd"] > 1e-4
    assert result.sparsity == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ConfigError, match="needs a teacher"):  # a pruned in-memory student has no dense self
        finetune(out, None, splits, tokenizer=byte_tokenizer, steps=1, distill="kd", evaluate=False, **SMALL)


def test_gmp_masks_transposed_conv1d():
    model = build_model("gpt2")
    targets = select_targets(model)
    masks = {t.name: torch.ones_like(t.module.weight, dtype=torch.bool) for t in targets}
    new = gmp_masks(targets, masks, 0.5, Pattern(2, 4))
    for t in targets:  # Conv1D stores [in, out]: the groups run along the inputs of weight_matrix
        assert new[t.name].shape == t.module.weight.shape
        assert is_nm_valid(weight_matrix(t.module) * new[t.name].t(), Pattern(2, 4))


# ----------------------------------------------------------------------------------------------------- data


def test_packing_and_batch_order():
    tokens = torch.arange(100)
    windows = pack(tokens, 8)
    assert windows.shape == (12, 8) and torch.equal(windows.reshape(-1), tokens[:96])
    stream = WindowStream(windows, batch_size=2, grad_accum=3, seed=1)
    epoch = [i for step in range(2) for micro in range(3) for i in stream.indices(step, micro)]
    assert sorted(epoch) == list(range(12))  # one epoch: every window once
    assert WindowStream(windows, 2, 3, seed=1).indices(5, 1) == stream.indices(5, 1)  # a function of the step
    ranks = [WindowStream(windows, 2, 1, seed=1, world=2, rank=r) for r in range(2)]
    assert not set(ranks[0].indices(0, 0)) & set(ranks[1].indices(0, 0))
    with pytest.raises(DataError, match="fewer than one batch"):
        WindowStream(windows, 7, 1, seed=0, world=2)
    with pytest.raises(DataError, match="shorter than one window"):
        pack(tokens, 101)


def test_training_text_is_disjoint_from_evaluation():
    s = sparsecraft.load_text("builtin")
    held = set(s.evaluation.split("\n\n"))
    assert not [p for p in s.calibration.split("\n\n") if p.strip() and p in held]


def test_config_yaml_round_trip(tmp_path):
    cfg = FinetuneConfig(steps=30, schedule="gmp", pattern="2:4", distill="kd", temperature=2.0, lr=3e-4)
    cfg.to_yaml(tmp_path / "f.yaml")
    again = FinetuneConfig.from_yaml(tmp_path / "f.yaml")
    assert again == cfg and again.sparsity == 0.5 and again.weights == (1.0, 1.0, 0.0)
    assert FinetuneConfig(distill="squarehead", ce_weight=0).weights == (0.0, 1.0, 1.0)
    with pytest.raises(ConfigError, match="unknown finetune config keys"):
        FinetuneConfig.from_dict({"stepz": 3})


@pytest.mark.parametrize("fields, fragment", [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"steps": -3}, "steps must be a positive integer"),
    ({"schedule": "gmp"}, "needs --sparsity"),
    ({"schedule": "constant", "sparsity": 0.5}, "drop them"),
    ({"schedule": "gmp", "sparsity": 0.5, "prune_end": 500}, "prune_end"),
    ({"distill": "everything"}, "unknown distill"),
    ({"ce_weight": 0, "kd_weight": 0, "squarehead_weight": 0}, "every loss weight is 0"),
    ({"temperature": 0}, "temperature"),
    ({"lr": -1}, "lr must be > 0"),
])
def test_config_errors(fields, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        FinetuneConfig(**fields)


# -------------------------------------------------------------------------------------------- kill and resume


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_interrupted_run_resumes_to_the_same_weights(splits, byte_tokenizer, tmp_path):
    """GPT-2 has dropout, so this also checks that the RNG states come back; gradual pruning with Wanda
    scores checks that the masks and the activation statistics between updates come back."""
    kwargs = dict(steps=7, schedule="gmp", sparsity=0.5, score="wanda", prune_every=2, prune_start=1,
                  distill="squarehead", checkpoint_every=2, grad_accum=2, evaluate=False, tokenizer=byte_tokenizer,
                  **SMALL)
    teacher = build_model("gpt2")
    whole, whole_result = finetune(build_model("gpt2"), teacher, splits, checkpoint_dir=tmp_path / "a", **kwargs)
    with pytest.raises(KeyboardInterrupt):
        finetune(build_model("gpt2"), teacher, splits, checkpoint_dir=tmp_path / "b", stop_after=3, **kwargs)
    assert [p.name for p in checkpoints(tmp_path / "b")] == ["checkpoint-000002", "checkpoint-000004"]
    resumed, resumed_result = finetune(build_model("gpt2", seed=5), teacher, splits, checkpoint_dir=tmp_path / "b",
                                       resume=True, **kwargs)
    assert resumed_result.resumed_from == 4
    a, b = _params(whole), _params(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a), [n for n in a if not torch.equal(a[n], b[n])]
    assert resumed_result.history == whole_result.history


def test_killed_cli_run_resumes_to_the_same_result(llama_dir, text_file, tmp_path, capsys):
    pruned_dir = tmp_path / "pruned"
    assert main(["prune", "--model", str(llama_dir), "--method", "magnitude", "--pattern", "2:4", "--data",
                 str(text_file), "--no-eval", "--quiet", "--out", str(pruned_dir)]) == 0
    args = ["finetune", str(pruned_dir), "--data", str(text_file), "--seqlen", "16", "--batch-size", "1",
            "--steps", "12", "--checkpoint-every", "3", "--keep-checkpoints", "2", "--no-eval", "--quiet",
            "--distill", "kd"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    # the same command in a child process, slowed down (0.3 s a step) and killed with SIGKILL after a checkpoint
    killed = tmp_path / "killed"
    ckpt = Path(str(killed) + ".checkpoints")
    driver = ("import sys, time\nimport sparsecraft.recovery.trainer as t\norig = t._losses\n"
              "t._losses = lambda *a, **k: (time.sleep(0.3), orig(*a, **k))[1]\n"
              "from sparsecraft.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", driver, *args, "--out", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not checkpoints(ckpt) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert checkpoints(ckpt) and not killed.exists()
    capsys.readouterr()
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed at step" in out
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = json.loads((tmp_path / "whole" / "finetune_log.json").read_text())
    log_b = json.loads((killed / "finetune_log.json").read_text())
    assert log_a["history"] == log_b["history"] and len(log_a["history"]) == 12
    assert not ckpt.exists()  # cleaned up once the model is saved


# ------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, llama_dir, text_file):
    out = tmp_path_factory.mktemp("ft") / "pruned"
    assert main(["prune", "--model", str(llama_dir), "--method", "magnitude", "--sparsity", "0.5", "--data",
                 str(text_file), "--no-eval", "--quiet", "--out", str(out)]) == 0
    return out


def test_cli_finetune_then_eval(capsys, pruned_dir, llama_dir, text_file, tmp_path):
    out = tmp_path / "tuned"
    rc = main(["finetune", str(pruned_dir), "--data", str(text_file), "--seqlen", "16", "--batch-size", "2",
               "--steps", "4", "--max-eval-windows", "3", "--eval-every", "2", "--periodic-eval-windows", "2",
               "--quiet", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "before" in captured.out and "after" in captured.out and str(out) in captured.out
    meta = read_metadata(out)
    assert meta["source_model"] == str(llama_dir)  # the teacher it used by default, kept for the next run
    assert meta["recipe"]["method"] == "magnitude" and (out / "recipe.yaml").is_file()
    ft = meta["finetune"]
    assert ft["steps"] == 4 and ft["config"]["teacher"] == str(llama_dir) and ft["config"]["distill"] == "squarehead"
    assert [e["step"] for e in ft["evaluations"]] == [2]
    assert meta["sparsity"] == pytest.approx(0.5) and meta["evaluation"]["windows"] == 3
    assert math.isfinite(meta["evaluation"]["perplexity"])
    log = json.loads((out / "finetune_log.json").read_text())
    assert [r["step"] for r in log["history"]] == [1, 2, 3, 4]
    assert set(log["history"][0]) >= {"loss", "ce", "kd", "squarehead", "lr"}
    assert FinetuneConfig.from_yaml(out / "finetune.yaml").steps == 4
    assert not Path(str(out) + ".checkpoints").exists()

    rc = main(["eval", str(out), "--data", str(text_file), "--seqlen", "16", "--max-eval-windows", "3", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"{meta['evaluation']['perplexity']:.4g}" in captured.out


@pytest.fixture
def other_teacher(tmp_path, byte_tokenizer):
    def make(**config) -> Path:
        from transformers import LlamaConfig, LlamaForCausalLM

        base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        path = tmp_path / "teacher"
        LlamaForCausalLM(LlamaConfig(**{**base, **config})).save_pretrained(path)
        byte_tokenizer.save_pretrained(path)
        return path

    return make


@pytest.mark.parametrize("extra, fragment", [
    (["--steps", "0"], "steps must be a positive integer"),
    (["--schedule", "gmp"], "needs --sparsity"),
    (["--sparsity", "0.7"], "with --schedule constant"),
    (["--seqlen", "100000"], "longer than the model's context (128 positions)"),
    (["--seqlen", "120", "--batch-size", "512"], "fewer than one batch"),
    (["--resume"], "no checkpoint to resume from"),
    (["--schedule", "gmp", "--pattern", "2:3"], "not a multiple of 3"),
    (["--device", "tpu"], "device"),
])
def test_cli_errors(capsys, pruned_dir, text_file, tmp_path, extra, fragment):
    out = tmp_path / "out"
    rc = main(["finetune", str(pruned_dir), "--data", str(text_file), "--seqlen", "16", "--steps", "2", "--quiet",
               "--out", str(out), *extra])
    assert_one_line_error(capsys, rc, fragment)
    assert not out.exists()


@pytest.mark.parametrize("config, fragment", [
    ({"vocab_size": 128}, "different vocabularies (256 vs 128"),
    ({"num_hidden_layers": 3}, "2 transformer blocks and the teacher 3"),
    ({"hidden_size": 32, "intermediate_size": 128}, "hidden size"),
])
def test_cli_teacher_mismatch(capsys, pruned_dir, text_file, tmp_path, other_teacher, config, fragment):
    out = tmp_path / "out"
    teacher = other_teacher(**config)
    capsys.readouterr()  # drop save_pretrained's own progress output
    rc = main(["finetune", str(pruned_dir), "--teacher", str(teacher), "--data", str(text_file),
               "--seqlen", "16", "--steps", "2", "--quiet", "--out", str(out)])
    assert_one_line_error(capsys, rc, fragment)
    assert not out.exists()


def test_cli_dense_student_with_constant_schedule(capsys, llama_dir, text_file, tmp_path):
    out = tmp_path / "out"
    rc = main(["finetune", str(llama_dir), "--data", str(text_file), "--seqlen", "16", "--steps", "2", "--quiet",
               "--out", str(out)])
    assert_one_line_error(capsys, rc, "no sparsity to keep", "--schedule gmp")
    assert not out.exists() and not Path(str(out) + ".checkpoints").exists()


def test_cli_nothing_overwritten(capsys, pruned_dir, text_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    base = ["finetune", str(pruned_dir), "--data", str(text_file), "--seqlen", "16", "--steps", "2", "--quiet"]
    rc = main([*base, "--out", str(out)])
    assert_one_line_error(capsys, rc, "already exists", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    # checkpoints of an earlier run: refuse to start over unless --resume or --force; a resume with other
    # settings is refused too
    other = tmp_path / "other"
    ckpt = tmp_path / "ckpts"
    (ckpt / "checkpoint-000001").mkdir(parents=True)
    FinetuneConfig(steps=2, seqlen=16, data=str(text_file)).to_yaml(ckpt / "finetune.yaml")
    rc = main([*base, "--out", str(other), "--checkpoint-dir", str(ckpt)])
    assert_one_line_error(capsys, rc, "holds checkpoints of an earlier run", "--resume")
    rc = main([*base, "--out", str(other), "--checkpoint-dir", str(ckpt), "--resume", "--lr", "0.5"])
    assert_one_line_error(capsys, rc, "settings differ in lr")
    assert (ckpt / "checkpoint-000001").is_dir() and not other.exists()


def test_api_teacher_needed(splits, byte_tokenizer):
    student = pruned(build_model("llama"))
    with pytest.raises(ConfigError, match="needs a teacher"):
        finetune(student, None, splits, tokenizer=byte_tokenizer, steps=1, evaluate=False, **SMALL)
    with pytest.raises(ModelError, match="no sparsity to keep"):
        finetune(build_model("llama"), None, splits, tokenizer=byte_tokenizer, steps=1, distill="none", **SMALL)
    model, result = finetune(student, None, splits, tokenizer=byte_tokenizer, steps=1, distill="none",
                             evaluate=False, **SMALL)
    assert result.steps == 1 and "kd" not in {k for k, v in result.history[0].items() if v}
    assert sparsecraft.finetune is not None and isinstance(model, torch.nn.Module)
