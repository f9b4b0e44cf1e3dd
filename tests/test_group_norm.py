import pytest
import torch

import hbkernels
from helpers import (BACKENDS, CPP, KERNEL_BACKENDS, DEVICE, DTYPES, ON_GPU, TRITON, check_against_float64,
                     HUGE_CONSTANTS, huge_strided_views, rand, shapes)

# (shape, num_groups): C not a multiple of 8, T = 1/16/25, N = 1 and 2.
QUICK = [((1, 12, 3, 5), 4), ((2, 30, 1, 4, 3), 3), ((1, 12, 16, 2, 3), 4), ((2, 8, 25, 2, 2), 2)]
FULL = QUICK + [((1, 320, 16, 40, 64), 32), ((2, 640, 26, 20, 32), 32), ((1, 1280, 25, 9, 16), 32), ((2, 96, 64, 64), 32)]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def to_layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    if layout == "strided":  # a non-dense view: every other element of the last dim
        return torch.cat([x, x], dim=-1)[..., ::2]
    return x


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", shapes(QUICK, FULL))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm(backend_name, dtype, shape, groups, layout, activation):
    c = shape[1]
    x = rand(*shape, dtype=torch.float64, mean=3.0, requires_grad=True)  # mean 3 tests stable variance
    w = rand(c, dtype=torch.float64, mean=1.0, requires_grad=True)
    b = rand(c, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return hbkernels.group_norm(to_layout(x, layout), groups, w, b, eps=1e-5, activation=activation)

    check_against_float64(fn, [x, w, b], backend_name, dtype)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_variance_is_stable_at_large_means(backend_name, layout):
    """Mean 1000, std 1 in fp32: E[x^2] - E[x]^2 would lose ~6% of the variance to cancellation."""
    x = to_layout(rand(2, 16, 5, 6, 7, mean=1000.0), layout)
    with hbkernels.use_backend(backend_name):
        y = hbkernels.group_norm(x, 4, eps=1e-6)
    want = torch.nn.functional.group_norm(x.double(), 4, eps=1e-6)
    torch.testing.assert_close(y.double(), want, atol=2e-3, rtol=0)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", QUICK)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_group_norm_shift(backend_name, dtype, shape, groups, layout):
    # GroupNorm(x + shift[n, c]) + SiLU, as a ResNet block adds its time embedding; a shift far larger
    # than x's spread checks that it moves the statistics without costing their accuracy
    n, c = shape[:2]
    x = rand(*shape, dtype=torch.float64, requires_grad=True)
    w, b = rand(c, dtype=torch.float64, requires_grad=True), rand(c, dtype=torch.float64, requires_grad=True)
    shift = (10 * rand(n, c, dtype=torch.float64)).requires_grad_()

    def fn(x, w, b, shift):
        return hbkernels.group_norm(to_layout(x, layout), groups, w, b, activation="silu", shift=shift)

    check_against_float64(fn, [x, w, b, shift], backend_name, dtype)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
def test_group_norm_optional_affine(backend_name, affine):
    x = rand(2, 12, 3, 4, 5, dtype=torch.float64, mean=-2.0, requires_grad=True)
    p = rand(12, dtype=torch.float64, requires_grad=True)
    fns = {
        "none": lambda x: hbkernels.group_norm(x, 4, activation="silu"),
        "weight": lambda x, p: hbkernels.group_norm(x, 4, weight=p, activation="silu"),
        "bias": lambda x, p: hbkernels.group_norm(x, 4, bias=p, activation="silu"),
    }
    check_against_float64(fns[affine], [x] if affine == "none" else [x, p], backend_name, torch.float32)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", [(s, g) for s, g in shapes(QUICK, FULL) if len(s) == 5])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_group_norm_to_tokens(backend_name, dtype, shape, groups, layout):
    c = shape[1]
    x = rand(*shape, dtype=torch.float64, mean=1.0, requires_grad=True)
    w = rand(c, dtype=torch.float64, requires_grad=True)
    b = rand(c, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        return hbkernels.group_norm_to_tokens(to_layout(x, layout), groups, w, b, eps=1e-6)

    check_against_float64(fn, [x, w, b], backend_name, dtype)


def test_group_norm_to_tokens_layout_matches_einops():
    from einops import rearrange

    x = rand(2, 8, 3, 4, 5)
    with hbkernels.use_backend("torch"):
        want = rearrange(torch.nn.functional.group_norm(x, 2), "n c t h w -> (n h w) t c")
    assert torch.allclose(hbkernels.group_norm_to_tokens(x, 2), want, atol=1e-5)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_group_norm_keeps_memory_format(backend_name):
    x = rand(2, 16, 6, 4).contiguous(memory_format=torch.channels_last)
    with hbkernels.use_backend(backend_name):
        y = hbkernels.group_norm(x, 4, activation="silu")
    assert y.is_contiguous(memory_format=torch.channels_last)


def record_launches(monkeypatch, *names):
    """Wraps the GroupNorm kernels ``names`` so that each launch appends (name, grid, launch keywords)
    to the returned list, then runs."""
    from hbkernels.triton import group_norm as gn

    launches = []

    class Recorded:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(gn, name)

        def __getitem__(self, grid):
            def launch(*args, **meta):
                launches.append((self.name, grid, meta))
                return self.kernel[grid](*args, **meta)
            return launch

    for name in names:
        monkeypatch.setattr(gn, name, Recorded(name))
    return launches


@pytest.mark.parametrize("backend_name", TRITON)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("reversed_apply, evict_first, stats_tile, stages, pdl, apply_tile, channels", [
    (True, False, 4096, 2, False, 8192, (8, 16)), (False, True, 2048, 5, True, 4096, (4, 8)),
    (True, True, 1024, 3, True, 1024, (2, 2))])
def test_group_norm_launch_tuning(monkeypatch, backend_name, layout, reversed_apply, evict_first, stats_tile, stages,
                                  pdl, apply_tile, channels):
    """The tuning knobs (bench/sweep.py) change the schedule, never the result; the tiles launched are
    the ones set (the shape holds each whole, in both layouts; 12-channel groups straddle the tiles'
    blocks of 64 channels (channels-last) or of ``channels`` (statistics, apply; NCHW))."""
    from hbkernels.triton import group_norm as gn

    launches = record_launches(monkeypatch, "_gn_stats_kernel", "_gn_apply_kernel")
    monkeypatch.setattr(gn, "APPLY_REVERSED", reversed_apply)
    for suffix in ("", "_CHANNELS_LAST"):  # the layouts' own tiles
        monkeypatch.setattr(gn, "_STATS_TILE" + suffix, stats_tile)
        monkeypatch.setattr(gn, "_APPLY_TILE" + suffix, apply_tile)
    # stages, eviction hints, PDL: only a GPU runs them differently
    monkeypatch.setattr(gn, "STATS_STAGES", stages)
    monkeypatch.setattr(gn, "APPLY_EVICT_FIRST", evict_first)
    monkeypatch.setattr(gn, "PDL", pdl)
    monkeypatch.setattr(gn, "_STATS_CHANNELS_NCHW", channels[0])
    monkeypatch.setattr(gn, "_APPLY_CHANNELS_NCHW", channels[1])
    x = rand(2, 48, 4, 8, 16, dtype=torch.float64, mean=3.0, requires_grad=True)
    w = rand(48, dtype=torch.float64, mean=1.0, requires_grad=True)

    def fn(x, w):
        return hbkernels.group_norm(to_layout(x, layout), 4, w, None, activation="silu")

    check_against_float64(fn, [x, w], backend_name, torch.float32)
    widths = (64, 64) if layout == "channels_last" else channels
    for kernel, tile, width in (("_gn_stats_kernel", stats_tile, widths[0]),
                                ("_gn_apply_kernel", apply_tile, widths[1])):
        metas = [meta for name, _, meta in launches if name == kernel]
        assert {meta["BLOCK_C"] * meta["BLOCK_S"] for meta in metas} == {tile}
        assert {meta["BLOCK_C"] for meta in metas} == {width}


@pytest.mark.parametrize("backend_name", TRITON)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 16, 8, 4, 8), (2, 16, 7, 5, 7)], ids=["even_s", "ragged_s"])
@pytest.mark.parametrize("channels", [16, 1])
def test_group_norm_statistics_walk_many_tiles(monkeypatch, backend_name, layout, shape, channels):
    """Small statistics tiles: each program walks several (pipelined) tiles, with every lane counting
    the same tiles (S a multiple of the tile) or ragged ends (some lanes fewer); on NCHW also tiles one
    channel wide (statistics, apply, the backward's partial sums and dx)."""
    from hbkernels.triton import group_norm as gn

    monkeypatch.setattr(gn, "_STATS_CHANNELS_NCHW", channels)
    monkeypatch.setattr(gn, "_APPLY_CHANNELS_NCHW", channels)
    monkeypatch.setattr(gn, "_BWD_CHANNELS_NCHW", channels)
    monkeypatch.setattr(gn, "_BWD_APPLY_CHANNELS_NCHW", channels)
    monkeypatch.setattr(gn, "_STATS_TILE", 256)
    monkeypatch.setattr(gn, "_STATS_TILE_CHANNELS_LAST", 256)
    x = rand(*shape, dtype=torch.float64, mean=3.0, requires_grad=True)
    w = rand(16, dtype=torch.float64, mean=1.0, requires_grad=True)

    def fn(x, w):
        return hbkernels.group_norm(to_layout(x, layout), 4, w, None, activation="silu")

    check_against_float64(fn, [x, w], backend_name, torch.float32)




