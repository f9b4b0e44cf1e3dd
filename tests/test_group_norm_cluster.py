"""The Hopper cluster GroupNorm kernels (hbkernels/cuda/group_norm_cluster.cu): their launch plans (CPU),
their build and argument passing (wherever nvcc is), and their results against float64, forward and
backward: on the CPU emulator (tests/cuda_emulator, wherever g++ is) and on a GPU with compute
capability 9+."""
import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cuda_emulator
import hbkernels
from hbkernels.cuda import build
from hbkernels.cuda import group_norm as cluster
from helpers import ON_GPU, assert_within_torch_error, check_against_float64, rand

H100_LIMIT = 232448 - 224  # an H100 block's opt-in shared memory, less the forward's static 224 bytes
HAS_NVCC = build.nvcc() is not None
CLUSTER_GPU = ON_GPU and torch.version.hip is None and torch.cuda.get_device_capability()[0] >= 9 and HAS_NVCC


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """The kernels' library, built once for this module into a temporary cache (not the user's)."""
    if not HAS_NVCC:
        pytest.skip("no nvcc")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HBKERNELS_CACHE_DIR", str(tmp_path_factory.mktemp("hbkernels-cache")))
        cluster._library.cache_clear()
        yield cluster._library()
    cluster._library.cache_clear()


def video4(n, c, t, s, dtype=torch.float16, **kwargs):
    return torch.empty((n, c, t, s), dtype=dtype, **kwargs)


def h100_resident(blocks, smem):
    """A model of an H100's cluster residency: 132 SMs, one block per SM (a 512-thread block at 59-128
    registers takes more than half the register file). The device's own count also depends on how its
    SMs split into GPCs: a cluster's blocks share one."""
    return 132 // blocks


def level_plan(t, c=320, n=1, dtype_size=2, blocks=None, resident=h100_resident, cooperative=False, stages=1):
    """plan() for VideoCrafter2's level with C channels at 320x512 (level 0: 40 x 64 positions)."""
    hw = {320: 2560, 640: 640, 1280: 160}[c]
    return cluster.plan(n * 32, c // 32 * t * hw, c // 32, dtype_size, H100_LIMIT, 132, resident, blocks,
                        cooperative=cooperative, stages=stages)


@pytest.mark.parametrize("t,c,n,blocks", [(16, 320, 1, 4), (26, 320, 1, 8), (16, 1280, 1, 4), (16, 640, 2, 2)])
def test_plan_spreads_groups_over_the_sms_in_fewest_waves(t, c, n, blocks):
    p = level_plan(t, c, n)
    group_units = c // 32 * t * {320: 2560, 640: 640, 1280: 160}[c] * 2 // 16
    assert p.blocks == blocks
    assert p.blocks * p.units_per_block >= group_units > (p.blocks - 1) * p.units_per_block  # covered, none idle
    assert p.smem == p.units_per_block * 16 + 3 * c // 32 * 4 <= H100_LIMIT


