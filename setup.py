"""The optional C extension ``bbdecoder.monitor._fused`` (the monitor's CPU passes in one loop).

Everything else is configured in pyproject.toml. The extension is optional: where it does not
build (no C compiler), the install goes on and ``bbdecoder.monitor.cpu_reductions`` uses NumPy.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = "src/bbdecoder/monitor/csrc"


class BuildFused(build_ext):
    """Adds the optimisation flags GCC and Clang understand (the SIMD pragmas, nothing else of OpenMP:
    the threads are torch's, found at run time)."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix":
            for extension in self.extensions:
                # no FMA contraction: the statistics' arithmetic rounds as Python's does
                extension.extra_compile_args += ["-O3", "-fopenmp-simd", "-ffp-contract=off"]
                if sys.platform.startswith("linux"):
                    extension.libraries += ["dl"]  # dlopen (in libc itself from glibc 2.34)
        super().build_extensions()


FUSED_SOURCES = ["module", "buffers", "blocks", "threads", "gradients", "weights", "probes", "tensor_rules"]

setup(
    ext_modules=[
        Extension(
            "bbdecoder.monitor._fused",
            [f"{SOURCES}/{name}.c" for name in FUSED_SOURCES],
            depends=[f"{SOURCES}/fused.h", f"{SOURCES}/probe_loops.h"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildFused},
)
