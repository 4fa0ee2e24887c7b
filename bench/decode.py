"""End-to-end greedy decode speed: torch dense vs sparsecraft's CPU kernels, in one run.

Models: `default` (SmolLM2-135M-Instruct) and `llama1b`, a LLaMA-shaped model with random weights (hidden 2048,
intermediate 5632, 22 layers, 32 heads / 4 KV heads, vocab 32000, ~1.1B parameters; speed only). Each is
magnitude-pruned (no calibration needed) to every --sparsities level in turn. Rows per model:

* torch dense    the model as loaded, nn.Linear (torch's GEMV; slow for bf16 on CPUs without bf16 instructions)
* kernels dense  every linear layer on sparsecraft's dense kernel path (no sparsity: the honest dense baseline
                 when it is faster than torch's)
* torch s        the pruned model on nn.Linear (only with --torch-sparse; gives the tokens to compare against)
* kernels s      the pruned model on the bitmask kernels (lm_head stays on the dense kernel path)

`decode tok/s` excludes the prefill; `same tokens` compares the greedy tokens with torch on the same weights.

  python bench/decode.py                        # both models, bf16, 64 new tokens, 50% and 70%
  python bench/decode.py --quick --markdown     # 16 new tokens
  python bench/decode.py --models llama1b --tokens 128 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sparsecraft  # noqa: E402
from common import print_table  # noqa: E402
from sparsecraft.api import peak_rss_mb  # noqa: E402
from sparsecraft.kernels import densify_model, info, kernel_layers, sparsify_model  # noqa: E402
from sparsecraft.kernels.speed import DEFAULT_PROMPT, greedy_decode, match  # noqa: E402


def llama1b(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(old)
    model.generation_config.pad_token_id = 0
    return model, torch.arange(1, 17).unsqueeze(0)


def load(name: str, dtype: torch.dtype):
    if name == "llama1b":
        return llama1b(dtype)
    model, tokenizer = sparsecraft.load_model(name, dtype=dtype)
    return model, tokenizer(DEFAULT_PROMPT, return_tensors="pt").input_ids


def bench_model(name: str, dtype: torch.dtype, tokens: int, levels: list[float], repeats: int,
                torch_sparse: bool) -> list[dict]:
    t0 = time.perf_counter()
    model, ids = load(name, dtype)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"{name}: {params:.2f}B parameters loaded in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    results = []

    def run(label: str, sparsity: float, reference=None):
        result = greedy_decode(model, ids, tokens, repeats)
        same = "-"
        if reference is not None:
            frac, diff = match(reference.tokens, result.tokens)
            same = "yes" if diff is None else f"{frac:.0%} (from {diff})"
        results.append({"model": name, "run": label, "sparsity": sparsity, "tokens_per_s": result.tokens_per_s,
                        "prefill_s": result.prefill_seconds, "same_tokens": same, "tokens": result.tokens.tolist()})
        print(f"  {label}: {result.tokens_per_s:.2f} tok/s", file=sys.stderr, flush=True)
        return result

    dense = run("torch dense", 0.0)
    sparsify_model(model, bitmask=False)
    run("kernels dense", 0.0, dense)
    densify_model(model)
    for level in levels:
        sparsecraft.prune(model, None, method="magnitude", sparsity=level, progress=False)
        reference = run("torch sparse", level) if torch_sparse else None
        sparsify_model(model)
        packed = [m for m in kernel_layers(model).values() if m.format == "bitmask"]
        run(f"kernels sparse ({len(packed)} bitmask layers)", level, reference)
        densify_model(model)
    torch_dense, kernel_dense = results[0]["tokens_per_s"], results[1]["tokens_per_s"]
    for r in results:
        r["x_torch_dense"], r["x_kernels_dense"] = r["tokens_per_s"] / torch_dense, r["tokens_per_s"] / kernel_dense
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="default,llama1b", help="comma-separated: default, llama1b, or a model path")
    ap.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float32 or float16")
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per run (default 64, quick 16)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per row, best kept")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--torch-sparse", action="store_true",
                    help="also run torch on the pruned models (its tokens are the reference for `same tokens`)")
    ap.add_argument("--quick", action="store_true", help="16 new tokens")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    tokens = args.tokens or (16 if args.quick else 64)
    levels = [float(s) for s in args.sparsities.split(",")]
    rows, results = [], []
    for name in args.models.split(","):
        for r in bench_model(name, dtype, tokens, levels, args.repeats, args.torch_sparse):
            results.append(r)
            rows.append([r["model"], r["run"], f"{r['sparsity']:.0%}", f"{r['tokens_per_s']:.2f}",
                         f"{r['x_torch_dense']:.2f}x", f"{r['x_kernels_dense']:.2f}x", r["same_tokens"]])
    print_table(["model", "run", "sparsity", "decode tok/s", "x torch dense", "x kernels dense", "same tokens"], rows,
                args.markdown)
    facts = info()
    print(f"\ndtype={args.dtype} new tokens={tokens} (greedy, prefill excluded) threads={torch.get_num_threads()} "
          f"avx2={facts['avx2']} openmp={facts['openmp']}; magnitude pruning of the targeted layers (lm_head and "
          f"embeddings dense); peak RSS {peak_rss_mb():.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": torch.get_num_threads(), "dtype": args.dtype,
                                               "tokens": tokens, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
