"""Mixture-of-experts models whose routed experts transformers fuses into 3-D tensors: split into one linear layer
per expert (exactly the same forward), pruned per expert on the tokens routed to it, merged back into the
model's own format, fine-tuned with every expert's mask kept, and counted per expert in the sparsity reports."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers

import sparsecraft
from sparsecraft.errors import ModelError
from sparsecraft.evaluate import layer_sparsity, overall_sparsity
from sparsecraft.models import select_targets
from sparsecraft.moe import (
    ExpertLinears,
    calibrating_all_experts,
    expert_matrices,
    experts_split,
    is_fused_experts,
    merge_experts,
    split_experts,
)
from sparsecraft.patterns import Pattern, is_nm_valid

VOCAB = 96
BASE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
MOE = {
    "MixtralConfig": {**BASE, "num_local_experts": 4, "num_experts_per_tok": 2},
    "Qwen2MoeConfig": {**BASE, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                       "shared_expert_intermediate_size": 64},
    # transposed expert tensors, biases and its own clamped, interleaved gate
    "GptOssConfig": {**BASE, "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
                     "layer_types": ["full_attention"] * 2},
    "DeepseekV3Config": {**BASE, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                         "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1, "q_lora_rank": None,
                         "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 16},
}


def build(name: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**MOE[name])).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:  # some configs initialise the fused experts to zeros or tiny values
                p.normal_(0, 0.05)
    return model


def ids(n: int = 8, seqlen: int = 32):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(0))


def fused_modules(model):
    return {name: m for name, m in model.named_modules() if is_fused_experts(m)}


@pytest.mark.parametrize("name", list(MOE))
def test_split_is_the_same_model_and_merge_restores_it_bit_for_bit(name):
    """The split model computes the same logits (bit for bit on one thread; with several, the matmuls of separately
    allocated expert weights may sum in another order, ~1e-7), and merging restores the exact state_dict."""
    model = build(name)
    x = ids(2, 16)
    with torch.no_grad():
        reference = model(x).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fused_modules(model)
    assert len(fused) == 2
    names = split_experts(model)
    assert names == list(fused) and not fused_modules(model)
    experts = model.get_submodule(names[0])
    assert isinstance(experts, ExpertLinears) and experts.num_experts == 4
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference, rtol=1e-5, atol=1e-6)
    assert merge_experts(model) == names
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize("name", ["MixtralConfig", "GptOssConfig"])
def test_pruned_per_expert_then_merged_into_the_model_format(name, tmp_path):
    model = build(name)
    _, report = sparsecraft.prune(model, ids(), method="sparsegpt", pattern="2:4", nsamples=8, seqlen=32,
                                  progress=False)
    fused = fused_modules(model)
    assert len(fused) == 2  # merged back: transformers' own modules and 3-D tensors
    expert_layers = {f"{m}.{suffix}": w for m, module in fused.items() for suffix, w in expert_matrices(module)}
    assert len(expert_layers) == 2 * 4 * 2
    assert set(expert_layers) <= {r.name for r in report.layers}
    for layer, w in expert_layers.items():  # [out, in] per expert, groups along the input
        assert is_nm_valid(w, Pattern(2, 4)) and int((w == 0).sum()) == w.numel() // 2, layer
    counted = layer_sparsity(model)
    assert {n: v["sparsity"] for n, v in counted.items() if n in expert_layers} == dict.fromkeys(expert_layers, 0.5)

    with torch.no_grad():
        logits = model(ids(2, 16)).logits
    sparsecraft.save(model, tmp_path / "pruned", report=report)
    back = sparsecraft.load(tmp_path / "pruned", kernels=False)
    assert len(fused_modules(back)) == 2
    with torch.no_grad():
        assert torch.equal(back(ids(2, 16)).logits, logits)


@pytest.mark.parametrize("mode", ["routed", "all"])
def test_each_expert_is_calibrated_on_the_tokens_routed_to_it_or_on_all(mode):
    """Wanda on one expert weighs its columns by the norms of the inputs that expert received (routed, the
    default) or of every token (moe_calibration=all): recompute both from the router's choices with a hook and
    check the masks follow the chosen one (the other one differs in a few percent of the weights)."""
    model = build("MixtralConfig")
    block = model.model.layers[0].mlp
    inputs: dict[str, list[torch.Tensor]] = {"all": []} | {f"routed{e}": [] for e in range(4)}

    def capture(module, args, output):
        hidden, top_k_index = args[0], args[1]
        inputs["all"].append(hidden.detach().clone())
        for e in range(4):
            inputs[f"routed{e}"].append(hidden[(top_k_index == e).any(-1)].detach().clone())

    handle = block.experts.register_forward_hook(capture)
    with torch.no_grad():  # block 0 sees the dense embeddings whatever is pruned later
        model(ids())
    handle.remove()
    dense = {e: block.experts.gate_up_proj[e].detach().clone() for e in range(4)}
    sparsecraft.prune(model, ids(), method="wanda", sparsity=0.5, nsamples=8, seqlen=32, batch_size=8,
                      moe_calibration=mode, progress=False)
    for e in range(4):
        kept = block.experts.gate_up_proj[e] != 0
        assert torch.equal(kept.sum(1), torch.full((kept.shape[0],), kept.shape[1] // 2))
        agreement = {}
        for source in ("all", f"routed{e}"):
            x = torch.cat(inputs[source]).float()
            scores = dense[e].abs() * x.norm(dim=0).unsqueeze(0)
            mine = torch.zeros_like(kept)
            mine.scatter_(1, scores.argsort(dim=1, descending=True)[:, : kept.shape[1] // 2], True)
            agreement[source.rstrip("0123456789")] = float((mine == kept).float().mean())
        other = "all" if mode == "routed" else "routed"
        assert agreement[mode] > 0.99 > agreement[other], (e, agreement)  # the same mask up to float ties


def test_calibrating_all_experts_leaves_the_block_outputs_unchanged():
    model = build("Qwen2MoeConfig")
    x = ids(2, 16)
    with torch.no_grad():
        reference = model(x).logits
    with experts_split(model), calibrating_all_experts(model), torch.no_grad():
        assert all(m.calibrate_all for m in model.modules() if isinstance(m, ExpertLinears))
        torch.testing.assert_close(model(x).logits, reference, rtol=1e-5, atol=1e-6)


def test_finetune_keeps_every_expert_mask_and_returns_the_model_format(tmp_path):
    model = build("Qwen2MoeConfig")
    sparsecraft.prune(model, ids(), method="wanda", sparsity=0.5, nsamples=8, seqlen=32, progress=False)
    masks = {f"{m}.{s}": (w == 0).clone() for m, mod in fused_modules(model).items() for s, w in expert_matrices(mod)}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 3}
    data = tmp_path / "text.txt"
    data.write_text(" ".join(f"token{i % 37} word{i % 11}" for i in range(4000)))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_word_tokenizer())
    tuned, result = sparsecraft.finetune(model, None, str(data), tokenizer=tok, steps=4, lr=1e-2, seqlen=32,
                                         batch_size=2, distill="none", evaluate=False)
    assert tuned is model and len(fused_modules(tuned)) == 2
    for m, module in fused_modules(tuned).items():
        for suffix, w in expert_matrices(module):
            zeros = masks[f"{m}.{suffix}"]
            assert (w[zeros] == 0).all(), suffix
    moved = {n: p for n, p in tuned.named_parameters() if p.dim() == 3}
    assert moved.keys() == before.keys() and all(p.requires_grad for p in moved.values())
    assert all(not torch.equal(moved[n], before[n]) for n in before)  # the experts were trained
    assert result.sparsity == pytest.approx(overall_sparsity(layer_sparsity(tuned)))


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"token{i}": i for i in range(37)} | {f"word{i}": 37 + i for i in range(11)} | {"[UNK]": 48}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def test_split_inside_the_context_only():
    model = build("MixtralConfig")
    with experts_split(model) as names:
        assert len(names) == 2 and any(t.name.endswith(".3.down_proj") for t in select_targets(model))
    assert len(fused_modules(model)) == 2 and not any(isinstance(m, ExpertLinears) for m in model.modules())


@pytest.mark.parametrize("name", ["MixtralConfig", "GptOssConfig"])
def test_expert_permutation_folds_exactly_then_2_4_with_permute(name):
    """Each expert's down_proj columns permuted with the matching gate and up rows (concatenated in Mixtral,
    interleaved in GPT-OSS): the dense model computes the same; then RIA + permute prunes every expert 2:4."""
    from sparsecraft import permute

    model = build(name)
    x = ids(2, 16)
    with torch.no_grad():
        before = model(x).logits
    g = torch.Generator().manual_seed(0)
    with experts_split(model):
        modules = dict(model.named_modules())
        foldable = [t.name for t in select_targets(model) if permute.producers(modules, t.name) is not None]
        assert {n for n in foldable if ".experts." in n} == {
            f"model.layers.{b}.mlp.experts.{e}.down_proj" for b in range(2) for e in range(4)}
        for layer in foldable:
            permute.fold(modules, layer, torch.randperm(modules[layer].weight.shape[1], generator=g))
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, before, rtol=1e-5, atol=1e-5)
    model = build(name)
    _, report = sparsecraft.prune(model, ids(), method="ria", pattern="2:4", permute=True, nsamples=8, seqlen=32,
                                  progress=False)
    assert {r.name for r in report.layers if r.permuted} >= {
        f"model.layers.{b}.mlp.experts.{e}.down_proj" for b in range(2) for e in range(4)}
    for module in fused_modules(model).values():
        for suffix, w in expert_matrices(module):
            assert is_nm_valid(w, Pattern(2, 4)), suffix


@pytest.mark.skipif(not sparsecraft.kernels.available(), reason="CPU kernels not built")
def test_sparse_kernels_run_every_pruned_expert_and_densify_restores_the_model(tmp_path):
    model = build("MixtralConfig")
    sparsecraft.prune(model, ids(), method="wanda", sparsity=0.5, nsamples=8, seqlen=32, progress=False)
    x = ids(2, 16)
    with torch.no_grad():
        reference = model(x).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    swapped = sparsecraft.sparsify_model(model)
    expert_layers = {n for n, kind in swapped.items() if ".experts." in n and kind == "bitmask"}
    assert len(expert_layers) == 2 * 4 * 2
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference, rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelError, match="densify_model"):
        sparsecraft.save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    sparsecraft.kernels.densify_model(model)
    assert len(fused_modules(model)) == 2
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize("fmt", ["bitmask", "2:4"])
def test_compressed_export_packs_the_experts_and_loads_back_bit_for_bit(fmt, tmp_path):
    """transformers writes Mixtral's fused experts back per expert (`experts.E.w1.weight`): the export compresses
    those too, and loading decompresses them into the fused tensors again."""
    from safetensors import safe_open

    model = build("MixtralConfig")
    _, report = sparsecraft.prune(model, ids(), method="sparsegpt", pattern="2:4", nsamples=8, seqlen=32,
                                  progress=False)
    x = ids(2, 16)
    with torch.no_grad():
        logits = model(x).logits
    sparsecraft.save(model, tmp_path / "pruned", report=report)
    exported = sparsecraft.export(tmp_path / "pruned", tmp_path / "packed", fmt)
    with safe_open(next((tmp_path / "packed").glob("*.safetensors")), framework="pt") as f:
        keys = set(f.keys())
    experts = {k[: -len(".compressed")] for k in keys if ".experts." in k and k.endswith(".compressed")}
    assert len(experts) == 2 * 4 * 3  # w1, w2, w3 of 4 experts in 2 blocks
    assert experts <= set(exported.layers) and not [k for k in keys if ".experts." in k and k.endswith(".weight")]
    assert exported.sparsity_structure == "2:4"
    assert exported.stored_bytes < 0.75 * exported.dense_bytes
    back = sparsecraft.load(tmp_path / "packed", kernels=False)
    assert len(fused_modules(back)) == 2
    with torch.no_grad():
        assert torch.equal(back(x).logits, logits)

    ct = pytest.importorskip("compressed_tensors")  # its own sparse compressor reads the expert tensors alike
    if importlib.util.find_spec("compressed_tensors.compressors.sparse_compressors") is None:
        pytest.skip(f"compressed-tensors {ct.__version__} has no sparse compressors")
    from compressed_tensors.compressors import ModelCompressor

    compressor = ModelCompressor.from_pretrained(str(tmp_path / "packed")).sparsity_compressor
    theirs = dict(compressor.decompress(str(tmp_path / "packed")))
    ours = sparsecraft.compressed.decompressed_state_dict(tmp_path / "packed")
    assert {f"{n}.weight" for n in experts} <= theirs.keys()
    for name in experts:
        assert torch.equal(theirs[f"{name}.weight"], ours[f"{name}.weight"]), name


def test_cli_prune_eval_export_finetune_a_moe_model(tmp_path, byte_tokenizer, text_file, capsys):
    """The whole command-line path on a Mixtral saved to disk: prune 2:4 with SparseGPT + DSnoT, eval,
    export 2:4, fine-tune with SquareHead + KD from the dense model: every expert stays 2:4 throughout."""
    from sparsecraft.checkpoint import read_metadata
    from sparsecraft.cli import main

    dense = tmp_path / "mixtral"
    model = transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(
        **{**MOE["MixtralConfig"], "vocab_size": 256}))
    model.save_pretrained(dense)
    byte_tokenizer.save_pretrained(dense)
    common = ["--data", str(text_file), "--quiet"]
    assert main(["prune", "--model", str(dense), "--method", "sparsegpt", "--pattern", "2:4", "--refine", "dsnot",
                 "--nsamples", "4", "--seqlen", "32", "--max-eval-windows", "2", "--out", str(tmp_path / "p"),
                 *common]) == 0
    meta = read_metadata(tmp_path / "p")
    experts = [n for n in meta["layers"] if ".experts." in n]
    assert len(experts) == 2 * 4 * 2 and meta["sparsity"] == pytest.approx(0.5)
    assert main(["export", str(tmp_path / "p"), "--format", "2:4", "--out", str(tmp_path / "e"), "--quiet"]) == 0
    assert main(["finetune", str(tmp_path / "p"), "--seqlen", "16", "--batch-size", "2", "--steps", "3",
                 "--max-eval-windows", "2", "--out", str(tmp_path / "t"), *common]) == 0
    tuned = read_metadata(tmp_path / "t")["finetune"]["config"]
    assert tuned["distill"] == "squarehead" and tuned["teacher"] == str(dense)
    for path in ("e", "t"):
        back = sparsecraft.load(tmp_path / path, kernels=False)
        for module in fused_modules(back).values():
            for suffix, w in expert_matrices(module):
                assert is_nm_valid(w, Pattern(2, 4)) and int((w == 0).sum()) == w.numel() // 2, (path, suffix)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "t"), "--seqlen", "32", "--max-eval-windows", "2", *common]) == 0


def test_split_experts_still_answer_the_fused_module_attributes():
    model = build("MixtralConfig")
    fused = model.model.layers[0].mlp.experts
    split_experts(model)
    experts = model.model.layers[0].mlp.experts
    assert experts.hidden_dim == fused.hidden_dim and experts.act_fn is fused.act_fn and experts.config is fused.config
    with pytest.raises(AttributeError):
        experts.gate_up_proj  # noqa: B018 - the weights live in the per-expert layers while split