@pytest.mark.parametrize("backend_name", TRITON)
@pytest.mark.parametrize("reversed_apply", [True, False])
def test_group_norm_channel_blocks_first(monkeypatch, backend_name, reversed_apply):
    """CHANNEL_BLOCKS_FIRST: channels-last grids launched channel blocks first (axis 0) give the same
    result; NCHW grids keep positions first."""
    from hbkernels.triton import group_norm as gn

    launches = record_launches(monkeypatch, "_gn_stats_kernel", "_gn_apply_kernel")
    monkeypatch.setattr(gn, "CHANNEL_BLOCKS_FIRST", True)
    monkeypatch.setattr(gn, "APPLY_REVERSED", reversed_apply)
    x = rand(2, 160, 3, 4, 5, dtype=torch.float64, mean=3.0, requires_grad=True)  # 3 blocks of 64 channels
    w = rand(160, dtype=torch.float64, mean=1.0, requires_grad=True)
    # channels-last: 3 blocks of 64 channels, first; NCHW (60 positions a channel): 10 blocks of 16, second
    for layout, axis, blocks in (("channels_last", 0, 3), ("contiguous", 1, 10)):
        launches.clear()

        def fn(x, w):
            return hbkernels.group_norm(to_layout(x, layout), 8, w, None, activation="silu")

        check_against_float64(fn, [x, w], backend_name, torch.float32)
        assert len(launches) >= 2 and all(grid[axis] == blocks for _, grid, _ in launches), launches


