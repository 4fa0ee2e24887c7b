"""Perplexity and sparsity accounting."""

from __future__ import annotations

import math

import pytest
import torch

import sparsecraft
from conftest import build_model
from sparsecraft.errors import ConfigError, DataError
from sparsecraft.evaluate import layer_sparsity, overall_sparsity, perplexity


def test_perplexity_matches_model_loss(tiny_model):
    windows = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss = tiny_model(input_ids=windows, labels=windows).loss  # mean next-token NLL
    for batch_size in (1, 4, 6):  # equal-length windows: batching does not change the mean
        assert perplexity(tiny_model, windows, batch_size=batch_size, progress=False) == pytest.approx(
            math.exp(float(loss)), rel=1e-4)


def test_perplexity_restores_training_mode(tiny_llama):
    tiny_llama.train()
    perplexity(tiny_llama, torch.zeros(1, 8, dtype=torch.long), progress=False)
    assert tiny_llama.training


def test_layer_sparsity_counts_zeros(tiny_llama):
    layers = layer_sparsity(tiny_llama)
    assert len(layers) == 14 and overall_sparsity(layers) == 0.0
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.down_proj.weight[:, :32] = 0  # [64, 128]: a quarter of this layer
    layers = layer_sparsity(tiny_llama)
    entry = layers["model.layers.0.mlp.down_proj"]
    assert entry == {"shape": [64, 128], "zeros": 64 * 32, "sparsity": 0.25}
    total = sum(v["shape"][0] * v["shape"][1] for v in layers.values())
    assert overall_sparsity(layers) == pytest.approx(64 * 32 / total)
    everything = layer_sparsity(tiny_llama, in_blocks_only=False)
    assert "lm_head" in everything and "lm_head" not in layers


def test_gpt2_layer_shapes_are_out_in():
    layers = layer_sparsity(build_model("gpt2"))
    assert layers["transformer.h.0.attn.c_attn"]["shape"] == [192, 64]
    assert layers["transformer.h.0.mlp.c_proj"]["shape"] == [64, 256]


def test_evaluate_api(tiny_llama):
    tokens = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0))
    result = sparsecraft.evaluate(tiny_llama, tokens, seqlen=32, max_windows=4, progress=False)
    assert result["windows"] == 4 and result["tokens"] == 128 and result["data"] == "tokens"
    expected = perplexity(tiny_llama, tokens[:128].reshape(4, 32), progress=False)
    assert result["perplexity"] == pytest.approx(expected)
    with pytest.raises(ConfigError):
        sparsecraft.evaluate(tiny_llama, tokens, seqlen=1, progress=False)
    with pytest.raises(ConfigError):
        sparsecraft.evaluate(tiny_llama, tokens, seqlen=32, max_windows=0, progress=False)
    with pytest.raises(DataError):
        sparsecraft.evaluate(tiny_llama, tokens[:50], seqlen=100, progress=False)
    with pytest.raises(ConfigError, match="longer than the model's context"):
        sparsecraft.evaluate(tiny_llama, tokens, seqlen=512, progress=False)
    with pytest.raises(ConfigError, match="batch size"):
        sparsecraft.evaluate(tiny_llama, tokens, seqlen=32, batch_size=0, progress=False)
