"""Why the AVX2 bitmask GEMV is bound by instructions, not memory, on a CPU without AVX-512: the cost of one step
(8 weight positions) in core cycles, and the GEMV times it allows next to the memory bound, from one run.

bench/native/avx2_step_cost.c times the step's integer part (mask byte -> table offset, popcount, cursor advance),
its vector part (broadcast of the packed values, vpshufb through the table row, FMA) and both, 8 independent steps
per loop iteration, all in L1. This script adds the compiled kernel's own cost per step (SparseLinear on a bf16
weight small enough to stay in cache, one thread, per-call overhead subtracted) and turns the costs into the
fastest 4096x11008 bf16 GEMV they allow with every thread busy, next to the time its bytes take at the measured
read bandwidth (the bound the dense GEMV already runs at).

  python bench/avx2_step_cost.py             # needs a C compiler and an x86-64 CPU with AVX2
  python bench/avx2_step_cost.py --markdown
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table  # noqa: E402
from kernels import pruned, read_bandwidth  # noqa: E402
from sparsecraft.kernels import SparseLinear, use_path  # noqa: E402

SOURCE = Path(__file__).resolve().parent / "native" / "avx2_step_cost.c"
OUT, IN = 4096, 11008  # LLaMA-7B down_proj: the GEMV


def instruction_costs() -> dict[str, float]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        sys.exit(f"this benchmark times x86-64 AVX2 instructions; this machine is {platform.machine()}")
    cc = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        sys.exit("needs a C compiler (cc, gcc or clang)")
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "avx2_step_cost"
        subprocess.run([cc, "-O2", str(SOURCE), "-o", str(exe)], check=True)
        run = subprocess.run([str(exe)], capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(run.stdout.strip() or run.stderr.strip())
    return {k: float(v) for k, v in (line.split() for line in run.stdout.splitlines())}


def kernel_cycles(sparsity: str, ghz: float, cols: int = 2048, rows: int = 130, reps: int = 3000) -> float:
    """Cycles per 8 positions of the compiled AVX2 bitmask (or, at '0', dense) GEMV on one thread, hot in cache."""
    def best(layer, x):
        with torch.inference_mode():
            for _ in range(20):
                layer(x)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                layer(x)
                times.append(time.perf_counter() - t0)
        return min(times)

    x = torch.randn(1, cols, dtype=torch.bfloat16)
    fmt = "dense" if sparsity == "0" else "bitmask"
    w = pruned(torch.randn(rows, cols), sparsity).to(torch.bfloat16)
    big, small = SparseLinear(w, None, fmt), SparseLinear(w[:2].clone(), None, fmt)
    return (best(big, x) - best(small, x)) * ghz * 1e9 / ((rows - 2) * cols / 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    costs = instruction_costs()
    ghz = costs["clock_ghz"]
    torch.set_num_threads(1)
    with use_path("avx2"):
        compiled = {s: kernel_cycles(s, ghz) for s in ("0", "0.5", "0.7")}
    torch.set_num_threads(threads)
    bandwidth = read_bandwidth()
    rows = [{"cost": "integer part only", "cycles / 8 positions": f"{costs['integer']:.2f}"},
            {"cost": "vector part only", "cycles / 8 positions": f"{costs['vector']:.2f}"},
            {"cost": "both, as issued together", "cycles / 8 positions": f"{costs['both']:.2f}"},
            {"cost": "compiled kernel, bitmask 50%", "cycles / 8 positions": f"{compiled['0.5']:.2f}"},
            {"cost": "compiled kernel, bitmask 70%", "cycles / 8 positions": f"{compiled['0.7']:.2f}"},
            {"cost": "compiled kernel, dense bf16", "cycles / 8 positions": f"{compiled['0']:.2f}"}]
    print_table(["cost", "cycles / 8 positions"], [list(r.values()) for r in rows], args.markdown)
    steps = OUT * IN / 8
    dense_bound = OUT * IN * 2 / bandwidth
    table = []
    for s in ("0.5", "0.7"):
        nbytes = OUT * (IN / 8 + (1 - float(s)) * IN * 2)  # mask bytes + packed bf16 values
        floor = max(costs["integer"], costs["vector"])
        row = {"sparsity": s, "memory bound µs": f"{nbytes / bandwidth * 1e6:.0f}"}
        for label, cyc in (("instruction floor", floor), ("both parts", costs["both"]), ("compiled", compiled[s])):
            t = max(steps * cyc / (ghz * 1e9 * threads), nbytes / bandwidth)
            row[f"{label} µs"] = f"{t * 1e6:.0f}"
            row[f"x dense ({label})"] = f"{dense_bound / t:.2f}x"
        table.append(row)
    print()
    print_table(list(table[0]), [list(r.values()) for r in table], args.markdown)
    print(f"\nclock {ghz:.2f} GHz (dependent adds), {threads} threads, read bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"{OUT}x{IN} bf16 GEMV, dense at its memory bound = {dense_bound * 1e6:.0f} µs; each time is the larger "
          "of the instruction time (all threads busy, no stalls) and the memory time, so a ratio here is a "
          "ceiling, not a prediction")


if __name__ == "__main__":
    main()