@pytest.mark.parametrize("backend_name", TRITON)
def test_group_norm_channel_blocks_past_the_grids_second_axis(monkeypatch, backend_name):
    """NCHW tiles one channel wide make C channel blocks: past CUDA's 65,535 on grid axis 1 (here a
    limit of 8, the interpreter has none) they go first, on axis 0, and the result is unchanged."""
    from hbkernels.triton import group_norm as gn

    launches = record_launches(monkeypatch, "_gn_stats_kernel", "_gn_apply_kernel")
    monkeypatch.setattr(gn, "_MAX_GRID_1", 8)
    x = rand(1, 16, 2, 4, 4, dtype=torch.float64, mean=3.0, requires_grad=True)
    w = rand(16, dtype=torch.float64, mean=1.0, requires_grad=True)
    check_against_float64(lambda x, w: hbkernels.group_norm(x, 4, w, None, activation="silu"), [x, w], backend_name,
                          torch.float32)
    assert launches and all(grid[1] <= 8 for _, grid, _ in launches), launches
    with pytest.raises(ValueError, match="exceed the grid's second axis"):
        gn._grid2(9, 9, False)


def test_group_norm_nchw_tiles_keep_their_size():
    """Narrow NCHW tiles (one channel at level 0) stack channels where a channel's row is shorter than
    the tile (up to 16), so small planes do not get tiny tiles; channels-last tiles stay 64 wide."""
    from hbkernels.triton.layout import tile_shape

    def nchw(c, s, narrow, tile=2048):
        return tile_shape(c, s, ((c * s, s, s, 1),), tile, narrow)

    assert nchw(320, 40960, 1) == (1, 2048)  # level 0, T16: a row holds 20 tiles
    assert nchw(320, 40960, 16) == (16, 128)
    assert nchw(1280, 1280, 1) == (8, 256)  # level 3 (16 x 80): 256 divides the row, 8 rows fill the tile
    assert nchw(320, 64, 1) == (16, 64)  # an 8 x 8 plane: at most 16 channels
    assert nchw(3, 64, 1) == (4, 64)  # no wider than the channels
    assert tile_shape(320, 40960, ((320 * 40960, 1, 0, 320),), 2048, 1) == (64, 32)  # channels-last


