"""Builds kvchat's C kernel when kvchat is installed; everything else about the package is in pyproject.toml.

The kernel (kvchat/weights/kernels/) is one library holding every code path this machine's architecture has
(portable C everywhere; AVX2 with FMA and F16C on x86-64), each compiled from the same source with its own
flags; kvchat picks one at run time by what the CPU runs. OpenMP is used where the compiler has it. Where no C
compiler works the build is skipped (the extension is optional): kvchat then computes with PyTorch alone and
`kvchat info` says why.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError

KERNELS = Path("kvchat") / "weights" / "kernels"
BODY, MODULE = KERNELS / "packed_matvec.c", KERNELS / "module.c"
# No contraction of a * b + c into one rounding: every path must compute the same bits (see packed_matvec.c).
COMMON = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
OPENMP = ["-fopenmp"]


def source_digest(root: Path) -> str:
    """SHA-256 of the kernel's sources, as kvchat.weights.quant checks it against the built library."""
    digest = hashlib.sha256()
    for path in (BODY, MODULE):
        digest.update((root / path).read_bytes())
    return digest.hexdigest()


def code_paths(machine: str) -> list[tuple[str, list[str]]]:
    """(name, extra compiler flags) of each path built for this architecture."""
    paths = [("scalar", [])]
    if machine.lower() in ("x86_64", "amd64"):
        paths.append(("avx2", ["-mavx2", "-mfma", "-mf16c"]))
    return paths


class BuildKernel(build_ext):
    """Compiles packed_matvec.c once per code path and links the objects with module.c into one library."""

    def build_extension(self, ext: Extension) -> None:
        if self.compiler.compiler_type not in ("unix", "mingw32"):
            raise CCompilerError(f"kvchat's kernel is built with gcc or clang, not {self.compiler.compiler_type}")
        failure: CCompilerError | None = None
        for openmp in (OPENMP, []):  # OpenMP where the compiler has it
            try:
                self._build(ext, openmp)
                return
            except CCompilerError as exc:
                failure = exc
        assert failure is not None, "the kernel's build ended without a result"
        raise failure

    def _build(self, ext: Extension, openmp: list[str]) -> None:
        paths = code_paths(platform.machine())
        objects: list[str] = []
        for name, flags in paths:
            objects += self.compiler.compile(
                [str(BODY)], output_dir=str(Path(self.build_temp) / name), macros=[("KVCHAT_PATH", name)],
                extra_postargs=[*COMMON, *openmp, *flags], debug=self.debug)
        ext.extra_objects = objects
        ext.define_macros = [("KVCHAT_PATHS", '"' + " ".join(name for name, _ in paths) + '"'),
                             ("KVCHAT_SOURCE_DIGEST", '"' + source_digest(Path(".")) + '"')]
        ext.extra_compile_args = list(COMMON)
        ext.extra_link_args = [*openmp, "-lm"]
        super().build_extension(ext)


setup(
    ext_modules=[Extension("kvchat.weights._kernel", sources=[str(MODULE)], optional=True)],
    cmdclass={"build_ext": BuildKernel},
)
