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
    """The @triton.jit kernels of every module in hbkernels/triton (a new module is found too) and of
    the benchmarks."""
    import hbkernels.triton
    from bench import memory_floor

    mods = [importlib.import_module(f"hbkernels.triton.{info.name}")
            for info in pkgutil.iter_modules(hbkernels.triton.__path__)]
    return {n for mod in [*mods, memory_floor] for n in vars(mod) if n.startswith("_") and n.endswith("_kernel")}


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


@pytest.mark.skipif(not backend.triton_available(), reason="no triton")
def test_one_pass_residency_is_checked():
    """The one-pass backward's programs wait for their group: each must fit ONE_PASS_MIN_RESIDENT (>= 2:
    two launches on other streams) per sm_90 SM. Its largest tiles fit 2, so asking for 3 must fail
    the check, and only for the one-pass backward."""
    from triton.backends import backends

    from hbkernels.triton import group_norm

    assert group_norm.ONE_PASS_MIN_RESIDENT >= 2
    if "nvidia" not in backends:
        pytest.skip("this triton install has no nvidia backend")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import gpu_compile_check as check; "
            "check.group_norm.ONE_PASS_MIN_RESIDENT = 3; sys.exit(check.main('sm90'))")
    proc = subprocess.run([sys.executable, "-c", code, str(SCRIPT.parent)], capture_output=True, text=True, check=False,
                          timeout=900)
    fails = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert proc.returncode == 1 and fails, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert all(line.startswith("FAIL _gn_one_pass") and "under ONE_PASS_MIN_RESIDENT = 3" in line for line in fails)