@pytest.mark.parametrize("backend_name", TRITON)
def test_group_norm_finalize_merges_several_blocks(monkeypatch, backend_name):
    """The finalize kernel walks a group's partials in blocks; the U-Net's groups fit one block, so a
    tiny block makes the cross-block merge (and the shift's mean across blocks) run here."""
    from hbkernels.triton import group_norm as gn

    monkeypatch.setattr(gn, "_FINAL_BLOCK", 2)
    x = rand(2, 12, 3, 4, 5, dtype=torch.float64, mean=3.0, requires_grad=True)
    w = rand(12, dtype=torch.float64, mean=1.0, requires_grad=True)
    shift = (10 * rand(2, 12, dtype=torch.float64)).requires_grad_()
    check_against_float64(lambda x, w, shift: hbkernels.group_norm(x, 4, w, None, activation="silu", shift=shift),
                          [x, w, shift], backend_name, torch.float32)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_shift_gradient_of_one_channel_groups_is_zero(backend_name, dtype):
    """A one-channel group's shift is a constant added to the whole group, which the norm removes: its
    gradient is 0. Summed from dx rounded to fp16 it was 1600x PyTorch's own error (16000x in bf16)."""
    x = rand(2, 5, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    w, b = rand(5, dtype=torch.float64, requires_grad=True), rand(5, dtype=torch.float64, requires_grad=True)
    shift = (10 * rand(2, 5, dtype=torch.float64)).requires_grad_()
    check_against_float64(lambda x, w, b, shift: hbkernels.group_norm(x, 5, w, b, activation="silu", shift=shift),
                          [x, w, b, shift], backend_name, dtype)


def check_silu_group_norm(shape, groups, backend_name, dtype, with_shift):
    """group_norm with weight, bias, SiLU (and the time-embedding shift) against float64, forward and
    gradients of every input."""
    n, c = shape[:2]
    x = rand(*shape, dtype=torch.float64, mean=3.0, requires_grad=True)
    w = rand(c, dtype=torch.float64, mean=1.0, requires_grad=True)
    b = rand(c, dtype=torch.float64, requires_grad=True)
    inputs = [x, w, b] + ([(10 * rand(n, c, dtype=torch.float64)).requires_grad_()] if with_shift else [])

    def fn(x, w, b, shift=None):
        return hbkernels.group_norm(x, groups, w, b, activation="silu", shift=shift)

    # the shift's gradient sums dx over each (n, c) plane, a sum that cancels: its rounding is at the
    # scale of its terms. At its own scale, PyTorch's error over 12 sums was a yardstick whose draws put
    # unchanged kernels from 0.3x to 2.3x of the bound (30 seeds, one-pass backward, fp32).
    scales = {"grad[3]": lambda ref: ref[1].abs().sum(dim=tuple(range(2, ref[1].dim()))).max().item()}
    check_against_float64(fn, inputs, backend_name, dtype, scales=scales if with_shift else None)


def one_pass_calls(monkeypatch, min_tile):
    """Switches the one-pass backward on (tiles from min_tile) and records the first tensor and the
    plan of each launch."""
    from hbkernels.triton import group_norm as gn

    monkeypatch.setattr(gn, "ONE_PASS", True)
    monkeypatch.setattr(gn, "_ONE_PASS_MIN_TILE", min_tile)
    calls = []
    launch = gn._launch_one_pass

    def record(tensors, c, num_groups, plan, strides, **meta):
        calls.append((tensors[0], plan))
        return launch(tensors, c, num_groups, plan, strides, **meta)

    monkeypatch.setattr(gn, "_launch_one_pass", record)
    return calls


@pytest.mark.parametrize("backend_name", TRITON)
@pytest.mark.parametrize("dtype", DTYPES if ON_GPU else DTYPES[:2])  # bf16 differs only in load/store casts
@pytest.mark.parametrize("shape,groups", shapes(QUICK, FULL))
@pytest.mark.parametrize("min_tile,with_shift", [(8, True), (4096, False)],  # (8, False): the next test's
                         ids=["many_chunks_shift", "default_tile"])
def test_group_norm_one_pass(monkeypatch, backend_name, dtype, shape, groups, min_tile, with_shift):
    """The one-pass backward (each group's programs exchange their partial sums, then write the tiles
    of dx they hold) against float64. From 8-element tiles every quick shape's channels split into
    several (the interpreter's limit of programs per group doubles the smaller tiles)."""
    calls = one_pass_calls(monkeypatch, min_tile)
    check_silu_group_norm(shape, groups, backend_name, dtype, with_shift)
    assert calls  # the one-pass backward ran, not the two-pass fallback
    dy4, (tile, _, _) = calls[0]  # the (N, C, T, S) view and the tile per program
    if min_tile == 8:
        assert tile < dy4.shape[2] * dy4.shape[3]  # each channel's row split across programs


@pytest.mark.parametrize("backend_name", TRITON)
@pytest.mark.parametrize("affine", ["none", "weight"])
def test_group_norm_one_pass_without_silu_or_affine(monkeypatch, backend_name, affine):
    """The one-pass backward's other variants: no activation, no bias, and no weight at all; several
    tiles per channel without a shift."""
    calls = one_pass_calls(monkeypatch, 8)
    x = rand(2, 12, 5, 2, 3, dtype=torch.float64, mean=3.0, requires_grad=True)
    w = rand(12, dtype=torch.float64, mean=1.0, requires_grad=True)

    def fn(x, w=None):
        return hbkernels.group_norm(x, 4, w, None)

    check_against_float64(fn, [x] + ([w] if affine == "weight" else []), backend_name, torch.float32)
    assert calls


@pytest.mark.parametrize("backend_name", TRITON)
def test_group_norm_one_pass_one_program_per_group(monkeypatch, backend_name):
    """A group of one channel whose row fits one tile: P = 1, the program merges only its own partial
    sums."""
    calls = one_pass_calls(monkeypatch, 4096)
    x = rand(2, 4, 3, 5, dtype=torch.float64, mean=3.0, requires_grad=True)
    w = rand(4, dtype=torch.float64, mean=1.0, requires_grad=True)
    check_against_float64(lambda x, w: hbkernels.group_norm(x, 4, w, None, activation="silu"), [x, w], backend_name,
                          torch.float32)
    assert calls


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_group_norm_one_pass_replays_from_a_cuda_graph(monkeypatch):
    """Replayed from a CUDA graph, the one-pass backward zeroes its arrival counters on every replay
    (a memset node): otherwise the second replay would pass every wait at once and read partials
    not yet written. Level 0, T16: 100 programs per group, all SMs busy."""
    from hbkernels import triton as kernels
    from hbkernels.triton import group_norm as gn
    from hummingbird.cuda_graph import CUDAGraphCall

    monkeypatch.setattr(gn, "ONE_PASS", True)
    shape = (1, 320, 16, 2560)
    w, b = rand(320, dtype=torch.float16, mean=1.0), rand(320, dtype=torch.float16)
    x = rand(*shape, dtype=torch.float16, mean=3.0)
    mean, rstd = torch.empty(1, 32, device=x.device), torch.empty(1, 32, device=x.device)
    kernels.gn_fwd(x, w, b, None, torch.empty_like(x), mean, rstd, 32, 1e-5, True)
    dw, db = (torch.empty(320, device=x.device) for _ in range(2))

    def dx_of(dy):
        dx = torch.empty_like(dy)
        kernels.gn_bwd(dy, x, w, b, None, mean, rstd, dx, dw, db, 32, True)
        return dx

    graphed = CUDAGraphCall(dx_of)
    x64 = x.double().requires_grad_()
    y64 = torch.nn.functional.silu(torch.nn.functional.group_norm(x64.view(1, 320, -1), 32, w.double(), b.double()))
    for _ in range(5):
        dy = rand(*shape, dtype=torch.float16)
        want = torch.autograd.grad(y64, x64, dy.double().view(1, 320, -1), retain_graph=True)[0]
        torch.testing.assert_close(graphed(dy).double(), want, rtol=0, atol=2e-2)


def test_group_norm_one_pass_plan(monkeypatch):
    """Where the one-pass backward applies, and its tile: the smallest from 4096 that keeps a group's
    programs within one per SM (so they are resident together), else the two-pass backward."""
    from hbkernels.triton import group_norm as gn

    monkeypatch.setattr(gn, "INTERPRETED", False)
    monkeypatch.setattr(gn, "sm_count", lambda device: 132)

    def tile(shape, cpg, strides=None, dtype=torch.float16):
        v = torch.empty_strided(shape, strides or torch.empty(shape, device="meta").stride(), dtype=dtype,
                                device="meta")
        plan = gn._one_pass_plan([v, v], shape[2], shape[3], cpg, v.device)
        return plan and plan[0]

    assert tile((1, 320, 16, 2560), 10) == 4096  # level 0 at 320x512, T16: 10 channels x 10 tiles
    assert tile((1, 320, 26, 2560), 10) == 8192  # T26: 10 x 9
    assert tile((1, 320, 16, 2560), 10, dtype=torch.float32) == 4096
    assert tile((1, 320, 26, 2560), 10, dtype=torch.float32) is None  # fp32 tiles stop at 4096 (registers)
    assert tile((2, 1280, 16, 80), 40) == 2048  # level 3: one tile per channel, a row of 1280
    assert tile((1, 320, 16, 2560), 10, (320 * 40960, 1, 320 * 2560, 320)) is None  # channels-last
    assert tile((1, 320, 16, 2560), 320) is None  # one group of 320 channels: 320 programs at least
    assert tile((1, 32, 1, 8192 * 133), 1) is None  # 133 tiles of the largest size per channel


def test_group_norm_bad_input():
    x = rand(2, 12, 3, 4)
    with pytest.raises(ValueError, match="num_groups"):
        hbkernels.group_norm(x, 5)
    with pytest.raises(TypeError, match="num_groups"):
        hbkernels.group_norm(x, 2.0)
    with pytest.raises(ValueError, match="num_groups"):
        hbkernels.group_norm(x, 0)
    with pytest.raises(TypeError, match="eps"):
        hbkernels.group_norm(x, 4, eps=True)
    with pytest.raises(ValueError, match="eps must be at least 1.18e-38"):  # 0 once in the kernels' fp32
        hbkernels.group_norm(x, 4, eps=1e-50)
    with pytest.raises(TypeError, match=r"num_groups must be a positive int, got tensor\(2.\)"):
        hbkernels.group_norm(x, torch.tensor(2.0))
    assert hbkernels.group_norm(x, torch.tensor(4)).shape == x.shape
    with pytest.raises(ValueError, match="x must be 4D or 5D"):
        hbkernels.group_norm(x[0], 4)
    with pytest.raises(ValueError, match="x must be 5D"):
        hbkernels.group_norm_to_tokens(x, 4)
    with pytest.raises(TypeError, match="x must have dtype"):
        hbkernels.group_norm(x.long(), 4)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        hbkernels.group_norm(x.cpu().numpy(), 4)
    with pytest.raises(ValueError, match="weight must have 12 elements"):
        hbkernels.group_norm(x, 4, weight=torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="bias must be 1D"):
        hbkernels.group_norm(x, 4, bias=torch.ones(12, 1, device=DEVICE))
    with pytest.raises(ValueError, match="activation"):
        hbkernels.group_norm(x, 4, activation="gelu")
    with pytest.raises(ValueError, match="eps"):
        hbkernels.group_norm(x, 4, eps=0.0)
    with pytest.raises(ValueError, match=r"shift must have shape \(N, C\)"):
        hbkernels.group_norm(x, 4, shift=torch.ones(2, 6, device=DEVICE))
    with pytest.raises(ValueError, match="shift must be 2D"):
        hbkernels.group_norm(x, 4, shift=torch.ones(12, device=DEVICE))
    with pytest.raises(ValueError, match="shift is on meta"):
        hbkernels.group_norm(x, 4, shift=torch.ones(2, 12, device="meta"))
    with pytest.raises(ValueError, match="weight is on meta"):
        hbkernels.group_norm(x, 4, weight=torch.ones(12, device="meta"))


def test_group_norm_statistics_programs_fill_the_gpu(monkeypatch):
    """On a GPU the statistics pass launches about STATS_PROGRAMS_PER_SM programs per SM, in whole chunks
    of tiles that cover every tile once."""
    from hbkernels.triton import group_norm as gn

    monkeypatch.setattr(gn, "INTERPRETED", False)
    monkeypatch.setattr(gn, "sm_count", lambda device: 132)
    monkeypatch.setattr(gn, "STATS_PROGRAMS_PER_SM", 8)
    # (batch, channel blocks, tiles per channel block) -> (tiles per chunk, chunks)
    assert gn._chunking(1, 320, 20, "cuda") == (5, 4)  # 1280 programs for 1056 wanted: the U-Net's level 0
    assert gn._chunking(2, 5, 400, "cuda") == (4, 100)  # 1000
    assert gn._chunking(1, 5, 3, "cuda") == (1, 3)  # fewer tiles than wanted programs: one each


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("param_dtype", [torch.float64, torch.float16])
def test_group_norm_parameters_in_another_dtype(backend_name, param_dtype):
    """weight/bias in another float dtype than x (and strided): every backend gives PyTorch's answer
    for those parameters in x's dtype, with gradients in the parameters' own dtype."""
    x = rand(2, 8, 3, 4, 4)
    w = rand(16, mean=1.0, dtype=param_dtype)[::2].detach().requires_grad_()
    b = rand(8, dtype=param_dtype, requires_grad=True)
    with hbkernels.use_backend(backend_name):
        y = hbkernels.group_norm(x, 4, w, b, activation="silu")
        gw, gb = torch.autograd.grad(y.square().sum(), [w, b])
    # float64 reference through x's dtype, as the parameters are used: w.to(x.dtype).double()
    w64, b64 = (p.detach().clone().requires_grad_() for p in (w, b))
    want = torch.nn.functional.silu(torch.nn.functional.group_norm(
        x.double(), 4, w64.to(x.dtype).double(), b64.to(x.dtype).double()))
    want_gw, want_gb = torch.autograd.grad(want.square().sum(), [w64, b64])
    assert y.dtype == x.dtype and gw.dtype == param_dtype and gb.dtype == param_dtype
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(gw.double(), want_gw.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb.double(), want_gb.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_group_norm_offsets_past_int32(backend_name):
    """A sample's offsets past 2^31 elements (here a channel stride that spans the whole storage: a
    (C, N, ...) tensor seen as (N, C, ...), or a big video's sample): int64 index arithmetic."""
    x, dy = huge_strided_views(3, 3)
    x.requires_grad_()
    w, b = rand(3, mean=1.0, dtype=torch.float16), rand(3, dtype=torch.float16)
    with hbkernels.use_backend(backend_name):
        y = hbkernels.group_norm(x, 1, w, b, activation="silu")
        (dx,) = torch.autograd.grad(y, [x], dy)
    x64 = x.detach().double().contiguous().requires_grad_()
    want = torch.nn.functional.silu(torch.nn.functional.group_norm(x64, 1, w.double(), b.double()))
    (want_dx,) = torch.autograd.grad(want, [x64], dy.double())
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-2)
    torch.testing.assert_close(dx.double(), want_dx, rtol=0, atol=2e-2)


@pytest.mark.skipif(DEVICE.type != "cpu" or not hbkernels.backend.cpp_available(), reason="C++ backend is CPU-only")
def test_group_norm_cpp_mean_rounds_once():
    """The C++ rows' statistics correct the fp32 row mean sum / L with the sum of deviations from it, so a
    group's mean is the exact one rounded once to fp32 (error <= 0.5 ulp); averaging the rounded row means
    instead errs by ~1-2 ulps. Mean 1000 with std 0.01: each ulp of the mean (2^-14) is 0.6% of y's scale."""
    ulp = 2.0**-14  # of fp32 in [512, 1024)
    groups = 64
    x = (torch.randn(1, 64, 1, 64, 64, dtype=torch.float64) * 1e-2 + 1000.0).float()
    xg = x.double().reshape(1, groups, -1)
    std = xg.var(-1, unbiased=False, keepdim=True).sqrt()
    want = (xg - xg.mean(-1, keepdim=True)) / std
    with hbkernels.use_backend("cpp"):
        y = hbkernels.group_norm(x, groups, eps=1e-30)
    err_in_mean_ulps = ((y.double().reshape(xg.shape) - want).abs() * std / ulp).max().item()
    assert err_in_mean_ulps < 0.6


@pytest.mark.parametrize("backend_name", CPP)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("plane", [(4, 4), (4, 5)], ids=["no-tail", "tail"])
def test_group_norm_backward_of_huge_constant_groups(backend_name, dtype, plane):
    """Constant groups of magnitude 3e36: xhat is 0 everywhere, but in a vector's empty tail lanes
    (0 - mean) * rstd overflows to -inf, and dy's 0 there times it was NaN in the group's sums: the
    result depended on where the plane's length left a tail."""
    x = torch.full((1, 4, 1, *plane), 3e36, dtype=dtype, requires_grad=True)
    dy = rand(*x.shape).to(dtype)
    with hbkernels.use_backend(backend_name):
        (dx,) = torch.autograd.grad(hbkernels.group_norm(x, 2), [x], dy)
    # exact: xhat = 0 and rstd = eps^-1/2 (float64 group_norm itself finds a rounding-error variance here)
    groups = dy.double().view(1, 2, -1)
    want = ((groups - groups.mean(-1, keepdim=True)) / 1e-5 ** 0.5).view(x.shape)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(dx.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("backend_name", CPP)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last_3d], ids=["contiguous", "channels_last"])
