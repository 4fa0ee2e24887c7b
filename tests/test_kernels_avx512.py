"""The AVX-512 kernels' logic on any CPU: tests/native/check_avx512.c runs them on a plain-C emulation of the
AVX-512F intrinsics they use (this machine has no AVX-512) against a float64 reference, under AddressSanitizer
and UBSan where the compiler has them. On AVX-512 CPUs test_kernels.py also runs the real instructions."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "tests" / "native"
KERNELS = ROOT / "src" / "sparsecraft" / "kernels"


def _compiler() -> str | None:
    for name in ((sysconfig.get_config_var("CC") or "").split()[:1] + ["cc", "gcc", "clang"]):
        if name and shutil.which(name):
            return name
    return None


def test_avx512_kernels_emulated(tmp_path):
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler here (the kernels themselves need one too)")
    exe = tmp_path / "check_avx512"
    base = [cc, "-O1", "-std=gnu11", f"-I{KERNELS}", f"-I{NATIVE}", str(NATIVE / "check_avx512.c"), "-lm", "-o",
            str(exe)]
    built = None
    for extra in (["-fsanitize=address,undefined", "-fno-sanitize-recover=all"], []):  # sanitizers where available
        built = subprocess.run(base[:1] + extra + base[1:], capture_output=True, text=True)
        if built.returncode == 0:
            break
    assert built.returncode == 0, built.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300,
                         env={"ASAN_OPTIONS": "detect_leaks=1", "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1] == "ok"
    for dtype in ("float32", "bfloat16", "float16"):
        assert f"{dtype}: 400 cases match the float64 reference" in lines
        assert f"int8 -> {dtype}: 200 cases match the float64 reference" in lines  # int8 values, per-row scales
