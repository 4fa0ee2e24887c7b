"""`sparsecraft bench` (decode speed: torch generate vs the lean loop on the CPU kernels, optionally vs llama.cpp on
the same weights) and `sparsecraft generate` (text from the lean loop)."""

from __future__ import annotations

import argparse
import sys

from .cli_args import check_seed, finite_float


def add_parsers(sub) -> None:
    b = sub.add_parser("bench", help="decode tokens/s: torch generate vs the lean loop on sparsecraft's CPU kernels "
                                     "(and llama.cpp with --vs llama.cpp), one run")
    b.add_argument("model", help="model directory, .gguf file or 'default'")
    b.add_argument("--tokens", type=int, default=128, help="new tokens to generate (default 128)")
    b.add_argument("--prompt", default=None, help="prompt (default: a fixed sentence)")
    b.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    b.add_argument("--min-sparsity", type=finite_float, default=None,
                   help="layers with at least this fraction of zeros use the bitmask format (default 0.25)")
    b.add_argument("--repeats", type=int, default=1, help="timed runs per row, best kept (default 1)")
    b.add_argument("--kernel-dense", action="store_true",
                   help="also time every layer on the kernels' dense path (the same kernels without sparsity)")
    b.add_argument("--split", action="store_true",
                   help="also print where each row's time per token goes: linear layers, attention, the rest")
    b.add_argument("--vs", default=None, metavar="PEER",
                   help="llama.cpp: also run llama.cpp (llama-cpp-python) on the same weights converted to GGUF "
                        "F16, BF16 and Q8_0 (--gguf-types), at the same thread count")
    b.add_argument("--gguf-types", default="f16,bf16,q8_0", help="with --vs llama.cpp: GGUF types to convert to")
    b.add_argument("--llama-cpp-src", default=None,
                   help="with --vs llama.cpp: llama-cpp-python's sdist (.tar.gz) or source tree, for its "
                        "convert_hf_to_gguf.py (default: $SPARSECRAFT_LLAMA_CPP_SRC or the cached copy)")
    b.add_argument("--json", default=None, help="also write the rows to this JSON file")
    b.add_argument("--quiet", action="store_true", help="no progress bars")

    g = sub.add_parser("generate", help="generate text with the lean decode loop on the CPU sparse kernels")
    g.add_argument("model", help="model directory, .gguf file or 'default'")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=finite_float, default=0.0, help="0 (default): greedy; > 0: sample")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=finite_float, default=1.0,
                   help="sample from the smallest set reaching this probability")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    g.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    g.add_argument("--dense", action="store_true", help="run on torch's dense layers instead of the kernels")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _load(args: argparse.Namespace):
    import torch

    from .api import load
    from .errors import ConfigError, ModelError

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model = load(args.model, dtype=args.dtype, kernels=False)
    if model.tokenizer is None:
        raise ModelError(f"{args.model} has no tokenizer: save the model with its tokenizer to generate text")
    return model, model.tokenizer


def _ids(tokenizer, prompt: str):
    from .errors import ConfigError

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ConfigError("the prompt encodes to no tokens: pass a non-empty --prompt")
    return ids