def test_group_norm_of_huge_constant_groups_of_any_length(backend_name, fmt):
    """A constant group is normalised exactly (xhat = 0, rstd = eps^-1/2) whatever its length. Where the
    first pass's fp32 mean of a constant row of 1e30-3e36 was off by an ulp (which lengths depends on
    the summation order: AVX2 or the scalar build), the deviations squared overflowed fp32, the variance
    came out inf and rstd 0: dx was 0 instead of (dy - mean(dy)) / sqrt(eps)."""
    for value in HUGE_CONSTANTS:
        for plane in [(1, 3), (3, 3), (2, 7), (3, 5), (1, 13), (4, 5)]:
            x = torch.full((1, 2, 1, *plane), value).contiguous(memory_format=fmt).requires_grad_()
            dy, b = rand(*x.shape), rand(2)
            with hbkernels.use_backend(backend_name):
                y = hbkernels.group_norm(x, 1, None, b)
                (dx,) = torch.autograd.grad(y, [x], dy)
            torch.testing.assert_close(y, b.view(1, 2, 1, 1, 1).expand_as(y), rtol=0, atol=0)
            want = (dy.double() - dy.double().mean()) / 1e-5 ** 0.5
            torch.testing.assert_close(dx.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item(),
                                       msg=lambda m, v=value, p=plane: f"value {v}, plane {p}: {m}")


