"""Activation sparsity (sparsecraft.activation): sparsity reproduced on calibration data, the masks' semantics,
bit-exact save/load, and bad input as one-line errors with nothing written."""

from __future__ import annotations

import shutil

import pytest
import torch

import sparsecraft
from conftest import VOCAB, build_model
from sparsecraft.activation import activate, counting, install, installed, installed_sites, remove, save_activation
from sparsecraft.cli import main
from sparsecraft.errors import ConfigError, ModelError


def _ids(n=8, seqlen=48, seed=3):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _measured_on(model, ids, report) -> tuple[float, dict]:
    """Byte-weighted sparsity the installed masks produce on a full forward over `ids`, and per site."""
    with counting(model) as counter, torch.no_grad():
        model(input_ids=ids)
    per_module = counter.result()
    total = sum(s["bytes"] for s in report.sites)
    weighted = sum(per_module[s["modules"][0]] * s["bytes"] for s in report.sites) / total
    return weighted, {(s["block"], s["key"]): per_module[s["modules"][0]] for s in report.sites}


@pytest.mark.parametrize("method", ["teal", "wina", "cats", "chess"])
@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_sparsity_reproduced_on_calibration_data(method, allocation):
    model = build_model("llama")
    ids = _ids()
    model, report = activate(model, ids, method=method, sparsity=0.4, allocation=allocation, progress=False)
    assert report.target == pytest.approx(0.4, abs=1e-9)  # byte-weighted, exact by construction
    weighted, per_site = _measured_on(model, ids, report)
    assert abs(weighted - 0.4) <= 0.01
    if allocation == "uniform":
        assert all(abs(v - 0.4) <= 0.01 for v in per_site.values()), per_site
    else:
        for site in report.sites:  # each site at its own greedy level
            assert abs(per_site[(site["block"], site["key"])] - site["target"]) <= 0.01


def test_sites_of_each_method():
    model = build_model("llama")
    ids = _ids(4)
    expect = {"teal": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
              "wina": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
              "cats": {"act_fn"}, "chess": {"q_proj", "o_proj", "act_fn"}}
    for method, names in expect.items():
        activate(model, ids, method=method, sparsity=0.3, progress=False)
        sites = installed_sites(model)
        assert {n.rsplit(".", 1)[-1] for n in sites} == names
        assert len(sites) == 2 * len(names)  # two blocks
        per_channel = {n.rsplit(".", 1)[-1]: t.dim() == 1 for n, t in installed(model).items()}
        if method == "wina":
            assert all(per_channel.values())
        elif method == "chess":
            assert per_channel == {"q_proj": False, "o_proj": False, "act_fn": True}
        else:
            assert not any(per_channel.values())
        remove(model)
        assert installed(model) == {}


def test_input_mask_equals_masked_dense_reference():
    model = build_model("llama")
    activate(model, _ids(4), method="wina", sparsity=0.5, progress=False)
    name = "model.layers.1.mlp.down_proj"
    layer = dict(model.named_modules())[name]
    t = installed(model)[name]
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.linear(torch.where(x.abs() < t, torch.zeros_like(x), x), layer.weight)
    assert torch.equal(layer(x), ref)
    # shared inputs share one threshold
    th = installed(model)
    assert torch.equal(th["model.layers.0.self_attn.q_proj"], th["model.layers.0.self_attn.k_proj"])


def test_decode_policy_leaves_prefill_dense():
    model = build_model("llama")
    ids = _ids(2, 16)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    _, report = activate(model, _ids(4), method="teal", sparsity=0.5, progress=False, policy="decode")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, dense)  # 16-token forwards are prefill
        one = model(input_ids=ids[:, :1]).logits
        install(model, installed(model), installed_sites(model), "all")
        assert torch.equal(model(input_ids=ids[:, :1]).logits, one)


def test_zero_sparsity_changes_nothing():
    model = build_model("llama")
    ids = _ids(2, 16)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    activate(model, _ids(4), method="teal", sparsity=0.0, progress=False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, dense)


def test_save_load_bit_exact(tmp_path, byte_tokenizer):
    from transformers import AutoModelForCausalLM

    model = build_model("llama")
    ids = _ids(2, 16)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    activate(model, _ids(), method="chess", sparsity=0.4, allocation="greedy", progress=False)
    with torch.no_grad():
        sparse = model(input_ids=ids).logits
    assert not torch.equal(sparse, dense)
    out = save_activation(model, tmp_path / "act", tokenizer=byte_tokenizer)
    assert (out / "activation" / "thresholds.safetensors").is_file()
    loaded = sparsecraft.load(out)
    a, b = installed(model), installed(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert installed_sites(loaded) == installed_sites(model)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, sparse)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # transformers alone: the dense model
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, dense)
    assert loaded.sparsecraft["activation"]["recipe"]["method"] == "chess"


