"""Builds the optional C extension `sparsecraft.kernels._sparsekernels` (CPU sparse kernels).

Package metadata lives in pyproject.toml. The extension needs only a C compiler and Python's headers (no torch
headers, so pip's build isolation stays small). OpenMP is used when the compiler has it; without a compiler the
install still succeeds and `sparsecraft.kernels` explains how to get the kernels.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = "src/sparsecraft/kernels"
HEADERS = ["_kernels_common.h", "_avx2_template.h", "_avx512_kernels.h", "_avx512_template.h", "_run_template.h",
           "_shared_kernels.h", "_decode_step.h", "_avx512_dot_kernels.h", "_colskip.h"]


class BuildExt(build_ext):
    """Try the kernels with OpenMP, then without; a failed build is a warning (the extension is optional)."""

    def build_extension(self, ext):
        msvc = self.compiler.compiler_type == "msvc"
        base = ["/O2"] if msvc else ["-O3", "-std=gnu11"]
        omp = ["/openmp"] if msvc else ["-fopenmp"]
        for compile_args, link_args in ((base + omp, [] if msvc else omp), (base, [])):
            ext.extra_compile_args, ext.extra_link_args = compile_args, link_args
            try:
                super().build_extension(ext)
                return
            except Exception as exc:  # noqa: BLE001 - any compiler failure: retry without OpenMP, then give up
                last = exc
        print(f"warning: sparsecraft's CPU kernels were not built ({last}); install a C compiler "
              "(e.g. `apt-get install build-essential`) and reinstall to use sparsecraft.kernels")


setup(
    ext_modules=[Extension("sparsecraft.kernels._sparsekernels", [f"{KERNELS}/_sparsekernels.c"],
                           depends=[f"{KERNELS}/{h}" for h in HEADERS], optional=True)],
    cmdclass={"build_ext": BuildExt},
)