@pytest.mark.parametrize("backend_name", CPP)
@pytest.mark.parametrize("which", ["dweight", "dbias"])
def test_group_norm_cpp_backward_checks_the_affine_gradient_shapes(backend_name, which):
    """A (1, C) dweight or dbias holds C elements, but the kernel writes channel c at c * stride(0) =
    c * C: past its end. The C++ primitive refuses it."""
    from hbkernels import cpp

    x, dy, dx = rand(1, 8, 1, 6), rand(1, 8, 1, 6), torch.empty(1, 8, 1, 6)
    mean, rstd = torch.zeros(1, 2), torch.ones(1, 2)
    grads = {"dweight": torch.empty(8), "dbias": torch.empty(8), which: torch.empty(1, 8)}
    with pytest.raises(RuntimeError, match=rf"{which} must be float32 of shape \(C,\) = \(8,\), got \[1, 8\]"):
        cpp.gn_bwd(dy, x, None, None, None, mean, rstd, dx, grads["dweight"], grads["dbias"], 2, False)


@pytest.mark.parametrize("backend_name", CPP)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_merges_every_threads_partials(backend_name, layout, activation, many_threads):
    """Each thread's Welford accumulators (forward) and partial sums (backward, dweight, dbias) are
    merged across threads."""
    x = rand(2, 16, 6, 6, dtype=torch.float64, mean=1.0, requires_grad=True)
    w = rand(16, dtype=torch.float64, mean=1.0, requires_grad=True)
    b = rand(16, dtype=torch.float64, requires_grad=True)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    check_against_float64(lambda x, w, b: hbkernels.group_norm(x.contiguous(memory_format=fmt), 4, w, b,
                                                               activation=activation),
                          [x, w, b], backend_name, torch.float32)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_group_norm_fp32_parameters_of_fp16_activations(backend_name):
    """Mixed precision (fp16 activations, fp32 master weights): every backend computes in fp32 and takes
    the parameters as they are; rounding them to fp16 first made the error against float64 1.5x that
    of PyTorch's own mixed-dtype result (fp32 norm of the activations, rounded once) in the median
    draw, up to 2.4x (the kernels until they took them as given, the reference until it computed in
    fp32). Now the same error, draw by draw."""
    ratios = []
    for _ in range(8):
        x = rand(2, 16, 3, 6, 6, dtype=torch.float16)
        w, b = rand(16, requires_grad=True), (rand(16) * 30).requires_grad_()
        with hbkernels.use_backend(backend_name):
            y = hbkernels.group_norm(x, 4, w, b)
        want = torch.nn.functional.group_norm(x.double(), 4, w.detach().double(), b.detach().double())
        torch_err = (torch.nn.functional.group_norm(x.float(), 4, w, b).half().double() - want).abs().max()
        ratios.append(((y.double() - want).abs().max() / torch_err).item())
    assert sorted(ratios)[len(ratios) // 2] <= 1.2, ratios
    with hbkernels.use_backend(backend_name):
        gw, gb = torch.autograd.grad(hbkernels.group_norm(x, 4, w, b).float().square().sum(), [w, b])
    assert gw.dtype == gb.dtype == torch.float32


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_group_norm_fp32_bias_gradient_past_fp16_range(backend_name):
    """fp32 bias of fp16 activations: its gradient, a sum over N*H*W, is 131072 here, past fp16's 65504;
    the reference backend rounded the bias to fp16 and returned inf."""
    x = rand(64, 16, 32, 4, dtype=torch.float16)
    w, b = rand(16, mean=1.0, requires_grad=True), rand(16, requires_grad=True)
    with hbkernels.use_backend(backend_name):
        y = hbkernels.group_norm(x, 4, w, b)
    (db,) = torch.autograd.grad(y, [b], torch.full_like(y, 16.0))
    assert db.dtype == torch.float32
    torch.testing.assert_close(db, torch.full_like(b, 64 * 32 * 4 * 16.0))


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last_3d], ids=["contiguous", "channels_last"])
def test_group_norm_of_constant_groups_is_the_bias(backend_name, fmt):
    """fp32 groups of one repeated value: the variance is exactly 0 and y exactly the bias. The Triton
    statistics merged equal lane means with rounded weights, an ulp or two off the value, and normalised
    that error times 1/sqrt(eps) to outputs 0.06 off the bias (the cluster kernels alike)."""
    values = torch.tensor([3333.3333, -7.77, 123.456, 0.1], device=DEVICE).repeat_interleave(8)  # 4 groups of 8
    x = values.view(1, 32, 1, 1, 1).expand(2, 32, 3, 10, 13).contiguous(memory_format=fmt).requires_grad_()
    w, b = rand(32, mean=1.0, requires_grad=True), rand(32, requires_grad=True)
    with hbkernels.use_backend(backend_name):
        y = hbkernels.group_norm(x, 4, w, b, activation="silu")
    torch.testing.assert_close(y, torch.nn.functional.silu(b).view(1, 32, 1, 1, 1).expand_as(y), atol=1e-6, rtol=0)
    dy = torch.randn_like(y)
    with hbkernels.use_backend(backend_name):
        got = torch.autograd.grad(y, [x, w, b], dy)
    # contiguous: torch's float64 channels-last GroupNorm is itself off by the size of dx on such groups
    x64, w64, b64 = (t.detach().double().contiguous().requires_grad_() for t in (x, w, b))
    want = torch.autograd.grad(torch.nn.functional.silu(torch.nn.functional.group_norm(x64, 4, w64, b64)),
                               [x64, w64, b64], dy.double())
    for g, h in zip(got, want):  # dweight is 0 but for float64's own rounding (1e-8)
        torch.testing.assert_close(g.double(), h, rtol=1e-4, atol=1e-4 * h.abs().max().item() + 1e-6)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("trained", ["weight", "bias", "both"])
