"""The CPU emulator that runs the project's CUDA kernels in CI (tests/cuda_emulator): each mistake it
claims to catch, caught, and the correct twin of each passing (tests/cuda_emulator/selftest.cu)."""
import ctypes

import pytest
import torch

import cuda_emulator

pytestmark = pytest.mark.skipif(cuda_emulator.compiler() is None, reason="no g++")


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    lib = cuda_emulator.build(cuda_emulator.HERE / "selftest.cu", tmp_path_factory.mktemp("emulator"))
    lib.hb_error_string.restype = ctypes.c_char_p
    return lib


def run(lib, name, blocks=1, smem=0, seed=0, out=None):
    """Launches the self-test kernel ``name`` on ``out`` (64 floats, by default NaN): (its 64 outputs, the
    launch's error string)."""
    out = torch.full((64,), float("nan")) if out is None else out
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HBEMU_SEED", str(seed))
        patch.setenv("HBEMU_TIMEOUT", "1")
        err = lib.hb_selftest(name.encode(), blocks, smem, ctypes.c_void_p(out.data_ptr()))
    return out, lib.hb_error_string(err).decode()


def test_a_missing_syncthreads_shows_in_the_results(selftest):
    """Fibers run in a shuffled order between barriers and shared memory starts as NaN, so reading a
    neighbour's store without a barrier between gives NaN for some threads, different ones per seed."""
    want = (torch.arange(64) + 1) % 64
    runs = [run(selftest, "neighbours", smem=256, seed=seed)[0] for seed in (1, 2)]
    assert all(out.isnan().any() for out in runs)
    assert not torch.equal(runs[0].isnan(), runs[1].isnan())
    for seed in (1, 2):
        out, error = run(selftest, "neighbours_synced", smem=256, seed=seed)
        assert error == "no error" and torch.equal(out, want.float())


def test_a_divergent_syncthreads_is_reported_as_a_deadlock(selftest):
    _, error = run(selftest, "divergent_sync")
    assert "deadlock" in error and "32 waiting at __syncthreads" in error and "32 threads exited" in error


def test_partial_warp_shuffles_are_refused(selftest):
    assert "partial mask" in run(selftest, "partial_shuffle")[1]


def test_writes_past_the_dynamic_shared_memory_are_reported(selftest):
    assert "wrote dynamic shared memory past the launch's 256 bytes" in run(selftest, "shared_overrun", smem=256)[1]


def test_reading_an_exited_blocks_shared_memory_is_reported(selftest):
    """The cluster rule the kernels' final arrive/wait keeps: a block may not exit while another block
    of its cluster may still read its shared memory."""
    out, error = run(selftest, "read_after_exit", blocks=2)
    assert "block 1 read the shared memory of block 0 of its cluster after that block exited" in error
    out, error = run(selftest, "read_after_exit_guarded", blocks=2)
    assert error == "no error" and out[0] == 10.0


def test_asynchronous_copies_land_at_their_wait(selftest):
    """cp.async (__pipeline_memcpy_async): what a thread reads before the wait that covers its copy is
    shared memory's old content; copies never waited for, and misaligned ones, are reported."""
    data = torch.randn(64)
    out, error = run(selftest, "copy_async", smem=256, out=data.clone())
    assert error == "no error" and torch.equal(out, data)
    out, error = run(selftest, "copy_async_unwaited_read", smem=256, out=data.clone())
    assert error == "no error" and out.isnan().all()
    assert "asynchronous copies it never waited for" in run(selftest, "copy_async_unwaited_exit", smem=256)[1]
    error = run(selftest, "copy_async_misaligned", smem=256, out=data.clone())[1]
    assert "__pipeline_memcpy_async of 8 bytes from or to a misaligned address" in error


def test_launch_limits(selftest):
    assert "launch refused: cluster of 9 blocks" in run(selftest, "neighbours_synced", blocks=9, smem=256)[1]
    assert run(selftest, "neighbours_synced", smem=232448)[1] == "no error"
    assert run(selftest, "neighbours_synced", smem=232449)[1] == "invalid argument"  # past the opt-in limit


@pytest.mark.parametrize("dtype,kind", [(torch.float16, 0), (torch.bfloat16, 1)])
def test_half_precision_conversions_match_torch(selftest, dtype, kind):
    """The stand-ins for cuda_fp16.h / cuda_bf16.h round as the GPU (and torch) do: every 16-bit pattern
    to float, and floats to 16 bits at random magnitudes, at subnormals, halfway ties, overflow, inf and
    NaN."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    back = torch.empty(every.numel(), dtype=torch.float32)
    selftest.hb_convert(kind + 2, ctypes.c_void_p(every.data_ptr()), ctypes.c_void_p(back.data_ptr()), every.numel())
    want = every.view(dtype).float()
    assert torch.equal(back.isnan(), want.isnan()) and torch.equal(back[~want.isnan()], want[~want.isnan()])
    floats = torch.cat([torch.randn(20000) * 10.0 ** torch.randint(-9, 7, (20000,)).float(),
                        want[~want.isnan()], (want[1:] + want[:-1]) / 2,  # every value and every halfway point
                        torch.tensor([65519.0, 65520.0, 1e6, float("inf"), -float("inf"), 3e-8, 1e-45])])
    floats = floats[floats.isfinite() | floats.isinf()]
    bits = torch.empty(floats.numel(), dtype=torch.int16)
    selftest.hb_convert(kind, ctypes.c_void_p(floats.data_ptr()), ctypes.c_void_p(bits.data_ptr()), floats.numel())
    assert torch.equal(bits, floats.to(dtype).view(torch.int16))
    nan = torch.tensor([float("nan")])
    selftest.hb_convert(kind, ctypes.c_void_p(nan.data_ptr()), ctypes.c_void_p(bits.data_ptr()), 1)
    assert bits[:1].view(dtype).isnan().all()
