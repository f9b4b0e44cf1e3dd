"""Builds hbkernels._C (the C++/OpenMP CPU backend) from csrc/. Without a working compiler the
package still installs and hbkernels falls back to its PyTorch reference backend at run time."""
import glob
import os
import platform
import sys

from setuptools import setup


def _flag(name):
    """On for 1, true, on, yes, y (any case), as hbkernels reads its other HBKERNELS_* flags."""
    return os.environ.get(name, "").lower() in ("1", "true", "on", "yes", "y")


def cpp_extensions():
    if _flag("HBKERNELS_NO_CPP"):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("hbkernels: torch not importable at build time; skipping the C++ backend", file=sys.stderr)
        return [], {}
    flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-std=c++20"]  # torch's own headers want C++20
    if not _flag("HBKERNELS_PORTABLE"):
        flags.append("-march=native")  # built where it runs (pip install -e .)
    elif platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=x86-64-v3")  # wheels: AVX2/FMA/F16C (Haswell+); without them csrc/vec.h falls back to scalar

    class OptionalBuildExtension(BuildExtension):
        """A failed compile leaves the pure-Python package intact instead of failing the install."""

        def finalize_options(self):
            super().finalize_options()
            # distutils' up-to-date check (without ninja) sees neither the -march flag nor csrc/*.h: a
            # "portable" wheel could ship a -march=native library left by an earlier build
            self.force = True

        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any compiler failure means "no C++ backend"
                print(f"hbkernels: C++ backend not built ({err}); the PyTorch reference backend will be used",
                      file=sys.stderr)

    ext = CppExtension(
        "hbkernels._C",
        sorted(glob.glob("csrc/*.cpp")),
        extra_compile_args=flags,
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = cpp_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
