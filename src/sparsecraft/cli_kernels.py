"""`sparsecraft bench` (dense vs sparse-kernel decode speed) and `sparsecraft generate` (text on the kernels)."""

from __future__ import annotations

import argparse


def add_parsers(sub) -> None:
    b = sub.add_parser("bench", help="greedy decode tokens/s: torch dense vs sparsecraft's CPU sparse kernels")
    b.add_argument("model", help="model directory, .gguf file or 'default'")
    b.add_argument("--tokens", type=int, default=128, help="new tokens to generate (default 128)")
    b.add_argument("--prompt", default=None, help="prompt (default: a fixed sentence)")
    b.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: as stored)")
    b.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    b.add_argument("--min-sparsity", type=float, default=None,
                   help="layers with at least this fraction of zeros use the bitmask format (default 0.25)")
    b.add_argument("--repeats", type=int, default=1, help="timed runs per row, best kept (default 1)")
    b.add_argument("--kernel-dense", action="store_true",
                   help="also time every layer on the kernels' dense path (the same kernels without sparsity)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")

    g = sub.add_parser("generate", help="generate text greedily with the model on the CPU sparse kernels")
    g.add_argument("model", help="model directory, .gguf file or 'default'")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
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
    from .errors import ConfigError
    from .kernels import DEFAULT_MIN_SPARSITY, densify_model, kernel_layers, sparsify_model
    from .kernels.speed import DEFAULT_PROMPT, greedy_decode, match
    from .report import format_table

    if args.tokens < 2 or args.repeats < 1:
        raise ConfigError("--tokens must be >= 2 and --repeats >= 1")
    model, tokenizer = _load(args)
    ids = _ids(tokenizer, args.prompt or DEFAULT_PROMPT)
    min_sparsity = DEFAULT_MIN_SPARSITY if args.min_sparsity is None else args.min_sparsity
    rows, results = [], {}

    def run(name: str, detail: str) -> None:
        result = greedy_decode(model, ids, args.tokens, args.repeats)
        results[name] = result
        base = results["torch dense"]
        frac, first = match(base.tokens, result.tokens)
        same = "yes" if first is None else f"{frac:.0%} (first difference at token {first})"
        rows.append([name, detail, f"{result.tokens_per_s:.2f}", f"{result.tokens_per_s / base.tokens_per_s:.2f}x",
                     same])

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    run("torch dense", f"{dtype}, nn.Linear")
    if args.kernel_dense:
        sparsify_model(model, min_sparsity, bitmask=False)
        run("kernels dense", "every layer dense format")
        densify_model(model)
    sparsify_model(model, min_sparsity)
    layers = kernel_layers(model)
    packed = [m for m in layers.values() if m.format == "bitmask"]
    zeros = sum(m.out_features * m.in_features - m.nnz for m in packed)
    total = sum(m.out_features * m.in_features for m in packed)
    run("sparse kernels", f"{len(packed)} bitmask layers ({zeros / max(total, 1):.1%} zeros), "
                          f"{len(layers) - len(packed)} dense")
    print(format_table(["run", "layers", "decode tok/s", "x torch dense", "same tokens"], rows))
    print(f"model={args.model} dtype={dtype} prompt={ids.shape[1]} tokens, {args.tokens} new tokens (greedy), "
          f"threads={__import__('torch').get_num_threads()}")
    return 0


def cmd_generate(args) -> int:
    import time

    from .kernels import kernel_layers, sparsify_model
    from .kernels.speed import _generate

    model, tokenizer = _load(args)
    ids = _ids(tokenizer, args.prompt)
    if not args.dense:
        sparsify_model(model)
    t0 = time.perf_counter()
    out = _generate(model, ids, args.max_new_tokens, force=False) if args.max_new_tokens > 0 else ids[0, :0]
    seconds = time.perf_counter() - t0
    print(args.prompt + tokenizer.decode(out, skip_special_tokens=True))
    packed = sum(m.format == "bitmask" for m in kernel_layers(model).values())
    where = "torch dense" if args.dense else f"sparse kernels, {packed} bitmask layers"
    import sys

    print(f"[{len(out)} tokens in {seconds:.2f}s, {len(out) / max(seconds, 1e-9):.2f} tok/s incl. prefill; {where}]",
          file=sys.stderr)
    return 0
