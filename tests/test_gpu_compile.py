"""Every Triton kernel variant the ops launch compiles for an NVIDIA H100 (sm_90, cubin via ptxas) and
an AMD MI300 (gfx942, hsaco) within their shared-memory limits: the part of a GPU run that the
interpreter-based tests cannot see. The work happens in tests/gpu_compile_check.py, in a subprocess,
because these tests' process imported triton in interpreter mode."""
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hbkernels import backend

SCRIPT = Path(__file__).with_name("gpu_compile_check.py")
BACKEND_OF = {"sm90": "nvidia", "gfx942": "amd"}


def _all_kernels() -> set:
    """The @triton.jit kernels of every module in hbkernels/triton (a new module is found too)."""
    import hbkernels.triton

    names = set()
    for info in pkgutil.iter_modules(hbkernels.triton.__path__):
        mod = importlib.import_module(f"hbkernels.triton.{info.name}")
        names |= {n for n in vars(mod) if n.startswith("_") and n.endswith("_kernel")}
    return names


@pytest.fixture(scope="module")
def compile_runs():
    """{target: (returncode, stdout, stderr)}, the targets compiled concurrently (one process each)."""
    from triton.backends import backends

    procs = {target: subprocess.Popen([sys.executable, str(SCRIPT), target], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
             for target, name in BACKEND_OF.items() if name in backends}
    return {target: (p.communicate(timeout=900), p.returncode) for target, p in procs.items()}


@pytest.mark.skipif(not backend.triton_available(), reason="no triton")
@pytest.mark.parametrize("target", sorted(BACKEND_OF))
def test_every_kernel_compiles_for_gpu_target(target, compile_runs):
    if target not in compile_runs:
        pytest.skip(f"this triton install has no {BACKEND_OF[target]} backend")
    (stdout, stderr), returncode = compile_runs[target]
    lines = stdout.splitlines()
    assert returncode == 0, "\n".join([line for line in lines if line.startswith("FAIL")] + [stderr[-3000:]])
    summary = re.search(r"(\d+) variants of \d+ kernels \((.*)\), 0 failed", lines[-1])
    assert summary, lines[-1:]
    assert set(summary.group(2).split(", ")) == _all_kernels()  # no kernel left out of the check
    assert int(summary.group(1)) == sum(line.startswith("ok ") for line in lines)
