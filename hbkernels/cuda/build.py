"""Builds a ``.cu`` file of this package into a shared library with nvcc on first use and loads it.

The library exports plain C functions (no PyTorch headers: a build takes seconds, not a minute, and
does not depend on the torch it runs beside); callers pass tensors' data pointers and the current
stream. Built libraries are cached per source, compiler and flags under ``HBKERNELS_CACHE_DIR``
(default ``~/.cache/hbkernels``), each written under a temporary name and renamed into place, so an
interrupted or concurrent build never leaves a partial library behind.
"""
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger("hbkernels")

HERE = Path(__file__).resolve().parent
# sm_90 machine code, plus sm_90 PTX that newer GPUs' drivers compile at load. Thread-block clusters
# and distributed shared memory need sm_90; nothing here needs the sm_90a-only instructions.
ARCH_FLAGS = ("-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90")
FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", *ARCH_FLAGS)  # static cudart: no runtime to find


class BuildError(RuntimeError):
    """nvcc is missing or failed."""


def nvcc() -> str | None:
    """The nvcc of ``CUDA_HOME`` / ``CUDA_PATH``, else the one on PATH, else /usr/local/cuda's."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def cache_dir() -> Path:
    if os.environ.get("HBKERNELS_CACHE_DIR"):
        return Path(os.environ["HBKERNELS_CACHE_DIR"])
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError as err:  # no HOME and no passwd entry (containers run as an arbitrary user)
        raise BuildError(f"no cache folder for the CUDA kernels: set HBKERNELS_CACHE_DIR ({err})") from err
    return base / "hbkernels"


def _run(cmd) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise BuildError(f"nvcc failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return proc


def build(source: str) -> Path:
    """The shared library built from ``hbkernels/cuda/<source>`` (built now if not cached)."""
    src = HERE / source
    compiler = nvcc()
    if compiler is None:
        raise BuildError("nvcc not found (set CUDA_HOME or put the CUDA toolkit's bin on PATH)")
    version = _run([compiler, "--version"]).stdout
    key = hashlib.sha256(src.read_bytes() + version.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = cache_dir() / f"{src.stem}-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    logger.info("hbkernels: compiling %s with %s (once; cached as %s)", src.name, compiler, out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        partial = Path(tmp) / out.name
        _run([compiler, *FLAGS, "-o", str(partial), str(src)])
        os.replace(partial, out)
    return out


def resource_usage(source: str) -> str:
    """ptxas's report (registers, shared memory, spills per kernel) for ``source``'s sm_90 code."""
    compiler = nvcc()
    if compiler is None:
        raise BuildError("nvcc not found")
    with tempfile.TemporaryDirectory() as tmp:
        proc = _run([compiler, "-O3", "-std=c++17", "-cubin", ARCH_FLAGS[0], "-Xptxas", "-v",
                     "-o", str(Path(tmp) / "k.cubin"), str(HERE / source)])
    return proc.stderr


@functools.lru_cache(maxsize=None)
def load(source: str) -> ctypes.CDLL:
    return ctypes.CDLL(str(build(source)))
