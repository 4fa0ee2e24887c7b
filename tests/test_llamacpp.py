"""sparsecraft.runtime.llamacpp: finding llama.cpp's converter (and the errors when it is not there), converting a
tiny LLaMA with the real SmolLM2 tokenizer to GGUF, and llama.cpp's greedy tokens and perplexity against
Hugging Face / sparsecraft.evaluate on the same weights. The llama.cpp parts skip unless llama-cpp-python is
installed and convert_hf_to_gguf.py is found (--llama-cpp-src / SPARSECRAFT_LLAMA_CPP_SRC / the cache)."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from sparsecraft.errors import ConfigError, ModelError
from sparsecraft.runtime import llamacpp

PROMPT = "The history of the Python programming language began in the late 1980s, when"


@pytest.fixture
def no_source(monkeypatch, tmp_path):
    """No env var, an empty cache."""
    monkeypatch.delenv(llamacpp.SOURCE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def fake_tree(root: Path, script: str = "print('converted')\n") -> Path:
    """A llama-cpp-python-shaped tree whose 'converter' runs `script`."""
    base = root / "vendor" / "llama.cpp"
    (base / "gguf-py" / "gguf").mkdir(parents=True)
    (base / "gguf-py" / "gguf" / "__init__.py").write_text("")
    (base / llamacpp.CONVERTER).write_text(script)
    return base / llamacpp.CONVERTER


def test_missing_path_says_how_to_get_it(no_source):
    with pytest.raises(ConfigError, match=r"does not exist.*pip download --no-deps --no-binary :all: "
                                          r"llama-cpp-python==0\.3\.36.*--llama-cpp-src"):
        llamacpp.find_converter(no_source / "nowhere.tar.gz")


def test_folder_without_converter(no_source):
    (no_source / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no convert_hf_to_gguf\.py in .*empty"):
        llamacpp.find_converter(no_source / "empty")


def test_nothing_found_names_every_place(no_source):
    with pytest.raises(ConfigError, match=r"--llama-cpp-src.*SPARSECRAFT_LLAMA_CPP_SRC") as err:
        llamacpp.find_converter()
    assert "\n" not in str(err.value)


def test_env_var_wrong_and_right(no_source, monkeypatch):
    monkeypatch.setenv(llamacpp.SOURCE_ENV, str(no_source / "missing"))
    with pytest.raises(ConfigError, match="SPARSECRAFT_LLAMA_CPP_SRC"):
        llamacpp.find_converter()
    script = fake_tree(no_source / "src")
    monkeypatch.setenv(llamacpp.SOURCE_ENV, str(no_source / "src"))
    assert llamacpp.find_converter() == script.resolve()
    assert llamacpp.find_converter(script) == script.resolve()


def test_converter_without_gguf_py(no_source):
    (no_source / "lone").mkdir()
    (no_source / "lone" / llamacpp.CONVERTER).write_text("")
    with pytest.raises(ConfigError, match="no gguf-py"):
        llamacpp.find_converter(no_source / "lone")


def test_sdist_unpacked_once_into_the_cache(no_source):
    archive = no_source / "llama_cpp_python-9.8.7.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in {"llama_cpp_python-9.8.7/vendor/llama.cpp/convert_hf_to_gguf.py": "# converter\n",
                           "llama_cpp_python-9.8.7/vendor/llama.cpp/conversion/__init__.py": "",
                           "llama_cpp_python-9.8.7/vendor/llama.cpp/gguf-py/gguf/__init__.py": "",
                           "llama_cpp_python-9.8.7/vendor/llama.cpp/ggml/src/big.c": "not needed\n",
                           "llama_cpp_python-9.8.7/llama_cpp/llama.py": "not needed\n"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    script = llamacpp.find_converter(archive)
    target = no_source / "cache" / "sparsecraft" / "llama.cpp-9.8.7"
    assert script == (target / llamacpp.CONVERTER).resolve()
    assert sorted(p.name for p in target.iterdir()) == ["conversion", "convert_hf_to_gguf.py", "gguf-py"]
    archive.unlink()  # the cache serves later calls, with or without the archive
    assert llamacpp.find_converter() == script


def test_bad_tarball(no_source):
    (no_source / "broken.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(ConfigError, match="cannot unpack"):
        llamacpp.find_converter(no_source / "broken.tar.gz")


def test_convert_errors(no_source):
    model_dir = no_source / "model"
    model_dir.mkdir()
    with pytest.raises(ConfigError, match="outtype 'q4_0'"):
        llamacpp.convert(model_dir, "q4_0", no_source / "m.gguf")
    with pytest.raises(ModelError, match="no config.json"):
        llamacpp.convert(model_dir, "f16", no_source / "m.gguf")
    (model_dir / "config.json").write_text("{}")
    failing = fake_tree(no_source / "bad", "import sys\nprint('loading', file=sys.stderr)\n"
                                           "sys.exit('NotImplementedError: BPE pre-tokenizer was not recognized')\n")
    with pytest.raises(ModelError, match=r"converter failed on .*model \(exit 1\): NotImplementedError: BPE"):
        llamacpp.convert(model_dir, "f16", no_source / "m.gguf", converter=failing)
    assert not list(no_source.glob("*.gguf")) and not list(no_source.glob(".m.gguf*"))


def test_convert_runs_the_converter_with_gguf_py(no_source):
    """The converter gets the model directory, --outtype and a temporary --outfile (renamed when done), with the
    vendored gguf-py first on PYTHONPATH."""
    model_dir = no_source / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    script = fake_tree(no_source / "ok", "import sys, os\nargs = sys.argv[1:]\n"
                                         "out = args[args.index('--outfile') + 1]\n"
                                         "open(out, 'w').write(' '.join(args[:3]) + '|' + os.environ['PYTHONPATH'])\n")
    out = llamacpp.convert(model_dir, "bf16", no_source / "out" / "m.gguf", converter=script)
    written, pythonpath = out.read_text().split("|")
    assert written == f"{model_dir} --outtype bf16"
    assert pythonpath.split(":")[0] == str(script.parent / "gguf-py")


def test_not_installed_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails
    assert not llamacpp.available()
    with pytest.raises(ConfigError, match=r"pip install llama-cpp-python==0\.3\.36"):
        llamacpp.decode_speed("x.gguf", [1, 2], 4, threads=1)


# ---- llama.cpp itself: a tiny random LLaMA with SmolLM2's real tokenizer (49,152 ids), converted to GGUF ----

SEQLEN = 128
NEW_TOKENS = 12
needs_llama = pytest.mark.skipif(not llamacpp.available(),
                                 reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")


@pytest.fixture(scope="module")
def converter():
    try:
        return llamacpp.find_converter()
    except ConfigError as exc:
        pytest.skip(f"llama.cpp's converter not found: {exc}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, converter):
    """(model directory, float32 HF model, tokenizer): weights drawn with std 0.2 so that the greedy tokens vary
    and the logits are far from uniform."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sparsecraft.models import default_model_file

    try:
        gguf = default_model_file()
    except ModelError as exc:
        pytest.skip(f"the SmolLM2 tokenizer ships with the default model: {exc}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True, initializer_range=0.2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def ggufs(tiny, converter):
    path = tiny[0]
    return {t: llamacpp.convert(path, t, path.parent / f"tiny-{t}.gguf", converter=converter)
            for t in ("f32", "f16", "bf16")}


@pytest.fixture(scope="module")
def eval_ids(tiny):
    import sparsecraft
    from sparsecraft.data import tokenize

    return tokenize(tiny[2], sparsecraft.load_text("builtin").evaluation)[: 4 * SEQLEN + 50]


def rounded(model, dtype):
    """A float32 copy of `model` with its weights rounded to `dtype` (what the GGUF file holds)."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() > 1:  # the converter keeps 1-D tensors (norms) in float32
                p.copy_(p.to(dtype).float())
    return out


def hf_greedy(model, tokenizer):
    from sparsecraft.kernels.speed import greedy_decode

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    return ids[0].tolist(), greedy_decode(model, ids, NEW_TOKENS).tokens.tolist()


def sparsecraft_ppl(model, ids):
    import sparsecraft

    return sparsecraft.evaluate(model, ids, seqlen=SEQLEN, max_windows=3, progress=False)["perplexity"]


@needs_llama
def test_convert_writes_a_gguf_atomically(ggufs):
    for t, path in ggufs.items():
        assert path.read_bytes()[:4] == b"GGUF", t
        assert not list(path.parent.glob(f".{path.name}*"))


@needs_llama
def test_f32_greedy_tokens_and_perplexity_match(tiny, ggufs, eval_ids):
    """F32 weights and an F32 KV cache: llama.cpp's greedy tokens are HF's, its perplexity sparsecraft's to ~1e-6."""
    import llama_cpp

    _, model, tokenizer = tiny
    prompt, expected = hf_greedy(model, tokenizer)
    f32_kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    result = llamacpp.decode_speed(ggufs["f32"], prompt, NEW_TOKENS, threads=1, repeats=2, **f32_kv)
    assert result["tokens"] == expected
    assert result["tokens_per_s"] > 0 and result["prefill_s"] > 0 and result["threads"] == 1
    ours = sparsecraft_ppl(model, eval_ids)
    theirs = llamacpp.perplexity(ggufs["f32"], eval_ids, SEQLEN, threads=1, max_windows=3, **f32_kv)
    assert abs(theirs / ours - 1) < 2e-5, (ours, theirs)
    # the default (f16) KV cache moves it a little
    assert abs(llamacpp.perplexity(ggufs["f32"], eval_ids, SEQLEN, 1, max_windows=3) / ours - 1) < 5e-4


@needs_llama
def test_half_precision_files_match_hf_on_the_rounded_weights(tiny, ggufs, eval_ids):
    _, model, tokenizer = tiny
    for outtype, dtype, tol in (("f16", torch.float16, 1e-3), ("bf16", torch.bfloat16, 2e-3)):
        reference = rounded(model, dtype)
        ours = sparsecraft_ppl(reference, eval_ids)
        theirs = llamacpp.perplexity(ggufs[outtype], eval_ids.tolist(), SEQLEN, threads=1, max_windows=3)
        assert abs(theirs / ours - 1) < tol, (outtype, ours, theirs)
    prompt, expected = hf_greedy(rounded(model, torch.float16), tokenizer)
    assert llamacpp.decode_speed(ggufs["f16"], prompt, NEW_TOKENS, threads=1)["tokens"] == expected


@needs_llama
def test_perplexity_windows_are_evaluates(tiny, ggufs, eval_ids):
    """Same windows as evaluate: the trailing partial window is dropped; all windows by default."""
    _, model, _ = tiny
    import sparsecraft

    ours = sparsecraft.evaluate(model, eval_ids, seqlen=SEQLEN, progress=False)
    assert ours["windows"] == 4
    theirs = llamacpp.perplexity(ggufs["f32"], eval_ids, SEQLEN, threads=1)
    assert abs(theirs / ours["perplexity"] - 1) < 5e-4
    with pytest.raises(ConfigError, match="seqlen"):
        llamacpp.perplexity(ggufs["f32"], eval_ids, 1, threads=1)


@needs_llama
def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        llamacpp.perplexity(tmp_path / "no.gguf", list(range(300)), SEQLEN, threads=1)


@needs_llama
@pytest.mark.real_model
def test_default_model_f16(tmp_path, converter):
    """SmolLM2-135M in bf16, converted to F16 (bf16 values are exact in f16 here): llama.cpp's greedy tokens are
    HF's on the same weights (computed in float32) and its held-out perplexity is evaluate's to ~1e-4 (bf16 GGUF
    files drift more: llama.cpp rounds the activations to bf16 too)."""
    import sparsecraft
    from sparsecraft.data import tokenize

    try:
        model, tokenizer = sparsecraft.load_model("default", dtype=torch.bfloat16)
    except ModelError as exc:
        pytest.skip(str(exc))
    model.save_pretrained(tmp_path / "smol")
    tokenizer.save_pretrained(tmp_path / "smol")
    gguf = llamacpp.convert(tmp_path / "smol", "f16", tmp_path / "smol-f16.gguf", converter=converter)
    model = model.float()
    prompt, expected = hf_greedy(model, tokenizer)
    assert prompt[0] != tokenizer.bos_token_id  # SmolLM2's tokenizer adds no BOS; llama.cpp gets the same ids
    assert llamacpp.decode_speed(gguf, prompt, NEW_TOKENS, threads=2)["tokens"] == expected
    ids = tokenize(tokenizer, sparsecraft.load_text("builtin").evaluation)
    ours = sparsecraft.evaluate(model, ids, seqlen=256, max_windows=2, progress=False)["perplexity"]
    theirs = llamacpp.perplexity(gguf, ids, 256, threads=2, max_windows=2)
    assert abs(theirs / ours - 1) < 1e-3, (ours, theirs)
