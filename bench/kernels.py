"""Sparse kernel micro-benchmark: y = x Wᵀ for one x row (decode GEMV) and batches (prefill GEMM).

Every number comes from the same run: a STREAM-like read bandwidth (torch.sum over a 512 MiB buffer), the dense
baselines (torch fp32 and bf16 nn.functional.linear, sparsecraft's own dense kernels), torch's CSR sparse matmul,
and sparsecraft's bitmask kernels at 0/50/70/90% unstructured and 2:4 sparsity (magnitude pattern on a random
Gaussian weight), with bf16/fp32/fp16 or int8 values (--dtypes), on each kernel path asked for (--paths). Small
weights are timed cold, as in a model (each call cycles to another copy of the weight, so --cold-mib of copies
keep it out of the caches; --hot reuses one). Timings are the best of --reps passes after a
warm-up, per call.

  python bench/kernels.py                 # LLaMA-7B and SmolLM2-135M shapes, batches 1, 16, 128
  python bench/kernels.py --quick         # 4096x11008 and 576x1536, batch 1 (a minute)
  python bench/kernels.py --markdown --json out.json
  python bench/kernels.py --quick --paths avx512,avx512f,avx2 --dtypes bfloat16,int8   # the ISA paths side by side

Columns: `x dense` = fastest dense option for that shape and batch (any dtype) / this time; `GB/s` = bytes of
the (compressed) weight read per call / time; `of bound` = (bytes / read bandwidth) / time, how close the call is
to the memory-bandwidth bound.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402
from sparsecraft.kernels import SparseLinear, info, use_path  # noqa: E402

LLAMA7B = [(4096, 4096), (11008, 4096), (4096, 11008)]  # [out, in]: q/k/v/o, gate/up, down
SMOLLM = [(576, 576), (1536, 576), (576, 1536)]
SPARSITIES = ["0", "0.5", "0.7", "0.9", "2:4"]


def best_time(fn, reps: int, budget_s: float = 20.0) -> float:
    """Best wall time of `reps` calls (fewer if they would take longer than budget_s), after one warm-up."""
    fn()
    times, start = [], time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return min(times)


def per_call(calls: list, reps: int, budget_s: float = 20.0) -> float:
    """Best time of one pass over `calls` (one per weight copy), divided by the number of copies."""
    def sweep():
        for call in calls:
            call()
    return best_time(sweep, reps, budget_s) / len(calls)


def copies_for(nbytes: int, cold_bytes: int) -> int:
    """How many copies of a weight to cycle through so that each call reads it from memory, not the caches
    (in a model every layer is read once per token: a small weight reused call after call would stay in L2/L3)."""
    return max(1, -(-cold_bytes // max(nbytes, 1)))


def read_bandwidth(mib: int = 512, reps: int = 5) -> float:
    """Bytes/s of torch.sum over a float32 buffer far larger than the caches."""
    buf = torch.ones(mib * 2**20 // 4)
    return buf.numel() * 4 / best_time(lambda: buf.sum(), reps)


def pruned(weight: torch.Tensor, sparsity: str) -> torch.Tensor:
    """`weight` with its smallest-|w| fraction zeroed (whole matrix), or 2:4 (2 largest of every 4 kept)."""
    w = weight.clone()
    if sparsity == "2:4":
        groups = w.reshape(w.shape[0], -1, 4)
        drop = groups.abs().argsort(dim=-1)[..., :2]
        groups.scatter_(-1, drop, 0.0)
        return w
    s = float(sparsity)
    if s > 0:
        k = int(s * w.numel())
        threshold = w.abs().flatten().kthvalue(k).values
        w[w.abs() <= threshold] = 0.0
    return w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two shapes, batch 1, fewer repetitions")
    ap.add_argument("--shapes", default=None, help="out x in list, e.g. 4096x11008,576x1536 (default: all)")
    ap.add_argument("--batches", default=None, help="x rows, e.g. 1,16,128 (default 1,16,128; quick 1)")
    ap.add_argument("--dtypes", default="bfloat16,float32,int8",
                    help="bitmask value types: bfloat16, float32, float16, int8 (int8 values with per-row scales, "
                         "bf16 activations); default bfloat16,float32,int8")
    ap.add_argument("--paths", default="auto",
                    help="kernel paths to time, e.g. avx512,avx512f,avx2 (default auto: the widest the CPU has)")
    ap.add_argument("--sparsities", default=None, help=f"default {','.join(SPARSITIES)} (quick 0.5,0.7)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per entry (default 20, quick 10)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--no-csr", action="store_true", help="skip torch's CSR baseline")
    ap.add_argument("--hot", action="store_true",
                    help="reuse one copy of each weight (cache-hot); default: cycle through copies totalling "
                         "--cold-mib so every call reads its weight from memory, as in a model")
    ap.add_argument("--cold-mib", type=int, default=256, help="bytes of weight copies to cycle through (256 MiB)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    else:
        shapes = [(4096, 11008), (576, 1536)] if args.quick else LLAMA7B + SMOLLM
    batches = [int(b) for b in (args.batches or ("1" if args.quick else "1,16,128")).split(",")]
    sparsities = (args.sparsities or ("0.5,0.7" if args.quick else ",".join(SPARSITIES))).split(",")
    dtypes = args.dtypes.split(",")
    paths = args.paths.split(",")
    reps = args.reps or (10 if args.quick else 20)
    cold = 0 if args.hot else args.cold_mib * 2**20

    facts = info()
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; threads {torch.get_num_threads()}; kernels {facts}",
          file=sys.stderr)
    dense_rows, sparse_rows, results = [], [], []
    for n, k in shapes:
        base = torch.randn(n, k)
        for m in batches:
            x32 = torch.randn(m, k)
            dense = {}
            for dt in (torch.float32, torch.bfloat16):
                x = x32.to(dt)
                name = str(dt).removeprefix("torch.")
                ws = [base.to(dt, copy=True) for _ in range(copies_for(n * k * x.element_size(), cold))]
                dense[f"torch {name}"] = per_call([lambda w=w, x=x: torch.nn.functional.linear(x, w) for w in ws],
                                                  reps)
                layers = [SparseLinear(w, None, "dense") for w in ws]
                for path in paths:
                    with use_path(path):
                        label = f"kernel {name}" + (f" {path}" if len(paths) > 1 else "")
                        dense[label] = per_call([lambda lay=lay, x=x: lay(x) for lay in layers], reps)
                del ws, layers
            fastest_name = min(dense, key=dense.get)
            fastest = dense[fastest_name]
            dense_rows.append([f"{n}x{k}", str(m)] + [f"{dense[c] * 1e6:.0f}" for c in dense] + [fastest_name])
            results.append({"shape": [n, k], "batch": m, "dense_s": dense})
            print(f"{n}x{k} batch {m}: dense done", file=sys.stderr, flush=True)
            for sparsity in sparsities:
                w32 = pruned(base, sparsity)
                for spec in dtypes:
                    dt = torch.bfloat16 if spec == "int8" else getattr(torch, spec)
                    quantize = "int8" if spec == "int8" else None
                    w, x = w32.to(dt), x32.to(dt)
                    layer = SparseLinear(w, None, "bitmask", quantize=quantize)
                    nbytes = layer.nbytes
                    layers = [layer] + [SparseLinear(w, None, "bitmask", quantize=quantize)
                                        for _ in range(copies_for(nbytes, cold) - 1)]
                    times = {}
                    for path in paths:
                        with use_path(path):
                            times[path] = per_call([lambda lay=lay, x=x: lay(x) for lay in layers], reps)
                    del layers
                    csr_t = None
                    if not args.no_csr and sparsity != "0" and quantize is None:
                        try:
                            csrs = [w.to_sparse_csr() for _ in range(copies_for(nbytes, cold))]
                            csr_t = per_call([lambda c=c, x=x: torch.sparse.mm(c, x.t()).t() for c in csrs],
                                             max(3, reps // 4), budget_s=10)
                            del csrs
                        except (RuntimeError, NotImplementedError):
                            csr_t = None
                    for path, t in times.items():
                        sparse_rows.append([
                            f"{n}x{k}", str(m), spec, path, sparsity, f"{t * 1e6:.0f}", f"{fastest / t:.2f}x",
                            f"{nbytes / t / 1e9:.1f}", f"{nbytes / bandwidth / t:.0%}",
                            f"{csr_t * 1e6:.0f}" if csr_t else "-",
                        ])
                        results.append({"shape": [n, k], "batch": m, "dtype": spec, "path": path,
                                        "sparsity": sparsity, "seconds": t, "bytes": nbytes, "csr_seconds": csr_t,
                                        "fastest_dense": fastest_name, "fastest_dense_s": fastest})
            print(f"{n}x{k} batch {m}: sparse done", file=sys.stderr, flush=True)
    print("Dense baselines (µs):")
    dense_names = [c for c in results[0]["dense_s"]] if results else []
    print_table(["shape", "batch", *dense_names, "fastest"], dense_rows, args.markdown)
    print("\nSparse bitmask kernels:")
    print_table(["shape", "batch", "values", "path", "sparsity", "µs", "x dense", "GB/s", "of bound", "torch CSR µs"],
                sparse_rows, args.markdown)
    print(f"\nread bandwidth {bandwidth / 1e9:.1f} GB/s (torch.sum, 512 MiB); threads {torch.get_num_threads()}; "
          f"avx2 {facts['avx2']}, avx512 {facts['avx512']}, avx512_vbmi2 {facts['avx512_vbmi2']}, "
          f"avx512_bf16 {facts.get('avx512_bf16')}, avx512_vnni {facts.get('avx512_vnni')}, openmp "
          f"{facts['openmp']}, paths {','.join(paths)}; best of {reps} passes; "
          + ("weights reused (cache-hot)" if args.hot else f"each pass cycles through {args.cold_mib} MiB of weight "
             "copies (every call reads its weight from memory)"))
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth": bandwidth, "threads": torch.get_num_threads(),
                                               "rows": results}, indent=2))


if __name__ == "__main__":
    main()
