"""Shared fixtures: tiny, seeded, randomly initialised causal LMs (Llama, OPT, GPT-2) and calibration ids."""

from __future__ import annotations

import random
from fractions import Fraction
from pathlib import Path

import pytest
import torch

VOCAB = 256
SEED = 0

# Two CPU cores are shared with other jobs: keep torch from oversubscribing them.
torch.set_num_threads(min(2, torch.get_num_threads()))


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def _opt_config():
    from transformers import OPTConfig

    return OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=128, word_embed_proj_dim=64)


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0,
                      eos_token_id=0)


ARCHS = ("llama", "opt", "gpt2")


def build_model(arch: str, seed: int = SEED):
    """A fresh tiny model of `arch`, seeded, in eval mode (float32, CPU)."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, OPTForCausalLM

    cls, config = {
        "llama": (LlamaForCausalLM, _llama_config),
        "opt": (OPTForCausalLM, _opt_config),
        "gpt2": (GPT2LMHeadModel, _gpt2_config),
    }[arch]
    torch.manual_seed(seed)
    return cls(config()).eval()


def correlated_inputs(tokens: int = 2048, features: int = 64, seed: int = 0, rank: int = 16) -> torch.Tensor:
    """Token features that are noisy linear mixtures of `rank` latent factors (like real activations, the
    features are strongly correlated, so kept weights can compensate for pruned ones)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, rank, generator=g)
    a = torch.randn(rank, features, generator=g)
    return z @ a + 0.1 * torch.randn(tokens, features, generator=g)


def floor_count(total: int, sparsity: float) -> int:
    """floor(total * sparsity), computed exactly on the decimal value of `sparsity`."""
    return int(Fraction(str(sparsity)) * total)


def make_byte_tokenizer():
    """A real byte-level BPE tokenizer with exactly VOCAB (=256) tokens, built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(["sparse models are small and fast"], trainer=trainer)
    assert tok.get_vocab_size() == VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tok)


SENTENCE = ("the model weights are pruned with calibration data so that every layer keeps its most important inputs "
            "while the removed ones are set to zero and the remaining weights may be updated")
WORDS = tuple(SENTENCE.split(" "))


def make_text(paragraphs: int = 10, words: int = 60, seed: int = 0) -> str:
    """Deterministic pseudo-English text: `paragraphs` paragraphs separated by blank lines."""
    rng = random.Random(seed)
    paras = [f"Paragraph {i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) + "." for i in range(paragraphs)]
    return "\n\n".join(paras) + "\n"


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(arch):
    """A fresh tiny model of every architecture (parametrised)."""
    return build_model(arch)


@pytest.fixture
def tiny_llama():
    return build_model("llama")


@pytest.fixture
def tiny_opt():
    return build_model("opt")


@pytest.fixture
def tiny_gpt2():
    return build_model("gpt2")


@pytest.fixture
def calib_ids() -> torch.Tensor:
    """8 windows of 32 random token ids (seeded)."""
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1234))


@pytest.fixture(scope="session")
def byte_tokenizer():
    return make_byte_tokenizer()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A UTF-8 text file of 10 paragraphs of ~2.6k characters (= byte tokens); each paragraph is one ~2k-character
    section of sparsecraft's split, so 8 go to calibration and 2 to evaluation."""
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(make_text(10, 400), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, byte_tokenizer) -> Path:
    """A tiny Llama saved with save_pretrained, together with the byte-level tokenizer (read-only use)."""
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    build_model("llama").save_pretrained(path)
    byte_tokenizer.save_pretrained(path)
    return path