def test_thresholds_from_another_model_refused(tmp_path, byte_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = build_model("llama")
    activate(model, _ids(4), method="teal", sparsity=0.4, progress=False)
    out = save_activation(model, tmp_path / "act", tokenizer=byte_tokenizer)
    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128)).eval()
    activate(wider, _ids(4), method="wina", sparsity=0.4, progress=False)  # per-feature: 96 for down_proj
    other = save_activation(wider, tmp_path / "other", tokenizer=byte_tokenizer)
    shutil.copy(other / "activation" / "thresholds.safetensors", out / "activation" / "thresholds.safetensors")
    with pytest.raises(ModelError, match="down_proj.*shape|calibrated for another model"):
        sparsecraft.load(out)
    deeper = build_model("llama")
    from sparsecraft.activation import check_thresholds

    with pytest.raises(ModelError, match="no module 'model.layers.7"):
        check_thresholds(deeper, {"model.layers.7.mlp.down_proj": torch.tensor(0.1)},
                         {"model.layers.7.mlp.down_proj": "input"})


def test_api_bad_input():
    model = build_model("llama")
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"activation sparsity must be in \[0, 1\)"):
            activate(model, _ids(2), method="teal", sparsity=bad, progress=False)
    with pytest.raises(ConfigError, match="unknown activation method 'relu'"):
        activate(model, _ids(2), method="relu", progress=False)
    with pytest.raises(ConfigError, match="cats.*gated MLP.*use teal or wina"):
        activate(build_model("gpt2"), _ids(2), method="cats", progress=False)
    assert installed(model) == {}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsecraft: error: "), err
    return err[0]


def test_cli_activate_and_eval(tmp_path, llama_dir, text_file, capsys):
    out = tmp_path / "act"
    rc = main(["activate", str(llama_dir), "--method", "teal", "--sparsity", "0.4", "--allocation", "greedy",
               "--data", str(text_file), "--nsamples", "4", "--seqlen", "64", "--eval-data", "none", "--quiet",
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "down_proj" in text and "ppl" in text
    meta = sparsecraft.load(out).sparsecraft["activation"]
    assert meta["target"] == pytest.approx(0.4, abs=1e-9)
    assert abs(meta["measured"] - 0.4) <= 0.01
    assert meta["evaluation"]["perplexity"] != meta["evaluation"]["dense_perplexity"]  # thresholds applied
    rc = main(["eval", str(out), "--data", str(text_file), "--seqlen", "64", "--eval-data", "none", "--quiet",
               "--json", str(tmp_path / "e.json")])
    assert rc == 0
    import json

    result = json.loads((tmp_path / "e.json").read_text())
    assert result["perplexity"] == pytest.approx(meta["evaluation"]["perplexity"], rel=1e-9)
    assert set(result["activation"]["per_projection"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"}


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", "1.0"], r"activation sparsity must be in \[0, 1\)"),
    (["--sparsity", "-0.2"], r"activation sparsity must be in \[0, 1\)"),
    (["--method", "relu"], "unknown activation method"),
    (["--greedy-step", "0"], "greedy_step"),
    (["--nsamples", "0"], "nsamples must be a positive integer"),
])
def test_cli_bad_input(tmp_path, llama_dir, text_file, capsys, argv, message):
    out = tmp_path / "act"
    rc = main(["activate", str(llama_dir), "--data", str(text_file), "--no-eval", "--quiet", "--out", str(out),
               *argv])
    assert rc == 2
    import re

    assert re.search(message, _one_error_line(capsys))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_gated_method_on_gpt2(tmp_path, byte_tokenizer, text_file, capsys):
    model_dir = tmp_path / "gpt2"
    build_model("gpt2").save_pretrained(model_dir)
    byte_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "act"
    rc = main(["activate", str(model_dir), "--method", "chess", "--data", str(text_file), "--nsamples", "2",
               "--seqlen", "32", "--no-eval", "--quiet", "--out", str(out)])
    assert rc == 2
    line = _one_error_line(capsys)
    assert "chess" in line and "use teal or wina" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


@pytest.mark.real_model
def test_real_model_teal_and_wina():
    model, tokenizer = sparsecraft.load_model("default")
    splits = sparsecraft.load_text("builtin")
    from sparsecraft.data import calibration_batch, evaluation_windows, tokenize
    from sparsecraft.evaluate import perplexity

    ids = calibration_batch(tokenize(tokenizer, splits.calibration), 2, 128, 0)
    windows = evaluation_windows(tokenize(tokenizer, splits.evaluation), 128)[:2]
    dense = perplexity(model, windows, progress=False)
    model, report = activate(model, ids, method="teal", sparsity=0.4, progress=False)
    weighted, per_site = _measured_on(model, ids, report)
    assert abs(weighted - 0.4) <= 0.01 and all(abs(v - 0.4) <= 0.01 for v in per_site.values())
    assert len(installed(model)) == 30 * 7
    teal = perplexity(model, windows, progress=False)
    assert dense < teal < 2 * dense