def test_plan_estimate():
    # level 0, T26, fp16 (1.33 MB groups): 6 blocks (222 KB each, one per SM) is the fewest that hold a
    # group, but 22 such clusters fit at once: 32 groups take a wave of 22 and one of 10, 2 x 222 KB
    # per SM. 8 blocks (166 KB) run 16 + 16: 2 x 166 KB
    assert level_plan(26, blocks=6).blocks == 6
    assert h100_resident(6, level_plan(26, blocks=6).smem) == 22
    assert level_plan(26).blocks == 8
    # level 0, T16: were one 4-block cluster too many for the GPCs (31 at once), 32 groups would take
    # two waves of 200 KiB per SM: 8 blocks of 100 KiB take two waves of 100 KiB
    assert level_plan(16, resident=lambda r, smem: 31 if r == 4 else h100_resident(r, smem)).blocks == 8
    # where the device holds no such cluster at all, the next plan that runs
    assert level_plan(16, resident=lambda r, smem: 0 if r == 4 else h100_resident(r, smem)).blocks == 8
    # forced counts: taken where they hold a group, None where they do not
    assert level_plan(16, blocks=16).blocks == 16
    assert level_plan(16, blocks=3) is None
    # no cluster of 16 holds a group of 16 x 227 KiB + 1 vector
    assert cluster.plan(1, 16 * H100_LIMIT // 2 + 8, 1, 2, H100_LIMIT, 132, h100_resident) is None


def test_backward_plan_holds_dy_and_x():
    # level 0, T16, fp16: 1.6 MB of dy and x per group; 8 blocks of 200 KiB run 16 clusters at once (two
    # waves); 16 blocks of 100 KiB run 8 at once (four waves of half the bytes): a tie, fewer blocks win
    p = cluster.plan(32, 10 * 16 * 2560, 10, 2, H100_LIMIT, 132, h100_resident, **cluster.holdings(True, "nchw", 10, 2))
    assert (p.blocks, p.units_per_block, p.smem) == (8, 6400, 2 * 6400 * 16 + 7 * 10 * 4)
    # T26 needs 12 blocks (2.66 MB); fp32 T26 (5.3 MB) more than 16
    assert cluster.plan(32, 10 * 26 * 2560, 10, 2, H100_LIMIT, 132, h100_resident,
                        **cluster.holdings(True, "nchw", 10, 2)).blocks >= 12
    assert cluster.plan(32, 10 * 26 * 2560, 10, 4, H100_LIMIT, 132, h100_resident,
                        **cluster.holdings(True, "nchw", 10, 4)) is None


def test_channels_last_backward_blocks_start_on_positions():
    # level 0, T16, fp16: 5 units per position; dy and x of 51,200 positions in 8 blocks of 6400 positions
    p = cluster.plan(32, 10 * 16 * 2560, 10, 2, H100_LIMIT, 132, h100_resident,
                     **cluster.holdings(True, "channels_last", 10, 2))
    assert p.units_per_block % 5 == 0 and p.blocks * p.units_per_block >= 10 * 16 * 2560 // 2
    # forced 7 blocks: 204,800 units / 7 = 29,257.1, rounded up to whole positions (29,260): 2 x 117 KB
    # of dy and x is more than a block's shared memory
    assert cluster.plan(32, 10 * 16 * 2560, 10, 2, H100_LIMIT, 132, h100_resident, blocks=7,
                        **cluster.holdings(True, "channels_last", 10, 2)) is None
    p = cluster.plan(32, 10 * 4 * 2560, 10, 2, H100_LIMIT, 132, h100_resident, blocks=7,
                     **cluster.holdings(True, "channels_last", 10, 2))
    assert p.units_per_block == 7315  # 51,200 / 7 = 7314.3 -> 1463 positions of 5


def test_forward_plan_charges_each_wave():
    """The forward's clusters at level 0 T16 on an H200 (run 6): 30 four-block clusters resident, 17
    six-block, 15 eight-block, 7 of 12 or 16; timed 39, 34, 43, 68, 69 us. Charged bytes alone, 16
    blocks (five waves of 51 KB) look cheapest; with each wave's fixed cost, 6 (two of 137 KB) win."""
    measured = {4: 30, 6: 17, 8: 15, 12: 7, 16: 7}

    def h200_resident(r, smem):
        return measured.get(r, 0)

    def forward(**held):
        return cluster.plan(32, 10 * 16 * 2560, 10, 2, H100_LIMIT, 132, h200_resident, **held)

    assert forward(**cluster.holdings(False, "nchw", 10, 2)).blocks == 6
    assert forward(unit_bytes=16).blocks == 16


def test_cooperative_plan_takes_one_wave():
    """A cooperative grid must be resident at once: level 0 fp16 at T16 is 4 blocks per group (128 of 200
    KiB on 132 SMs); at T26 the fewest blocks that hold a group (6) make 192, more than the device holds,
    so no plan (the Triton passes run). Level 2 (1280 channels, 10 x 16 positions) spreads each group
    over 4 blocks rather than leave SMs idle."""
    def blocks_resident(r, smem):
        return 132

    def cooperative(t, c=320, blocks=None):
        return level_plan(t, c, blocks=blocks, resident=blocks_resident, cooperative=True)

    p = cooperative(16)
    assert (p.blocks, p.cooperative) == (4, True)
    assert cooperative(26) is None
    assert cooperative(16, c=1280).blocks == 4
    assert cooperative(16, blocks=5) is None  # 160 blocks
    assert not level_plan(16).cooperative


@pytest.mark.parametrize("stages,blocks", [(2, 8), (4, 16), (3, 12)])
def test_cooperative_stages_split_each_block_between_groups(stages, blocks):
    """In stages, each of level 0's 128-132 blocks holds slices of ``stages`` groups in the same 200 KiB,
    so a group spreads over ``stages`` times the blocks (3 stages: 11 rows of 12 blocks, the last row's
    third stage empty); T26 fits in no number of stages; stages need the cooperative grid."""
    p = level_plan(16, resident=lambda r, smem: 132, cooperative=True, stages=stages)
    assert (p.blocks, p.stages) == (blocks, stages)
    assert p.smem <= H100_LIMIT and p.blocks * -(-32 // stages) <= 132
    assert p.smem == stages * (p.units_per_block * 16 + 3 * 10 * 4)
    assert level_plan(26, resident=lambda r, smem: 132, cooperative=True, stages=stages) is None
    with pytest.raises(ValueError, match="stages: 1, or more with a cooperative grid; got 2"):
        level_plan(16, stages=2)
    # more stages than groups would hold empty slices: one group takes one stage
    one = [cluster.plan(1, 10 * 16 * 2560, 10, 2, H100_LIMIT, 132, lambda r, smem: 132, cooperative=True, stages=k)
           for k in (4, 1)]
    assert one[0].stages == 1 and one[0] == one[1]


def test_channels_last_plan_counts_4_byte_units():
    p = cluster.plan(32, 10 * 16 * 2560, 10, 2, H100_LIMIT, 132, h100_resident,
                     **cluster.holdings(False, "channels_last", 10, 2))
    assert (p.blocks, p.units_per_block, p.smem) == (4, 51200, 51200 * 4 + 3 * 10 * 4)


@pytest.mark.parametrize("dtype,vector", [(torch.float32, 4), (torch.float16, 8), (torch.bfloat16, 8)])
def test_nchw_needs_whole_vectors_per_channel(dtype, vector):
    x = video4(2, 8, 1, vector, dtype)
    assert cluster.layout(4, x, torch.empty_like(x)) == "nchw"
    x = video4(2, 8, 1, vector + 2, dtype)  # a 16-byte vector would straddle two channels
    assert cluster.layout(4, x, torch.empty_like(x)) is None


def channels_last(n, c, t, s, dtype=torch.float16):
    """An (N, C, T, S) view of channels-last memory (as video_view gives of channels_last_3d tensors)."""
    return torch.empty(n, t, s, c, dtype=dtype).permute(0, 3, 1, 2)


@pytest.mark.parametrize("dtype,cpg,ok", [(torch.float16, 10, True), (torch.float16, 5, False),
                                          (torch.bfloat16, 2, True), (torch.float32, 5, True)])
def test_channels_last_needs_whole_4_byte_units_per_group(dtype, cpg, ok):
    x = channels_last(2, 4 * cpg, 3, 6, dtype)
    assert cluster.layout(4, x, channels_last(2, 4 * cpg, 3, 6, dtype)) == ("channels_last" if ok else None)


def test_layout_only_where_the_kernel_can_address_the_tensors():
    x = video4(2, 16, 4, 64)
    y = torch.empty_like(x)
    assert cluster.layout(4, x, y) == "nchw"
    cl = channels_last(2, 16, 4, 64)
    assert cluster.layout(4, cl, channels_last(2, 16, 4, 64)) == "channels_last"
    # one layout each: the kernel addresses x and y alike
    assert cluster.layout(4, cl, y) is None and cluster.layout(4, x, cl) is None
    # the token layout GroupNorm writes for temporal attention, (N*H*W, T, C) seen as (N, C, T, H*W)
    tokens = torch.empty(2 * 64, 4, 16, dtype=torch.float16).reshape(2, 64, 4, 16).permute(0, 3, 2, 1)
    assert cluster.layout(4, x, tokens) is None
    # a view starting one element (2 bytes) past a 16-byte boundary (4-byte units: still aligned for those)
    shifted = torch.empty(2 * 16 * 4 * 64 + 1, dtype=torch.float16)[1:].view(2, 16, 4, 64)
    assert cluster.layout(4, shifted, y) is None
    # samples a non-whole number of vectors apart
    gapped = torch.empty(2, 16 * 4 * 64 + 3, dtype=torch.float16)[:, :16 * 4 * 64].view(2, 16, 4, 64)
    assert cluster.layout(4, gapped, y) is None
    # float64 (the reference's), a mismatched output dtype
    assert cluster.layout(4, x.double(), y.double()) is None
    assert cluster.layout(4, x, y.float()) is None
    # more (sample, group) clusters than grid axis 1 takes
    many = video4(1, 65536, 1, 8)
    assert cluster.layout(65536, many, torch.empty_like(many)) is None


@pytest.mark.skipif(not HAS_NVCC, reason="no nvcc")
def test_kernels_fit_one_512_thread_block_per_sm_without_spilling():
    report = build.resource_usage(cluster.SOURCE)
    kernels = report.count("Compiling entry function")
    # forward (clusters and cooperative) and backward: fp32 / fp16 / bf16 x SiLU or not x NCHW or channels-last
    assert kernels == 36
    assert report.count("0 bytes spill stores, 0 bytes spill loads") == kernels, report
    registers = [int(line.split("Used ")[1].split()[0]) for line in report.splitlines() if "registers" in line]
    assert len(registers) == kernels and max(registers) <= 128, registers  # 65,536 registers / 512 threads


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
        err = lib.hb_device_limits(0, ctypes.byref(limit))
        assert err != 0 and lib.hb_error_string(err) and limit.value == 0


def test_weights_are_read_as_given():
    """fp32 or x's dtype reach the kernels uncast (a cast is a launch of its own on every call), marked
    per bit; another dtype is cast to fp32 once; strided ones are made contiguous."""
    x = video4(1, 8, 2, 16)
    w16, b32 = torch.randn(8, dtype=torch.float16), torch.randn(8)
    w, b, fp32 = cluster._params(x, w16, b32)
    assert w is w16 and b is b32 and fp32 == 2
    w, b, fp32 = cluster._params(x, torch.randn(8, dtype=torch.bfloat16), None)
    assert w.dtype == torch.float32 and b is None and fp32 == 1
    w, _, fp32 = cluster._params(x, torch.randn(16, dtype=torch.float16)[::2], None)
    assert w.is_contiguous() and fp32 == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU, where launches succeed")
def test_launch_passes_its_arguments_and_reports_cuda_errors(library):
    """Every argument crosses ctypes (a wrong count or type raises ctypes.ArgumentError before the
    call), and a failed launch (here: no CUDA driver) raises with CUDA's own message."""
    x = video4(1, 8, 2, 16)
    mean, rstd = torch.empty(1, 2), torch.empty(1, 2)
    w = torch.ones(8, dtype=torch.float16)
    p = cluster.Plan(1, 32, 32 * 16 + 3 * 4 * 4)  # one block: 32 units and 3 coefficients for each of 4 channels
    with pytest.raises(RuntimeError, match=r"cluster GroupNorm launch failed \(CUDA driver|no CUDA-capable"):
        cluster.launch_fwd(p, "nchw", 0, 0, x, w, None, torch.zeros(1, 8), torch.empty_like(x), mean, rstd, 2, 1e-5,
                           True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU, where launches succeed")
@pytest.mark.parametrize("batch", [1, 2])
def test_backward_launch_passes_its_arguments_and_reports_cuda_errors(library, batch):
    x = video4(batch, 8, 2, 16)
    mean, rstd = torch.empty(batch, 2), torch.empty(batch, 2)
    dw, db = torch.empty(8), torch.empty(8)
    p = cluster.Plan(1, 32, 2 * 32 * 16 + 7 * 4 * 4)  # dy's and x's 32 units, 7 coefficients per channel
    with pytest.raises(RuntimeError, match=r"cluster GroupNorm launch failed \(CUDA driver|no CUDA-capable"):
        cluster.launch_bwd(p, "nchw", 0, 0, torch.empty_like(x), x, None, torch.ones(8), None, mean, rstd,
                           torch.empty_like(x), dw, db, 2, True)


@pytest.mark.parametrize("built", ["library", "emulated"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("S,C,cpg,e0,step", [(2560, 320, 10, 6, 1024), (2560, 320, 10, 0, 4096), (64, 96, 3, 5, 1024),
                                            (7, 40, 40, 3, 20), (40960, 1280, 40, 1022, 1024)])
def test_walks_reach_the_units_a_division_would(request, built, channels_last, S, C, cpg, e0, step):
    """The kernels' address walk (Layout, run on the host from the nvcc-built library and from the
    emulator's) against each unit's offset and channel computed by division: NCHW (offset e, channel
    e // S) and channels-last (offset (e // cpg) * C + e % cpg, channel e % cpg), across plane and
    position boundaries."""
    library = request.getfixturevalue(built)
    count = 300
    offsets, channels = (ctypes.c_longlong * count)(), (ctypes.c_int * count)()
    assert library.hb_layout_walk(int(channels_last), S, C, cpg, e0, step, count, offsets, channels) == 0
    e = [e0 + k * step for k in range(count)]
    if channels_last:
        want = ([i // cpg * C + i % cpg for i in e], [i % cpg for i in e])
    else:
        want = (e, [i // S for i in e])
    assert (list(offsets), list(channels)) == want


def test_build_names_a_missing_nvcc(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "nvcc", lambda: None)
    with pytest.raises(build.BuildError, match="nvcc not found"):
        build.build(cluster.SOURCE)


# ---------------------------------------------------------------- on the CPU emulator
@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The kernels built for the CPU emulator (the same source, g++ and tests/cuda_emulator's headers)."""
    if cuda_emulator.compiler() is None:
        pytest.skip("no g++")
    return cluster.declare(cuda_emulator.build(build.HERE / cluster.SOURCE, tmp_path_factory.mktemp("emulated")))


def emulated_plan(lib, shape, groups, element_size, layout_name, blocks, backward, cooperative=False, stages=1):
    """plan() on the emulated device (an H100's 132 SMs and shared memory), asked through the library's
    own device queries."""
    n, c, t, s = shape
    limit = ctypes.c_int()
    assert lib.hb_device_limits(0, ctypes.byref(limit)) == 0

    def resident(r, smem):
        count = ctypes.c_int()
        if cooperative:  # blocks, whatever r
            assert lib.hb_gn_cooperative_capacity(0, smem, ctypes.byref(count)) == 0
            return count.value
        assert lib.hb_gn_cluster_capacity(0, r, smem, ctypes.byref(count)) == 0
        return count.value

    cpg = c // groups
    return cluster.plan(n * groups, cpg * t * s, cpg, element_size, limit.value, 132, resident, blocks,
                        cooperative=cooperative, stages=stages,
                        **cluster.holdings(backward, layout_name, cpg, element_size))


PAD = 64  # NaN elements either side of every output, which the kernels must leave alone


def guarded(shape, dtype, channels_last=False):
    """A NaN (N, C, T, S) tensor (channels-last memory: (N, T, S, C)) inside a NaN buffer of PAD more
    elements each side, and that buffer."""
    n, c, t, s = shape
    buffer = torch.full((n * c * t * s + 2 * PAD,), float("nan"), dtype=dtype)
    inner = buffer[PAD:-PAD]
    return (inner.view(n, t, s, c).permute(0, 3, 1, 2) if channels_last else inner.view(shape)), buffer


def untouched(buffer):
    return bool(buffer[:PAD].isnan().all() and buffer[-PAD:].isnan().all())


def among_nan(v, channels_last=False):
    """``v`` copied into a guarded tensor: an input with NaN either side, so that a read past its ends
    poisons what the kernel computes from it."""
    inner, _ = guarded(tuple(v.shape) + (1,) * (4 - v.dim()), v.dtype, channels_last)
    return inner.view(v.shape).copy_(v)


# (N, C, T, S), groups, blocks per cluster (None: the plan's, 16 here for the small groups: a
# non-portable cluster whose last blocks hold nothing), activation, shift, weight and bias ("fp32", "x":
# x's dtype, None). The fourth case's blocks hold 16,384 elements: threads walk several units, across
# channel planes (NCHW) and positions (channels-last), in whole batches and ragged ones. The last has 96
# channels per group: channels-last positions of more than 32 units (48 fp16, 96 fp32), past what the
# backward's per-warp shuffle tree folds, and not dividing the block's 512 threads.
EMULATED_CASES = [((2, 16, 3, 64), 4, None, "silu", False, "fp32"), ((1, 24, 5, 32), 3, 3, None, True, "x"),
                  ((2, 8, 2, 16), 2, 1, "silu", False, None), ((1, 4, 8, 4096), 2, 4, "silu", True, "fp32"),
                  ((1, 192, 2, 32), 2, 2, "silu", False, "x")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,groups,blocks,activation,shifted,params", EMULATED_CASES)
@pytest.mark.parametrize("layout_name", ["nchw", "channels_last"])
def test_emulated_kernels_against_float64(emulated, monkeypatch, dtype, shape, groups, blocks, activation, shifted,
                                          params, layout_name):
    """The kernels' own code, run by the CPU emulator through launch_fwd / launch_bwd, held to 2x
    PyTorch's error in that dtype (forward, dx, dweight, dbias; mean and rstd to fp32 accuracy), with
    every output poisoned and guarded and every input between NaNs. The backward reads the forward's
    mean and rstd, as in training."""
    check_emulated(emulated, monkeypatch, dtype, shape, groups, blocks, activation, shifted, params, layout_name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,groups,blocks,activation,shifted,params", EMULATED_CASES)
@pytest.mark.parametrize("layout_name", ["nchw", "channels_last"])
def test_emulated_cooperative_forward_against_float64(emulated, monkeypatch, dtype, shape, groups, blocks,
                                                      activation, shifted, params, layout_name):
    """The forward as one cooperative grid (partials through global memory across grid.sync), as above."""
    check_emulated(emulated, monkeypatch, dtype, shape, groups, blocks, activation, shifted, params, layout_name,
                   cooperative=True)


@pytest.mark.parametrize("cooperative", [False, True])
@pytest.mark.parametrize("layout_name", ["nchw", "channels_last"])
def test_emulated_forward_of_constant_groups_is_the_bias(emulated, monkeypatch, cooperative, layout_name):
    """fp32 groups of one repeated value, held by 2 blocks each: the mean is that value and the output
    exactly the bias. Each thread's batch mean was a plain sum / count, an ulp or two off the value, and
    the normalisation multiplied that by 1/sqrt(eps) (outputs 0.06 off the bias)."""
    monkeypatch.setattr(cluster, "_library", lambda: emulated)
    shape, groups = (1, 16, 4, 256), 4
    values = torch.tensor([3333.3333, -7.77, 123.456, 0.1]).repeat_interleave(4)
    x = values.view(1, 16, 1, 1).expand(shape).contiguous()
    x = x.contiguous(memory_format=torch.channels_last) if layout_name == "channels_last" else x
    w, b = rand(16, mean=1.0, device="cpu"), rand(16, device="cpu")
    y = torch.full_like(x, float("nan"))
    mean, rstd = torch.full((1, groups), float("nan")), torch.full((1, groups), float("nan"))
    p = emulated_plan(emulated, shape, groups, 4, layout_name, None if cooperative else 2, False, cooperative)
    assert p.blocks >= 2
    cluster.launch_fwd(p, layout_name, 0, 0, x, w, b, None, y, mean, rstd, groups, 1e-5, False)
    assert torch.equal(mean, values[::4].view(1, groups))
    torch.testing.assert_close(rstd, torch.full_like(rstd, 1e-5 ** -0.5), rtol=1e-6, atol=0)  # variance 0
    torch.testing.assert_close(y, b.view(1, 16, 1, 1).expand_as(y), atol=1e-6, rtol=0)
    if cooperative:
        return
    # the backward's xhat on groups spread 0.01 about those values: x * rstd - mean * rstd rounded at their
    # magnitude (3e5) was 0.03 off, 3% of xhat
    noise = rand(*shape, device="cpu")
    x = torch.empty_like(x).copy_(x + 0.01 * noise)  # x's layout
    # dy along xhat, so that xhat's error reaches dx through c2 = mean(w dy xhat)
    dy, dx = torch.empty_like(x).copy_(noise + rand(*shape, device="cpu")), torch.full_like(x, float("nan"))
    x64, w64, b64 = (v.double().contiguous().requires_grad_() for v in (x, w, b))
    z64 = x64.detach().reshape(1, groups, -1)
    mean, rstd = z64.mean(-1).float(), (z64.var(-1, unbiased=False) + 1e-5).rsqrt().float()
    p = emulated_plan(emulated, shape, groups, 4, layout_name, None, backward=True)
    cluster.launch_bwd(p, layout_name, 0, 0, dy, x, w, b, None, mean, rstd, dx, None, None, groups, False)
    (want,) = torch.autograd.grad(torch.nn.functional.group_norm(x64, groups, w64, b64), [x64], dy.double())
    torch.testing.assert_close(dx.double(), want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


@pytest.mark.parametrize("silu", [False, True])
def test_emulated_backward_of_one_element_groups_is_zero(emulated, monkeypatch, silu):
    """dx of a one-element group is w dz minus its own mean, exactly 0 if w dz is rounded as the mean
    summed it. ptxas contracted w * dz - c1 into an FMA (sm_90 SASS): dx was the product's rounding error
    times 1/sqrt(eps). The emulator is built with the same contraction where the host has FMA."""
    monkeypatch.setattr(cluster, "_library", lambda: emulated)
    shape, groups = (2, 8, 1, 1), 8
    x, dy = (rand(*shape, device="cpu").contiguous(memory_format=torch.channels_last) for _ in range(2))
    w, b = rand(8, mean=1.0, device="cpu"), rand(8, device="cpu")
    mean, rstd = x.reshape(2, groups).clone(), torch.full((2, groups), 1e-5 ** -0.5)
    dx = torch.full_like(x, float("nan"))
    p = emulated_plan(emulated, shape, groups, 4, "channels_last", None, backward=True)
    cluster.launch_bwd(p, "channels_last", 0, 0, dy, x, w, b, None, mean, rstd, dx, None, None, groups, silu)
    assert torch.equal(dx, torch.zeros_like(dx))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_emulated_backward_of_a_group_wider_than_a_block(emulated, monkeypatch, dtype):
    """A channels-last group with more 4-byte units per position than the block has threads (one group
    of 640 fp32 / 1280 fp16 channels: 640 units against 512 threads): the backward's per-channel sums
    had no thread active and left every sum 0 (dbias 0, dx without its two correction terms)."""
    check_emulated(emulated, monkeypatch, dtype, (1, 640 * 4 // dtype.itemsize, 1, 4), 1, None, "silu", False, "fp32",
                   "channels_last")


@pytest.mark.parametrize("case", [0, 1, 3, 4])
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("layout_name", ["nchw", "channels_last"])
def test_emulated_cooperative_stages_against_float64(emulated, monkeypatch, case, stages, layout_name):
    """The cooperative forward with each block holding slices of 2 or 3 groups (8, 3, 2 and 2 groups
    here, 2 groups taking 2 stages at most: rows whose last stage holds nothing, and blocks holding whole
    and ragged batches per stage), as above, in fp16 (the stages' code is the same for every dtype, whose
    own paths the one-stage cases cover)."""
    check_emulated(emulated, monkeypatch, torch.float16, *EMULATED_CASES[case], layout_name, cooperative=True,
                   stages=stages)


@pytest.mark.parametrize("layout_name", ["nchw", "channels_last"])
def test_emulated_kernels_at_level_0(emulated, monkeypatch, layout_name):
    """VideoCrafter2's level 0 at T16 in fp16, the shape the kernels are for, with the plans an H100
    gets: forward 4 blocks of 200 KiB (as clusters, and as one cooperative grid of 128), backward 8
    (threads loop over many whole batches)."""
    shape = (1, 320, 16, 40 * 64)
    for backward, blocks in ((False, 4), (True, 8)):
        assert emulated_plan(emulated, shape, 32, 2, layout_name, None, backward).blocks == blocks
    assert emulated_plan(emulated, shape, 32, 2, layout_name, None, False, cooperative=True).blocks == 4
    assert emulated_plan(emulated, shape, 32, 2, layout_name, None, False, cooperative=True, stages=2).blocks == 8
    for cooperative, stages in ((False, 1), (True, 1), (True, 2)):
        check_emulated(emulated, monkeypatch, torch.float16, shape, 32, None, "silu", False, "fp32", layout_name,
                       cooperative, stages)


@pytest.mark.parametrize("layout_name", ["nchw", "channels_last"])
def test_emulated_kernels_do_not_depend_on_the_schedule(emulated, monkeypatch, layout_name):
    """Bit-identical outputs under three thread schedules: nothing the kernels compute depends on the
    order threads run between barriers (a race would), and their cross-block sums go in rank order."""
    monkeypatch.setattr(cluster, "_library", lambda: emulated)
    shape, groups, cl = (2, 32, 8, 512), 4, layout_name == "channels_last"  # every thread holds units
    fmt = torch.channels_last if cl else torch.contiguous_format
    x, dy = (torch.randn(shape, dtype=torch.float16).contiguous(memory_format=fmt) + 3 for _ in range(2))
    w, b, shift = torch.randn(32), torch.randn(32), torch.randn(2, 32)
    forward, backward = (emulated_plan(emulated, shape, groups, 2, layout_name, 5, b) for b in (False, True))
    cooperative = [emulated_plan(emulated, shape, groups, 2, layout_name, 5, False, cooperative=True, stages=k)
                   for k in (1, 2, 3)]
    runs = []
    for seed in (1, 2, 3):
        monkeypatch.setenv("HBEMU_SEED", str(seed))
        y, y2, dx = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
        mean, rstd, dweight, dbias = torch.empty(2, groups), torch.empty(2, groups), torch.empty(32), torch.empty(32)
        mean2, rstd2 = torch.empty(2, groups), torch.empty(2, groups)
        cluster.launch_fwd(forward, layout_name, 0, 0, x, w, b, shift, y, mean, rstd, groups, 1e-5, True)
        cluster.launch_bwd(backward, layout_name, 0, 0, dy, x, w, b, shift, mean, rstd, dx, dweight, dbias, groups,
                           True)
        runs.append([y, mean, rstd, dx, dweight, dbias])
        for p in cooperative:  # the same per-block states merged in the same order, whichever way they travel
            cluster.launch_fwd(p, layout_name, 0, 0, x, w, b, shift, y2, mean2, rstd2, groups, 1e-5, True)
            assert torch.equal(y2, y) and torch.equal(mean2, mean) and torch.equal(rstd2, rstd)
    assert all(torch.isfinite(v).all() for v in runs[0])
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("cooperative,stages", [(False, 1), (True, 1), (True, 3)])
def test_emulated_forward_phase_record(emulated, monkeypatch, cooperative, stages):
    """``clocks``: every block stamps its four phases in order for each group it holds, the exchange after
    every block of the group loaded (a block cannot know the group's statistics before the last partial
    exists), a block's later stages after its earlier ones, and the output is the one without the record;
    a misshapen record is refused."""
    monkeypatch.setattr(cluster, "_library", lambda: emulated)
    shape, groups = (2, 16, 3, 64), 4
    x = torch.randn(shape)
    p = emulated_plan(emulated, shape, groups, 4, "nchw", 3, False, cooperative, stages)
    outputs = []
    for clocks in (None, torch.zeros(2 * groups, 3, 4, dtype=torch.int64)):
        y, mean, rstd = torch.empty_like(x), torch.empty(2, groups), torch.empty(2, groups)
        cluster.launch_fwd(p, "nchw", 0, 0, x, None, None, None, y, mean, rstd, groups, 1e-5, True, clocks)
        outputs.append(y)
    assert torch.equal(*outputs)
    assert (clocks > 0).all() and (clocks.diff(dim=-1) >= 0).all()
    assert (clocks[:, :, 2].min(dim=1).values >= clocks[:, :, 1].max(dim=1).values).all()
    rows = -(-2 * groups // stages)  # group row + k * rows is the block's stage k
    assert (clocks[rows:, :, 0] >= clocks[:-rows, :, 3]).all()
    with pytest.raises(ValueError, match="clocks: a contiguous int64 tensor of shape .8, 3, 4."):
        cluster.launch_fwd(p, "nchw", 0, 0, x, None, None, None, y, mean, rstd, groups, 1e-5, True,
                           torch.zeros(8, 3, 4, dtype=torch.int32))


def check_emulated(emulated, monkeypatch, dtype, shape, groups, blocks, activation, shifted, params, layout_name,
                   cooperative=False, stages=1):
    monkeypatch.setattr(cluster, "_library", lambda: emulated)
    monkeypatch.setenv("HBEMU_SEED", str(torch.initial_seed()))  # the schedule, reproducible as the inputs are
    n, c, t, s = shape
    cl = layout_name == "channels_last"
    F = torch.nn.functional
    cpu = dict(dtype=torch.float64, device="cpu")  # the emulator's threads read host memory, also beside a GPU
    x64 = rand(*shape, mean=3.0, **cpu)
    w64 = rand(c, mean=1.0, **cpu) if params else None
    b64 = rand(c, **cpu) if params else None
    shift64 = 10 * rand(n, c, **cpu) if shifted else None
    dy64 = rand(*shape, **cpu)

    def reference(x, w, b, shift):
        z = F.group_norm(x if shift is None else x + shift[:, :, None, None], groups, w, b)
        return F.silu(z) if activation else z

    param_dtype = torch.float32 if params == "fp32" else dtype

    def outputs(compute, given=(dtype, param_dtype, torch.float32)):
        """y, dx, dweight, dbias of the reference computed in ``compute`` from the inputs as the kernels
        get them (x and dy, weight and bias, shift rounded to ``given``'s dtypes): the error measured is
        the computation's alone, not the inputs' rounding, which PyTorch's run and the kernels share."""
        x_dtype, p_dtype, shift_dtype = given
        leaves = [v if v is None else v.detach().to(d).to(compute).requires_grad_()
                  for v, d in zip((x64, w64, b64), (x_dtype, p_dtype, p_dtype))]
        y = reference(*leaves, None if shift64 is None else shift64.to(shift_dtype).to(compute))
        y.backward(dy64.to(x_dtype).to(compute))
        return [y.detach()] + [v.grad for v in leaves if v is not None]

    want, own = outputs(torch.float64), outputs(dtype, (dtype, dtype, dtype))

    def laid_out(v):
        return v.to(dtype).contiguous(memory_format=torch.channels_last) if cl else v.to(dtype)

    x, dy = among_nan(laid_out(x64), cl), among_nan(laid_out(dy64), cl)
    w, b = (None if v is None else among_nan(v.to(param_dtype)) for v in (w64, b64))
    shift = None if shift64 is None else among_nan(shift64.float())
    y, y_buffer = guarded(shape, dtype, cl)
    mean, mean_buffer = guarded((n, groups, 1, 1), torch.float32)
    rstd, rstd_buffer = guarded((n, groups, 1, 1), torch.float32)
    mean, rstd = mean.view(n, groups), rstd.view(n, groups)
    p = emulated_plan(emulated, shape, groups, x.element_size(), layout_name, blocks, False, cooperative, stages)
    assert (p.cooperative, p.stages) == (cooperative, min(stages, n * groups))
    cluster.launch_fwd(p, layout_name, 0, 0, x, w, b, shift, y, mean, rstd, groups, 1e-5, activation == "silu")

    z64 = (x.double() + (0 if shift is None else shift.double()[:, :, None, None])).reshape(n, groups, -1)
    torch.testing.assert_close(mean.double(), z64.mean(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), (z64.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5, atol=0)
    dx, dx_buffer = guarded(shape, dtype, cl)
    sums = [guarded((c, 1, 1, 1), torch.float32) if params else (None, None) for _ in range(2)]
    dweight, dbias = (None if v is None else v.view(c) for v, _ in sums)
    p = emulated_plan(emulated, shape, groups, x.element_size(), layout_name, blocks, backward=True)
    cluster.launch_bwd(p, layout_name, 0, 0, dy, x, w, b, shift, mean, rstd, dx, dweight, dbias, groups,
                       activation == "silu")

    got = [y, dx] + ([dweight, dbias] if params else [])
    for label, g, r, o in zip(["y", "dx", "dweight", "dbias"], got, want, own):
        assert_within_torch_error(f"emulated/{layout_name}/{dtype}/{label}", g, r, o)
    buffers = [y_buffer, mean_buffer, rstd_buffer, dx_buffer] + [v for _, v in sums if v is not None]
    assert all(untouched(v) for v in buffers), "a kernel wrote outside its output"


def test_emulated_launch_reports_what_the_device_refuses(emulated, monkeypatch):
    """A plan the device or the kernels refuse (more shared memory than a block may opt into, stages without
    a cooperative grid) fails with the runtime's message."""
    monkeypatch.setattr(cluster, "_library", lambda: emulated)
    x = torch.randn(1, 8, 2, 16, dtype=torch.float16)
    mean, rstd = torch.empty(1, 2), torch.empty(1, 2)
    with pytest.raises(RuntimeError, match="cluster GroupNorm launch failed .invalid argument"):
        cluster.launch_fwd(cluster.Plan(1, 32, 232449), "nchw", 0, 0, x, None, None, None, torch.empty_like(x), mean,
                           rstd, 2, 1e-5, True)
    # stages without a cooperative grid (its partials), or none: refused before any launch
    for stages in (2, 0):
        with pytest.raises(RuntimeError, match="cluster GroupNorm launch failed .invalid argument"):
            cluster.launch_fwd(cluster.Plan(1, 32, 1024, stages=stages), "nchw", 0, 0, x, None, None, None,
                               torch.empty_like(x), mean, rstd, 2, 1e-5, True)
    # a cooperative grid larger than the device holds at once (133 blocks per group, one per SM)
    with pytest.raises(RuntimeError, match="too many blocks in cooperative launch: 266, 132 resident"):
        cluster.launch_fwd(cluster.Plan(133, 1, 16, cooperative=True), "nchw", 0, 0, x, None, None, None,
                           torch.empty_like(x), mean, rstd, 2, 1e-5, True)


# ---------------------------------------------------------------- on a Hopper GPU
gpu = pytest.mark.skipif(not CLUSTER_GPU, reason="needs a CUDA GPU of compute capability 9+ and nvcc")


def cluster_only(monkeypatch, blocks=None, forward=True, backward=True):
    """The cluster kernels switched on, and the Triton passes they replace made to fail: a test passes
    only if the cluster kernels produced its results (``forward`` / ``backward``: which ones)."""
    from hbkernels.triton import group_norm as gn

    class Unlaunchable:
        def __getitem__(self, grid):
            raise AssertionError("a Triton pass ran instead of the cluster kernel")

    monkeypatch.setattr(gn, "CLUSTER_FORWARD", True)
    monkeypatch.setattr(gn, "CLUSTER_BACKWARD", True)
    monkeypatch.setattr(gn, "CLUSTER_BLOCKS", blocks)
    if forward:
        monkeypatch.setattr(gn, "_gn_stats_kernel", Unlaunchable())
    if backward:
        monkeypatch.setattr(gn, "_gn_bwd_partials_kernel", Unlaunchable())


def runs(shape, groups, dtype, blocks, layout="nchw", backward=False, cooperative=False, stages=1) -> bool:
    """Whether this device has a cluster plan for these groups (the backward's: fp32 level 0 at T26 has
    none, 5.3 MB of dy and x per group), or a ``cooperative`` one in ``stages``."""
    n, c = shape[:2]
    numel = torch.Size(shape[2:]).numel() * c // groups
    size = torch.empty((), dtype=dtype).element_size()
    return cluster.device_plan(0, n * groups, numel, c // groups, size, blocks, backward, layout,
                               cooperative, stages) is not None


# (shape, groups, blocks per cluster): level 0-2's sizes at the plan's choice; forced clusters of 2, of
# a count not a power of two (one block holding a ragged end), and of over 8 (non-portable); batch 2; 4D
GPU_CASES = [((1, 1280, 16, 10, 16), 32, None), ((2, 640, 16, 20, 32), 32, None), ((1, 320, 16, 40, 64), 32, None),
             ((1, 320, 26, 40, 64), 32, None), ((1, 64, 8, 16, 32), 4, 2), ((1, 64, 8, 16, 32), 4, 7),
             ((1, 64, 8, 16, 32), 4, 16), ((2, 96, 64, 64), 32, 3)]


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,groups,blocks", GPU_CASES)
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cluster_kernels_against_float64(monkeypatch, dtype, shape, groups, blocks, activation, layout):
    c = shape[1]
    cl = layout == "channels_last"
    if cl and (c // groups) % (4 // torch.empty((), dtype=dtype).element_size()):
        pytest.skip("channels-last groups of whole 4-byte units only")
    name = "channels_last" if cl else "nchw"
    forward, backward = (runs(shape, groups, dtype, blocks, name, backward=b) for b in (False, True))
    if not (forward or backward):
        pytest.skip("no cluster plan for these groups on this device")
    cluster_only(monkeypatch, blocks, forward, backward)
    fmt = (torch.channels_last if len(shape) == 4 else torch.channels_last_3d) if cl else torch.contiguous_format
    x = rand(*shape, dtype=torch.float64, mean=3.0, requires_grad=True)
    w = rand(c, dtype=torch.float64, mean=1.0, requires_grad=True)
    b = rand(c, dtype=torch.float64, requires_grad=True)
    check_against_float64(
        lambda x, w, b: hbkernels.group_norm(x.contiguous(memory_format=fmt), groups, w, b, activation=activation),
        [x, w, b], "triton", dtype)


@gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cluster_kernels_hold_level_0_in_half_precision(layout):
    """The shapes the kernels are for have plans on this device (the float64 tests skip what has none)."""
    for frames in (16, 26):
        for backward in (False, True):
            assert runs((1, 320, frames, 40, 64), 32, torch.float16, None, layout, backward), (frames, backward)
    assert runs((1, 320, 16, 40, 64), 32, torch.float16, None, layout, cooperative=True)  # 128 blocks at once


@gpu
@pytest.mark.parametrize("shape,groups", [((2, 64, 8, 16, 32), 8), ((1, 320, 16, 40, 64), 32)])
def test_cluster_kernels_with_shift_against_float64(monkeypatch, shape, groups):
    """GroupNorm(x + shift) + SiLU: the shift's gradient is dx summed per (sample, channel)."""
    cluster_only(monkeypatch)
    n, c = shape[:2]
    x = rand(*shape, dtype=torch.float64, requires_grad=True)
    w, b = rand(c, dtype=torch.float64, requires_grad=True), rand(c, dtype=torch.float64, requires_grad=True)
    shift = (10 * rand(n, c, dtype=torch.float64)).requires_grad_()
    check_against_float64(lambda x, w, b, shift: hbkernels.group_norm(x, groups, w, b, activation="silu", shift=shift),
                          [x, w, b, shift], "triton", torch.float16)


@gpu
@pytest.mark.parametrize("blocks", [None, 6])
def test_cluster_forward_statistics(monkeypatch, blocks):
    """mean and rstd (what the backward reads) of x + shift, written once per group; no affine."""
    from hbkernels import triton as kernels

    cluster_only(monkeypatch, blocks)
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,groups", [((1, 320, 16, 40, 64), 32), ((2, 64, 8, 16, 32), 8),
                                          ((1, 1280, 16, 10, 16), 32), ((2, 96, 64, 64), 32)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("stages", [1, 2, 3])
def test_cooperative_forward_against_float64(monkeypatch, dtype, shape, groups, layout, stages):
    """The forward as one cooperative grid, each block holding slices of ``stages`` groups, wherever the
    device holds it at once (the backward: the cluster kernels where they apply)."""
    from hbkernels.triton import group_norm as gn

    c = shape[1]
    cl = layout == "channels_last"
    if cl and (c // groups) % (4 // torch.empty((), dtype=dtype).element_size()):
        pytest.skip("channels-last groups of whole 4-byte units only")
    if not runs(shape, groups, dtype, None, "channels_last" if cl else "nchw", cooperative=True, stages=stages):
        pytest.skip("no cooperative plan for these groups on this device")
    cluster_only(monkeypatch, backward=False)
    monkeypatch.setattr(gn, "CLUSTER_COOPERATIVE", True)
    monkeypatch.setattr(gn, "CLUSTER_STAGES", stages)
    fmt = (torch.channels_last if len(shape) == 4 else torch.channels_last_3d) if cl else torch.contiguous_format
    x = rand(*shape, dtype=torch.float64, mean=3.0, requires_grad=True)
    w = rand(c, dtype=torch.float64, mean=1.0, requires_grad=True)
    b = rand(c, dtype=torch.float64, requires_grad=True)
    check_against_float64(
        lambda x, w, b: hbkernels.group_norm(x.contiguous(memory_format=fmt), groups, w, b, activation="silu"),
        [x, w, b], "triton", dtype)


@gpu
@pytest.mark.parametrize("cooperative,stages", [(False, 1), (True, 1), (True, 2)])
def test_cluster_forward_replays_from_a_cuda_graph(monkeypatch, cooperative, stages):
    from hbkernels.triton import group_norm as gn
    from hummingbird.cuda_graph import CUDAGraphCall

    cluster_only(monkeypatch)
    monkeypatch.setattr(gn, "CLUSTER_COOPERATIVE", cooperative)
    monkeypatch.setattr(gn, "CLUSTER_STAGES", stages)
    w, b = rand(320, dtype=torch.float16, mean=1.0), rand(320, dtype=torch.float16)
    graphed = CUDAGraphCall(lambda x: hbkernels.group_norm(x, 32, w, b, activation="silu"))
    for _ in range(3):
        x = rand(1, 320, 16, 40, 64, dtype=torch.float16, mean=3.0)
        want = torch.nn.functional.silu(torch.nn.functional.group_norm(x.double(), 32, w.double(), b.double()))
        torch.testing.assert_close(graphed(x).double(), want, rtol=0, atol=1e-2)


@gpu
def test_cluster_forward_leaves_other_layouts_to_triton(monkeypatch):
    """A layout the kernels cannot address runs the Triton passes, with the cluster forward on:
    channels-last fp16 with 3 channels per group (a group's piece of a position, 6 bytes, is not whole
    4-byte units)."""
    from hbkernels.triton import group_norm as gn

    monkeypatch.setattr(gn, "CLUSTER_FORWARD", True)
    monkeypatch.setattr(gn, "CLUSTER_BACKWARD", True)
    x = rand(1, 24, 4, 8, 8, dtype=torch.float16).contiguous(memory_format=torch.channels_last_3d)
    assert cluster.layout(8, x.flatten(3), x.flatten(3)) is None
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


# Forward and backward of both layouts, at the plan's blocks and at forced 3 and 16, on small groups
SANITIZED = """
import torch, hbkernels
from hbkernels.triton import group_norm as gn
gn.CLUSTER_FORWARD = gn.CLUSTER_BACKWARD = True
for blocks in (None, 3, 16):
    gn.CLUSTER_BLOCKS = blocks
    for fmt in (torch.contiguous_format, torch.channels_last_3d):
        x = torch.randn(2, 64, 4, 8, 16, device="cuda", dtype=torch.float16).contiguous(memory_format=fmt)
        w = torch.randn(64, device="cuda", dtype=torch.float16, requires_grad=True)
        shift = torch.randn(2, 64, device="cuda")
        y = hbkernels.group_norm(x.requires_grad_(), 8, w, w, activation="silu", shift=shift)
        y.backward(torch.randn_like(y))
torch.cuda.synchronize()
print("ran")
"""


def sanitizer():
    """compute-sanitizer on PATH, else beside nvcc (the CUDA toolkit's bin)."""
    beside = build.nvcc() and Path(build.nvcc()).with_name("compute-sanitizer")
    return shutil.which("compute-sanitizer") or (str(beside) if beside and beside.is_file() else None)


@gpu
@pytest.mark.skipif(CLUSTER_GPU and sanitizer() is None, reason="no compute-sanitizer")
@pytest.mark.parametrize("tool,clean", [("memcheck", "ERROR SUMMARY: 0 errors"),
                                        ("racecheck", "RACECHECK SUMMARY: 0 hazards")])
def test_cluster_kernels_under_compute_sanitizer(tool, clean):
    """No out-of-bounds or misaligned access (memcheck) and no shared-memory race (racecheck), the
    distributed shared memory exchange included, in every kernel the ops launch with the cluster
    kernels on."""
    proc = subprocess.run([sanitizer(), "--tool", tool, sys.executable, "-c", SANITIZED], capture_output=True,
                          text=True, timeout=300)
    assert "ran" in proc.stdout and clean in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_gn_phases_bench_runs_on_the_emulated_kernels(emulated, monkeypatch):
    """bench/gn_phases.py end to end on the emulator (a lent GPU's minutes go to timing, not to the
    bench's own bugs): each configuration plans, launches with the phase record and summarises it
    (channels-last x: the layout the bench and the kernels handle the same way)."""
    from bench import gn_phases

    monkeypatch.setattr(cluster, "_library", lambda: emulated)

    def plan_for(groups, blocks, backward, x, *others, cooperative=False, stages=1):
        name = cluster.layout(groups, x, *others)
        return emulated_plan(emulated, tuple(x.shape), groups, 2, name, blocks, backward, cooperative, stages), name

    monkeypatch.setattr(cluster, "plan_for", plan_for)
    # one configuration of each kind (each launch is seconds of emulation)
    monkeypatch.setattr(gn_phases, "CONFIGS", [c for c in gn_phases.CONFIGS if c[0] in
                                              ("cooperative", "cooperative, 2 stages", "clusters of 4")])
    rows = gn_phases.measure((1, 64, 2, 8, 16), True, 1, torch.device("cpu"))
    assert [r["config"] for r in rows] == [config[0] for config in gn_phases.CONFIGS]
    for r in rows:
        assert r["plan"] and r["span_us"] > 0 and r["waves"] >= 1
        assert all(r[k] >= 0 for k in gn_phases.PHASES)
    assert [len(r.get("stages", [])) for r in rows] == [0, 2, 0]
    assert rows[1]["stages"][1]["start_us"] >= rows[1]["stages"][0]["start_us"]
