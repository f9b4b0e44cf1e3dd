"""The Hopper cluster GroupNorm forward (hbkernels/cuda/group_norm_cluster.cu): its launch plan (CPU),
its build (wherever nvcc is), and its results against float64 (on a GPU with compute capability 9+)."""
import ctypes

import pytest
import torch

import hbkernels
from hbkernels.cuda import build
from hbkernels.cuda import group_norm as cluster
from helpers import ON_GPU, check_against_float64, rand

H100_LIMIT = 232448 - 416  # an H100 block's opt-in shared memory, less the kernel's static 416 bytes
HAS_NVCC = build.nvcc() is not None
CLUSTER_GPU = ON_GPU and torch.version.hip is None and torch.cuda.get_device_capability()[0] >= 9 and HAS_NVCC


def video4(n, c, t, s, dtype=torch.float16, **kwargs):
    return torch.empty((n, c, t, s), dtype=dtype, **kwargs)


@pytest.mark.parametrize("t,fraction,blocks", [(16, 1.0, 4), (26, 1.0, 6), (16, 0.5, 8), (26, 0.5, 12)])
def test_plan_takes_the_fewest_blocks_that_hold_a_group(t, fraction, blocks):
    # level 0 at 320x512 (S = 40 * 64), fp16: a group is 10 channels = 819,200 bytes at T16
    x = video4(1, 320, t, 2560)
    p = cluster.plan(x, torch.empty_like(x), 32, H100_LIMIT, fraction)
    group_bytes = 10 * t * 2560 * 2
    assert p.blocks == blocks
    assert p.blocks * p.vecs_per_block * 16 >= group_bytes > (p.blocks - 1) * p.vecs_per_block * 16
    assert p.smem == p.vecs_per_block * 16 + 2 * 10 * 4 <= H100_LIMIT * fraction
    assert (p.blocks - 1) * (H100_LIMIT * fraction - 80) < group_bytes  # one block fewer would not hold it


@pytest.mark.parametrize("dtype,vector", [(torch.float32, 4), (torch.float16, 8), (torch.bfloat16, 8)])
def test_plan_needs_whole_vectors_per_channel(dtype, vector):
    x = video4(2, 8, 1, vector, dtype)
    assert cluster.plan(x, torch.empty_like(x), 4, H100_LIMIT).blocks == 1
    x = video4(2, 8, 1, vector + 2, dtype)  # a 16-byte vector would straddle two channels
    assert cluster.plan(x, torch.empty_like(x), 4, H100_LIMIT) is None


def test_plan_rejects_what_the_kernel_cannot_address():
    x = video4(2, 16, 4, 64)
    y = torch.empty_like(x)
    assert cluster.plan(x, y, 4, H100_LIMIT) is not None
    # channels-last: a group is not one run
    cl = torch.empty(2, 4, 64, 16, dtype=torch.float16).permute(0, 3, 1, 2)
    assert cluster.plan(cl, y, 4, H100_LIMIT) is None and cluster.plan(x, cl, 4, H100_LIMIT) is None
    # a view starting one element (2 bytes) past a 16-byte boundary
    shifted = torch.empty(2 * 16 * 4 * 64 + 1, dtype=torch.float16)[1:].view(2, 16, 4, 64)
    assert cluster.plan(shifted, y, 4, H100_LIMIT) is None
    # samples a non-whole number of vectors apart
    gapped = torch.empty(2, 16 * 4 * 64 + 3, dtype=torch.float16)[:, :16 * 4 * 64].view(2, 16, 4, 64)
    assert cluster.plan(gapped, y, 4, H100_LIMIT) is None
    # float64 (the reference's), mismatched output dtype
    assert cluster.plan(x.double(), y.double(), 4, H100_LIMIT) is None
    assert cluster.plan(x, y.float(), 4, H100_LIMIT) is None
    # a group larger than 16 blocks' shared memory
    assert cluster.plan(x, y, 4, 128) is None  # a 2 KiB group, 96 bytes per block
    # more (sample, group) clusters than grid axis 1 takes
    many = video4(1, 65536, 1, 8)
    assert cluster.plan(many, torch.empty_like(many), 65536, H100_LIMIT) is None


@pytest.mark.skipif(not HAS_NVCC, reason="no nvcc")
def test_kernels_fit_one_1024_thread_block_per_sm_without_spilling():
    report = build.resource_usage(cluster.SOURCE)
    kernels = report.count("Compiling entry function")
    assert kernels == 6  # fp32 / fp16 / bf16, with and without SiLU
    assert report.count("0 bytes spill stores, 0 bytes spill loads") == kernels, report
    registers = [int(line.split("Used ")[1].split()[0]) for line in report.splitlines() if "registers" in line]
    assert len(registers) == kernels and max(registers) <= 64, registers  # 65,536 registers / 1024 threads


@pytest.mark.skipif(not HAS_NVCC, reason="no nvcc")
def test_build_is_cached_and_leaves_no_partial_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HBKERNELS_CACHE_DIR", str(tmp_path))
    first = build.build(cluster.SOURCE)
    stamp = first.stat().st_mtime_ns
    assert build.build(cluster.SOURCE) == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # the temporary build folder is gone
    lib = ctypes.CDLL(str(first))
    lib.hb_error_string.restype = ctypes.c_char_p
    if not torch.cuda.is_available():  # without a GPU the library loads and reports why it cannot run
        limit = ctypes.c_int(-1)
        err = lib.hb_device_limits(0, ctypes.byref(limit), ctypes.byref(ctypes.c_int()), ctypes.byref(ctypes.c_int()))
        assert err != 0 and lib.hb_error_string(err) and limit.value == 0