def test_group_norm_affine_gradients_of_a_frozen_channels_last_input(backend_name, dtype, trained):
    """Only the norm's parameters train, on a channels-last input that needs no gradient: torch's own
    CPU group_norm backward segfaults there (torch 2.13), and float64 always runs the reference."""
    x = rand(2, 8, 3, 5, 4, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    w = rand(8, dtype=dtype, mean=1.0, requires_grad=trained in ("weight", "both"))
    b = rand(8, dtype=dtype, requires_grad=trained in ("bias", "both"))
    dy = rand(2, 8, 3, 5, 4, dtype=dtype)
    params = [p for p in (w, b) if p.requires_grad]
    with hbkernels.use_backend(backend_name):
        y = hbkernels.group_norm(x, 4, w, b, activation="silu")
        got = torch.autograd.grad(y, params, dy)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    x64, w64, b64 = (t.detach().double().contiguous().requires_grad_(t.requires_grad) for t in (x, w, b))
    y64 = torch.nn.functional.silu(torch.nn.functional.group_norm(x64, 4, w64, b64))
    want = torch.autograd.grad(y64, [p for p in (w64, b64) if p.requires_grad], dy.double())
    for g, h in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_norm_of_one_element_groups_is_the_bias(backend_name, dtype):
    """A group of one element has variance 0, so y is the bias, on every backend (F.group_norm refuses
    such input outright; the kernels normalise it)."""
    x, b = rand(1, 4, 1, 1, dtype=dtype), rand(4, dtype=dtype)
    with hbkernels.use_backend(backend_name):
        y = hbkernels.group_norm(x, 4, rand(4, dtype=dtype), b)
        y1d = hbkernels.nn.GroupNorm(8, 8).to(dtype)(rand(1, 8, dtype=dtype))
    # torch's fp32 folds the mean into the bias: x's rounding times 1/sqrt(eps) (the kernels are exact)
    torch.testing.assert_close(y, b.view(1, 4, 1, 1), rtol=0, atol=1e-4)
    torch.testing.assert_close(y1d, torch.zeros(1, 8, dtype=dtype), rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_backward_of_one_element_groups_is_zero(backend_name, activation):
    """dx of a one-element group is exactly 0: w * dz minus its own mean c1. The Triton kernels are exact
    if w * dz is rounded as c1 summed it; the GPU compilers fused w * dz - c1 into an FMA (sm_90 PTX /
    SASS), making dx that product's rounding error times 1/sqrt(eps). The interpreter never fuses: on
    CPU this guards the arithmetic; the GPU run of this file is what sees the fusion. The C++ backward
    folds rstd into its coefficients, as torch's does: both leave dx a few ulps of rstd * w * dz."""
    x = rand(2, 8, 1, 1, requires_grad=True)
    w, b, dy = rand(8, mean=1.0, requires_grad=True), rand(8, requires_grad=True), rand(2, 8, 1, 1)
    with hbkernels.use_backend(backend_name):
        dx, dw, db = torch.autograd.grad(hbkernels.group_norm(x, 8, w, b, activation=activation), [x, w, b], dy)
    assert torch.equal(dw, torch.zeros_like(dw))
    if backend_name == "triton":
        assert torch.equal(dx, torch.zeros_like(dx))
    else:  # rstd * |w dz| (dz <= 1.1 dy), the scale of dx's terms
        terms = (dy * w.detach().view(1, 8, 1, 1)).abs().max().item() / 1e-5 ** 0.5
        assert dx.abs().max().item() <= 4 * 1.1 * terms * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("backend_name", CPP)
def test_group_norm_channels_last_large_mean_as_accurate_as_contiguous(backend_name):
    """fp32, mean 1000 and spread 1: the C++ channels-last statistics took the rounded first-pass mean
    as final (no deviation-sum correction), 40x the contiguous path's output error."""
    x = (1000 + torch.randn(1, 8, 64, 64, dtype=torch.float64)).float()
    want = torch.nn.functional.group_norm(x.double(), 2)
    errors = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        with hbkernels.use_backend(backend_name):
            y = hbkernels.group_norm(x.contiguous(memory_format=fmt), 2)
        errors[str(fmt)] = (y.double() - want).abs().max().item()
    assert errors["torch.channels_last"] <= 4 * errors["torch.contiguous_format"], errors


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_group_norm_silu_in_its_tails(backend_name, sign):
    """SiLU inputs z ~ -/+10 only: the outputs (z < 0) or the derivative's 1 - sigmoid(z) (z > 0) are
    small, so an error of an ulp of 1 (1 - sigmoid(z) formed by subtraction) is far above the bound."""
    x = rand(2, 8, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = rand(8, dtype=torch.float64) * 0.1 + 1
    b = torch.full((8,), 10.0 * sign, dtype=torch.float64)
    check_against_float64(lambda x: hbkernels.group_norm(x, 4, w, b, activation="silu"), [x],
                          backend_name, torch.float32)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("activation", [None, "silu"])
def test_group_norm_channels_last_wide_with_a_contiguous_gradient(backend_name, activation):
    """Channels-last x of 160 channels whose output gradient is contiguous (a .contiguous() after the
    norm): the C++ backward tiles the transpose 128 channels at a time, so its second channel block
    starts at channel 128."""
    x = rand(1, 160, 2, 3, 3, dtype=torch.float64, mean=1.0, requires_grad=True)
    w = rand(160, dtype=torch.float64, mean=1.0, requires_grad=True)
    b = rand(160, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b):
        cl = x.contiguous(memory_format=torch.channels_last_3d)
        return hbkernels.group_norm(cl, 32, w, b, activation=activation).contiguous()

    check_against_float64(fn, [x, w, b], backend_name, torch.float32)


@pytest.mark.parametrize("backend_name", TRITON)
def test_group_norm_backward_channel_blocks_past_the_grids_second_axis(monkeypatch, backend_name):
    """The forward puts channel blocks first where they pass CUDA's 65,535 on grid axis 1; the backward
    launched them on axis 1 regardless (4-channel partial-sum tiles: C > 262,140 with large planes
    failed to launch on a GPU). Here a limit of 2 (the interpreter has none) and 3 channel blocks."""
    from hbkernels.triton import group_norm as gn

    launches = record_launches(monkeypatch, "_gn_bwd_partials_kernel", "_gn_bwd_apply_kernel")
    monkeypatch.setattr(gn, "_MAX_GRID_1", 2)
    x = rand(1, 48, 2, 4, 4, dtype=torch.float64, mean=3.0, requires_grad=True)
    w = rand(48, dtype=torch.float64, mean=1.0, requires_grad=True)
    b = rand(48, dtype=torch.float64, requires_grad=True)
    check_against_float64(lambda x, w, b: hbkernels.group_norm(x, 4, w, b, activation="silu"), [x, w, b],
                          backend_name, torch.float32)
    assert {name for name, *_ in launches} == {"_gn_bwd_partials_kernel", "_gn_bwd_apply_kernel"}, launches
    assert all(grid[1] <= 2 for _, grid, _ in launches), launches
