"""Builds this project's CUDA sources for the CPU emulator in this folder (emulator.h: each block an
OS thread, each CUDA thread a fiber), so the kernels' logic runs where there is no GPU. The source is
compiled unchanged by g++, with these headers in place of CUDA's."""
import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _contraction_flags() -> list:
    """a * b + c contracted into one FMA, as nvcc and ptxas do by default (g++'s ISO modes do not), where
    the host has FMA: rounding that depends on the contraction then shows here too."""
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            has_fma = " fma " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
        except OSError:
            has_fma = False
        return ["-mfma", "-ffp-contract=fast"] if has_fma else []
    return ["-ffp-contract=fast"] if platform.machine() in ("aarch64", "arm64") else []


def compiler() -> str | None:
    return shutil.which("g++")


def build(source: Path, out_dir: Path) -> ctypes.CDLL:
    """``source`` (a .cu file) built against the emulator into ``out_dir`` and loaded."""
    out = Path(out_dir) / f"{Path(source).stem}-emulated.so"
    # -fno-extern-tls-init: `extern __shared__` arrays become `extern thread_local` ones, which g++ would
    # otherwise reach through an initialisation hook that no translation unit defines. Warnings are
    # errors (a lint of the kernels' source that CI runs), but for nvcc's `#pragma unroll` and the
    # scheduler's loop around swapcontext, whose variables are not live across it.
    cmd = [compiler(), "-std=c++20", "-O2", *_contraction_flags(), "-fPIC", "-shared", "-pthread",
           "-fno-extern-tls-init", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-Wno-clobbered", "-I",
           str(HERE), "-x", "c++", "-o", str(out), str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"emulator build failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return ctypes.CDLL(str(out))