def test_build_names_a_missing_nvcc(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "nvcc", lambda: None)
    with pytest.raises(build.BuildError, match="nvcc not found"):
        build.build(cluster.SOURCE)


# ---------------------------------------------------------------- on a Hopper GPU
gpu = pytest.mark.skipif(not CLUSTER_GPU, reason="needs a CUDA GPU of compute capability 9+ and nvcc")


@pytest.fixture
def cluster_only(monkeypatch):
    """The cluster forward switched on, and the Triton forward's statistics kernel made to fail: a
    test passes only if the cluster kernel produced its results."""
    from hbkernels.triton import group_norm as gn

    class Unlaunchable:
        def __getitem__(self, grid):
            raise AssertionError("the Triton statistics pass ran instead of the cluster kernel")

    monkeypatch.setattr(gn, "CLUSTER_FORWARD", True)
    monkeypatch.setattr(gn, "_gn_stats_kernel", Unlaunchable())
    return gn


# (shape, groups, shared-memory fraction): level 0-2's sizes; clusters not a power of two, and over 8
# blocks (non-portable), some forced by a small fraction; batch 2; 4D
# (fp16 / fp32 blocks: 1 / 2, 2 / 4, 4 / 8, 6 / 12, 8 / 15, 3 / 5)
GPU_CASES = [((1, 1280, 16, 10, 16), 32, 1.0), ((2, 640, 16, 20, 32), 32, 1.0), ((1, 320, 16, 40, 64), 32, 1.0),
             ((1, 320, 26, 40, 64), 32, 1.0), ((1, 64, 8, 16, 32), 4, 0.08), ((2, 96, 64, 64), 32, 0.05)]


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,groups,fraction", GPU_CASES)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_cluster_forward_against_float64(cluster_only, monkeypatch, dtype, shape, groups, fraction, activation):
    monkeypatch.setattr(cluster_only, "CLUSTER_SMEM_FRACTION", fraction)
    c = shape[1]
    x = rand(*shape, dtype=torch.float64, mean=3.0, requires_grad=True)
    w = rand(c, dtype=torch.float64, mean=1.0, requires_grad=True)
    b = rand(c, dtype=torch.float64, requires_grad=True)
    check_against_float64(lambda x, w, b: hbkernels.group_norm(x, groups, w, b, activation=activation),
                          [x, w, b], "triton", dtype)


@gpu
@pytest.mark.parametrize("blocks_fraction", [1.0, 0.05])
def test_cluster_forward_statistics_and_shift(cluster_only, monkeypatch, blocks_fraction):
    """mean and rstd (what the backward reads) of x + shift, written once per group; no affine."""
    from hbkernels import triton as kernels

    monkeypatch.setattr(cluster_only, "CLUSTER_SMEM_FRACTION", blocks_fraction)
    n, c, t, s, g = 2, 64, 8, 512, 8
    x = rand(n, c, t, s, dtype=torch.float16, mean=-2.0)
    shift = 10 * rand(n, c)
    y = torch.full_like(x, float("nan"))
    mean, rstd = (torch.full((n, g), float("nan"), device=x.device) for _ in range(2))
    kernels.gn_fwd(x, None, None, shift, y, mean, rstd, g, 1e-5, True)
    z = (x.double() + shift.double()[:, :, None, None]).view(n, g, -1)
    want_mean, want_var = z.mean(-1), z.var(-1, unbiased=False)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), (want_var + 1e-5).rsqrt(), rtol=1e-5, atol=0)
    want = torch.nn.functional.silu((z - want_mean[..., None]) * (want_var[..., None] + 1e-5).rsqrt()).view(x.shape)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=4e-3)


@gpu
def test_cluster_forward_replays_from_a_cuda_graph(cluster_only):
    from hummingbird.cuda_graph import CUDAGraphCall

    w, b = rand(320, dtype=torch.float16, mean=1.0), rand(320, dtype=torch.float16)
    graphed = CUDAGraphCall(lambda x: hbkernels.group_norm(x, 32, w, b, activation="silu"))
    for _ in range(3):
        x = rand(1, 320, 16, 40, 64, dtype=torch.float16, mean=3.0)
        want = torch.nn.functional.silu(torch.nn.functional.group_norm(x.double(), 32, w.double(), b.double()))
        torch.testing.assert_close(graphed(x).double(), want, rtol=0, atol=1e-2)


@gpu
def test_cluster_forward_leaves_other_layouts_to_triton(monkeypatch):
    """Channels-last x (the plan declines it) runs the Triton passes, with the cluster forward on."""
    from hbkernels.triton import group_norm as gn

    monkeypatch.setattr(gn, "CLUSTER_FORWARD", True)
    x = rand(1, 64, 4, 8, 8, dtype=torch.float16).contiguous(memory_format=torch.channels_last_3d)
    launched = []

    class Recorded:
        def __getitem__(self, grid, real=gn._gn_stats_kernel):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(gn, "_gn_stats_kernel", Recorded())
    y = hbkernels.group_norm(x, 8, activation="silu")
    assert launched
    torch.testing.assert_close(y.double(), torch.nn.functional.silu(torch.nn.functional.group_norm(x.double(), 8)),
                               rtol=0, atol=4e-3)