def cmd_bench(args) -> int:
    import torch

    from .errors import ConfigError
    from .kernels import DEFAULT_MIN_SPARSITY, densify_model, kernel_layers, sparsify_model
    from .kernels.speed import DEFAULT_PROMPT, greedy_decode, match
    from .report import format_table
    from .runtime.decode import decoder_for

    if args.tokens < 2 or args.repeats < 1:
        raise ConfigError("--tokens must be >= 2 and --repeats >= 1")
    if args.min_sparsity is not None and not 0.0 <= args.min_sparsity <= 1.0:
        raise ConfigError(f"--min-sparsity is a fraction of zeros in [0, 1], got {args.min_sparsity}")
    if args.json:
        from .checkpoint import check_output_file

        check_output_file(args.json, "--json")
    if args.vs not in (None, "llama.cpp"):
        raise ConfigError(f"--vs {args.vs!r} is not a peer sparsecraft can run: use --vs llama.cpp")
    peer = None
    if args.vs:
        from .runtime import llamacpp

        llamacpp.require()
        types = llamacpp.parse_types(args.gguf_types)
        peer = (llamacpp, llamacpp.find_converter(args.llama_cpp_src), types)
    model, tokenizer = _load(args)
    ids = _ids(tokenizer, args.prompt or DEFAULT_PROMPT)
    from .models import model_context

    limit = model_context(model)
    if limit is not None and ids.shape[1] + args.tokens > limit:
        raise ConfigError(f"the prompt ({ids.shape[1]} tokens) + --tokens {args.tokens} exceed the model's context "
                          f"({limit} positions): pass --tokens {max(limit - ids.shape[1], 2)} or less")
    min_sparsity = DEFAULT_MIN_SPARSITY if args.min_sparsity is None else args.min_sparsity
    rows: list[dict] = []

    def add(name: str, detail: str, tokens_per_s: float, tokens, split=None) -> None:
        base = rows[0]["tokens"] if rows else tokens
        frac, first = match(torch.as_tensor(base), torch.as_tensor(tokens))
        rows.append({"run": name, "layers": detail, "tokens_per_s": tokens_per_s, "tokens": list(map(int, tokens)),
                     "same_tokens": "yes" if first is None else f"{frac:.0%} (first difference at token {first})",
                     **({"split_ms": split} if split else {})})
        print(f"  {name}: {tokens_per_s:.2f} tok/s", file=sys.stderr, flush=True)

    def hf(name: str, detail: str) -> None:
        result = greedy_decode(model, ids, args.tokens, args.repeats)
        add(name, detail, result.tokens_per_s, result.tokens.tolist(), _split_hf(model, ids, args) if args.split
            else None)

    def lean(name: str, detail: str) -> None:
        decoder = decoder_for(model)
        best = None
        decoder.generate(ids, 2, stop_at_eos=False)  # warm-up
        for _ in range(args.repeats):
            g = decoder.generate(ids, args.tokens, stop_at_eos=False)
            best = g if best is None or g.tokens_per_s > best.tokens_per_s else best
        split = None
        if args.split:
            from .runtime.profile import split as time_split

            split = time_split(lambda k: decoder.generate(ids, k, stop_at_eos=False), model, args.tokens, decoder)
        add(name, f"{detail}, {decoder.name} loop", best.tokens_per_s, best.tokens, split)

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    hf("torch generate", f"{dtype}, nn.Linear")
    if args.kernel_dense:
        sparsify_model(model, min_sparsity, bitmask=False)
        hf("generate, kernels dense", "every layer dense format")
        lean("lean, kernels dense", "every layer dense format")
        densify_model(model)
    if peer is not None:
        _bench_llamacpp(model, tokenizer, ids, args, peer, add)
    sparsify_model(model, min_sparsity)
    layers = kernel_layers(model)
    packed = [m for m in layers.values() if m.format == "bitmask"]
    zeros = sum(m.out_features * m.in_features - m.nnz for m in packed)
    total = sum(m.out_features * m.in_features for m in packed)
    detail = f"{len(packed)} bitmask layers ({zeros / max(total, 1):.1%} zeros), {len(layers) - len(packed)} dense"
    hf("generate, sparse kernels", detail)
    lean("lean, sparse kernels", detail)
    base = rows[0]["tokens_per_s"]
    print(format_table(["run", "layers", "decode tok/s", "x torch generate", "same tokens"],
                       [[r["run"], r["layers"], f"{r['tokens_per_s']:.2f}", f"{r['tokens_per_s'] / base:.2f}x",
                         r["same_tokens"]] for r in rows]))
    if args.split:
        print(format_table(["run", "ms/token", "linear", "attention", "other"],
                           [[r["run"], *(f"{r['split_ms'][k]:.2f}" for k in ("ms_per_token", "linear_ms",
                                                                               "attention_ms", "other_ms"))]
                            for r in rows if "split_ms" in r]))
    from .kernels import info

    facts = info()
    isa = "avx512" if facts["avx512"] else "avx2" if facts["avx2"] else "scalar"
    print(f"model={args.model} dtype={dtype} prompt={ids.shape[1]} tokens, {args.tokens} new tokens (greedy, "
          f"prefill excluded), threads={torch.get_num_threads()}, kernel path={facts['path']} (CPU: {isa})")
    if args.json:
        from .checkpoint import write_json_atomic

        write_json_atomic(args.json, {"model": args.model, "dtype": dtype, "threads": torch.get_num_threads(),
                                      "tokens": args.tokens, "prompt_tokens": ids.shape[1], "cpu_isa": isa,
                                      "rows": rows})
    return 0


def _split_hf(model, ids, args) -> dict:
    from .kernels.speed import _generate
    from .runtime.profile import split

    return split(lambda k: _generate(model, ids, k), model, args.tokens)


def _bench_llamacpp(model, tokenizer, ids, args, peer, add) -> None:
    """llama.cpp rows: the model as it is now (dense nn.Linear weights, zeros included) converted to each GGUF
    type in a temporary directory, timed at the same thread count."""
    import tempfile
    from pathlib import Path

    import torch

    llamacpp, converter, types = peer
    with tempfile.TemporaryDirectory(prefix="sparsecraft-gguf-") as tmp:
        src = Path(tmp) / "hf"
        model.save_pretrained(src)
        tokenizer.save_pretrained(src)
        for kind in types:
            print(f"  converting to GGUF {kind} ...", file=sys.stderr, flush=True)
            gguf = llamacpp.convert(src, kind, Path(tmp) / f"model-{kind}.gguf", converter)
            r = llamacpp.decode_speed(gguf, ids[0].tolist(), args.tokens, torch.get_num_threads(), args.repeats)
            add(f"llama.cpp {kind.upper()}", f"GGUF {gguf.stat().st_size / 2**20:.0f} MiB, dense", r["tokens_per_s"],
                r["tokens"])
            gguf.unlink()


def cmd_generate(args) -> int:
    from .errors import ConfigError
    from .kernels import kernel_layers, sparsify_model
    from .runtime.decode import Sampling, decoder_for

    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    check_seed("--seed", args.seed)
    if not args.prompt:
        raise ConfigError("--prompt is empty: pass the text to continue")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    model, tokenizer = _load(args)
    ids = _ids(tokenizer, args.prompt)
    if not args.dense:
        sparsify_model(model)
    decoder = decoder_for(model)
    printed = [""]
    out: list[int] = []

    def stream(token: int) -> None:  # print each piece of text as soon as it decodes to whole characters
        out.append(token)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed[0]):])
            sys.stdout.flush()
            printed[0] = text

    sys.stdout.write(args.prompt)
    result = decoder.generate(ids, args.max_new_tokens, sampling, stop_at_eos=not args.ignore_eos,
                              on_token=stream)
    text = tokenizer.decode(out, skip_special_tokens=True)
    sys.stdout.write(text[len(printed[0]):] + "\n")
    packed = sum(m.format == "bitmask" for m in kernel_layers(model).values())
    where = "torch dense" if args.dense else f"sparse kernels, {packed} bitmask layers"
    print(f"[{len(result.tokens)} tokens: prefill {result.prefill_seconds:.2f}s, decode {result.tokens_per_s:.2f} "
          f"tok/s; {decoder.name} loop, {where}]", file=sys.stderr)
    return 0
