"""Many transformers architectures, tiny and randomly initialised: each is found block by block, pruned with a
calibrated method, keeps the pattern, and survives save/load, compressed export and the CPU kernels bit for bit
(or to float tolerance for the kernels). Guards the general case beyond the LLaMA/OPT/GPT-2 fixtures."""

from __future__ import annotations

import warnings

import pytest
import torch

import sparsecraft
from sparsecraft.models import select_targets, weight_matrix
from sparsecraft.moe import expert_matrices, is_fused_experts
from sparsecraft.patterns import Pattern, is_nm_valid

VOCAB = 96
DECODER = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
GPT_STYLE = {"vocab_size": VOCAB, "n_embd": 64, "n_layer": 2, "n_head": 4}
ARCHS = {
    "MistralConfig": DECODER,
    "Qwen2Config": DECODER,
    "Qwen3Config": {**DECODER, "head_dim": 16},
    "Gemma2Config": {**DECODER, "head_dim": 16},
    "Gemma3TextConfig": {**DECODER, "head_dim": 16},
    "Phi3Config": {**DECODER, "pad_token_id": 0},
    "PhiConfig": DECODER,
    "Olmo2Config": DECODER,
    "CohereConfig": DECODER,
    "Qwen2MoeConfig": {**DECODER, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                       "shared_expert_intermediate_size": 64},
    "GPTNeoXConfig": DECODER,
    "FalconConfig": {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    "BloomConfig": {"vocab_size": VOCAB, "hidden_size": 64, "n_layer": 2, "n_head": 4},
    "GPTJConfig": {**GPT_STYLE, "rotary_dim": 8, "n_positions": 128},
    "GPTBigCodeConfig": {**GPT_STYLE, "n_positions": 128},
    "MptConfig": {"vocab_size": VOCAB, "d_model": 64, "n_layers": 2, "n_heads": 4},
}


def build(config_name: str):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**ARCHS[config_name])
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("config_name", list(ARCHS))
def test_prune_save_export_and_kernels(config_name, tmp_path):
    model = build(config_name)
    ids = torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = sparsecraft.prune(model, ids, method="sparsegpt", pattern="2:4", refine=["dsnot"],
                                      nsamples=8, seqlen=32, progress=False)
    assert not [w for w in caught if "stay dense" in str(w.message)]  # every block weight was pruned
    targets = select_targets(model)
    assert {t.block for t in targets} == {0, 1}  # found the two transformer blocks, calibrated in sequence
    matrices = {t.name: weight_matrix(t.module) for t in targets}
    for name, module in model.named_modules():  # fused MoE experts (Qwen2-MoE): pruned per expert
        if is_fused_experts(module):
            matrices.update({f"{name}.{suffix}": w for suffix, w in expert_matrices(module)})
    assert set(matrices) == {r.name for r in report.layers}
    for name, w in matrices.items():
        assert is_nm_valid(w, Pattern(2, 4)) and int((w == 0).sum()) == w.numel() // 2, name
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()

    sparsecraft.save(model, tmp_path / "pruned", report=report)
    sparsecraft.export(tmp_path / "pruned", tmp_path / "packed", "2:4")
    for path in ("pruned", "packed"):
        back = sparsecraft.load(tmp_path / path, kernels=False)
        with torch.no_grad():
            assert torch.equal(back(ids).logits, logits), path

    if sparsecraft.kernels.available():
        swapped = sparsecraft.sparsify_model(model)
        assert {n for n, kind in swapped.items() if kind == "bitmask"} >= {t.name for t in targets}
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, logits, rtol=1e-4, atol=1e-4)
