"""GroupNorm (+ fused SiLU) forward and backward on strided (N, C, T, S) views.

Design (a group holds C/G channels x T*S elements, far too much work for one program at batch 1-2):

forward  1. _gn_stats:    grid (N * chunks, C blocks). Each program walks the [BLOCK_C, BLOCK_S] tiles
                          of one chunk of the (t, s) plane with a Welford (mean, M2) per tile lane,
                          Chan-merges the lanes into the chunk's per-channel (mean, M2) at the end.
                          Writes them to small fp32 buffers (N, C, chunks); chunk counts follow from
                          the tiling (_chunk_count).
         2. _gn_finalize: grid (N * G). Merges the C/G * chunks partials of one group
                          (mean = sum n_i mu_i / n, M2 = sum M2_i + n_i (mu_i - mu)^2), writes mean, rstd.
         3. _gn_apply:    grid (N * T * S blocks, C blocks). y = (x - mean) * rstd * w + b (+ SiLU).
backward 1. _gn_bwd_partials: same grid as stats; per channel and chunk, sum dz * xhat and sum dz, with
                          dz = dy or dy * silu'(z), z recomputed from x.
         2. _gn_bwd_finalize: per group c1 = mean(dz * w), c2 = mean(dz * w * xhat).
         3. _gn_bwd_apply: dx = rstd * (w * dz - c1 - xhat * c2).
         dweight / dbias: torch sums of the (N, C, chunks) partials.

Channel blocks are not aligned to groups (statistics are per channel, merged per group afterwards), so
a tile can be 64 channels wide: with channels-last or token-layout tensors (unit channel stride) every
access is a full 128-byte line, while a group alone is only C/G (e.g. 10) channels = 20 bytes. On NCHW
tensors the statistics and apply tiles are one channel wide: one contiguous run of its (t, s) row.

One pass (opt-in, ONE_PASS; NCHW, where each channel's (t, s) row is contiguous):
backward _gn_one_pass_bwd_kernel: each program holds one tile of dy and x in registers and publishes
                          its partial sums (sum dz * xhat, sum dz) to its group, waits until the
                          group's programs have all published, merges them and writes its tile of dx.
                          dy and x are read once, where the three kernels read them twice. The
                          exchange needs a group's programs resident at once, which bounds the tile
                          from below (see _one_pass_plan).

Cluster kernels (opt-in, CLUSTER_FORWARD / CLUSTER_BACKWARD; CUDA sm_90+; NCHW and channels-last):
hbkernels/cuda/group_norm_cluster.cu does the whole forward, or backward, in one kernel, each (sample,
group) held in one thread-block cluster's shared memory.

Memory traffic: forward reads x twice and writes y once; the fused SiLU saves the separate activation
pass (one read + one write), and writing y straight into the token layout saves the permute copy (one
more read + write). Backward reads dy and x twice (one pass: once) and writes dx once.
"""
import functools

import torch
import triton
import triton.language as tl

try:  # grid dependency control (Triton >= 3.3, which also has the launch_pdl option)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

from hbkernels.backend import _env_flag, empty
from hbkernels.triton.layout import (INTERPRETED, cdiv, merge_ts, next_pow2, sm_count, store_cast, strides4,
                                    tile_offsets, tile_shape, warps_for)

# Forward launch tuning, timed against each other on an H100 by `python -m bench.sweep`
# (bench/results/sweep-*.md). Statistics programs per SM: the pass is bound by loads in flight, so it
# wants every SM full, in whole waves. Elements per statistics tile (also the backward's partial sums,
# the same chunk-walking loop): 2048 (4 warps) beat 4096 and 8192 at every level-0 shape (sm_90: 80 /
# 101 registers, 6 / 4 programs resident per SM). The apply pass walks the tiles in the reverse of the
# statistics pass's order, so it starts on the tiles read last, which are still in L2: 1-6% faster.
# L2 eviction hints (evict-last on the first read, evict-first on the last) lost 5-15% at every setting.
# APPLY_EVICT_FIRST marks only the apply pass's accesses evict-first, y's stores included: y's 26 MB
# (level 0, T16) then displace less of the x the apply pass has still to read from L2. H100, level 0:
# 32.1 / 49.1 us against 33.4 / 50.9 at T16 / T26 (NCHW), 33.8 / 52.8 against 34.6 / 55.5 (channels-last).
# Channels-last x (unit channel stride; the U-Net's layout): statistics tiles of 1024 beat 2048 at every
# program and stage count of 3 or more, at T16 (H100: 38.4-39.4 us against 40.5-42.2, two sessions) and
# T26 (58.5-61.0 against 60.8-65.0).
STATS_PROGRAMS_PER_SM = 8
_STATS_TILE = 2048
_STATS_TILE_CHANNELS_LAST = 1024
APPLY_REVERSED = True
APPLY_EVICT_FIRST = True
# Channels per tile where no tensor has unit channel stride (NCHW: each channel's (t, s) plane one
# contiguous row), for the statistics, apply, backward partial sums and dx. 16 (tile_shape's default)
# makes a 2048-element statistics tile 16 rows of 256 bytes, 80 KB apart at level 0; fewer channels make
# each row a longer contiguous run (where a channel's row is shorter than the tile, tile_shape stacks
# rows up to 16, so small planes keep full-size tiles). H100, level 0 fp16, against 16 everywhere
# (32.4 / 49.2 us forward, 63.9 / 92.1 backward at T16 / T26): statistics 1 channel 30.9 / 47.6 (T26 at
# 1024-element tiles: 66560 positions take no 2048 evenly, and a ragged tile costs a division per lane),
# apply 1 channel 31.5 / 48.6, both 30.0 at T16; backward partial sums 4 channels 58.0 / 86.0 (1: 61.8
# / 91.5).
_STATS_CHANNELS_NCHW = 1
_APPLY_CHANNELS_NCHW = 1
_BWD_CHANNELS_NCHW = 4
_BWD_APPLY_CHANNELS_NCHW = 16  # the backward's dx pass (reads dy and x, writes dx); not yet swept
# Pipeline stages of the statistics loop (and the backward's partial sums): tiles in flight per program
# = STATS_STAGES - 1, in shared memory (4 KiB each at the fp16 2048-element tile). 4 keeps 3 tiles
# ahead at 64 sm_90 registers in fp16 (8 programs per SM, 96 KiB in flight per SM; fp32: 70, 7).
# H100, level 0: 3, 4 and 5 stages within 0.6-1.3 us of each other at every statistics setting that wins.
STATS_STAGES = 4
# (Statistics reduced per tile and Chan-merged, one state per channel instead of a Welford state per
# lane: 47 registers and 10 programs per sm_90 SM against 72 and 7, yet tied or lost at every timed
# point, 27-30 / 41-43 us against 27 / 41 at level 0 T16 / T26 on an H200; removed.)
# Elements per apply tile (8 warps). sm_90, level 0: 4096 -> 35-40 registers, 6 programs (48 KiB of x in
# flight per SM); 8192 -> 57-62, 4 (64 KiB); 16384 -> 88-91, 2 (64 KiB). H100, level 0: 4096 and 8192
# tie on NCHW x (33.4 / 33.5 us at T16, 51.2 / 51.2 at T26); on channels-last x 8192 wins (37.8 against
# 42.2 us at T16, 60.2 against 65.0 at T26), 16384 loses on both (all at 16-channel NCHW tiles; the
# one-channel 4096 tile takes 32 registers, 8 programs per SM).
_APPLY_TILE = 4096
_APPLY_TILE_CHANNELS_LAST = 8192
# Launch order of the statistics and apply grids on channels-last x (unit channel stride): a 64-channel
# tile reads 128 bytes per position, and a position's other channel blocks (the rest of its row of C,
# e.g. 640 bytes at 320 channels) are other programs. Positions first (the default) launches one channel
# block's programs together; channel blocks first launches a position's row together, so programs
# running at once read adjacent bytes. Not yet timed.
CHANNEL_BLOCKS_FIRST = False
# (The apply pass merging each group's statistics partials itself, in place of the finalize launch,
# lost 7-14 us at level 0 on an H200: every apply program's chain of partial loads costs more than the
# launch it saves; removed.)
_MAX_GRID_1 = 65535  # CUDA's limit on grid axes 1 and 2
# Hopper and newer (CUDA): the whole forward as one kernel of thread-block clusters, each holding one
# (sample, group) in shared memory while its blocks exchange partial statistics
# (hbkernels/cuda/group_norm_cluster.cu): x read from DRAM once, where the passes here read it twice,
# whose floor (25.2 us at level 0, T16, on an H100) is above a 2.5 TB/s GroupNorm's 21 us. Applies where
# x and y are both NCHW or both channels-last, in whole units (else these kernels run). CLUSTER_BACKWARD:
# the backward the same way, dy and x held together (read once each, where the passes here read both
# twice). Opt-in (HBKERNELS_CLUSTER_GN=1 sets both): on an H200 they lose to the passes here (level 0
# fp16: forward 34-50 us NCHW and 86-172 channels-last against 27-46; backward 54 / 72 against 50 /
# 72; bench/results, nineteenth session). CLUSTER_BLOCKS: blocks per cluster (None:
# hbkernels.cuda.group_norm.plan's choice from the device's SMs and the clusters it holds at once).
# CLUSTER_COOPERATIVE: the forward's blocks as one cooperative grid instead of clusters, exchanging
# partials through global memory: all resident in one wave (level 0 at T16: 128 blocks, where 32
# four-block clusters took two waves on an H200, 30 resident), else the Triton passes. It ties them at
# T16 NCHW (27 us). CLUSTER_STAGES: each cooperative block holds slices of that many groups and finishes
# them one after another, so the later groups' x arrives while the GPU waits at the earlier ones'
# barriers and writes their y (one stage: the whole GPU loads, waits, then stores). Not yet timed.
CLUSTER_FORWARD = _env_flag("HBKERNELS_CLUSTER_GN")
CLUSTER_BACKWARD = CLUSTER_FORWARD
CLUSTER_BLOCKS = None
CLUSTER_COOPERATIVE = False
CLUSTER_STAGES = 1
# (A register cap of 32 on the apply kernel, for 8 programs of 8 warps per SM, tied on NCHW x and lost
# 4.5-8.7 us on channels-last x at level 0 on an H100; one-channel NCHW tiles take 32 registers uncapped.)
# Programmatic dependent launch (sm_90+ CUDA): the statistics and finalize kernels let the next one
# launch early; the finalize's programs wait for the statistics on their SMs, and the apply pass loads its x
# tile (not written by the kernels before it) before it waits for the finalize's mean and rstd. Hides
# the launch gaps and part of the finalize's latency: 2.1-3.5 us of 33-65 at level 0 on an H100.
PDL = True
# One-pass backward (_gn_one_pass_bwd_kernel): dy and x read once, held in registers while each group's
# programs exchange partial sums; applies where every channel's (t, s) row is contiguous in every
# tensor (NCHW). Off by default: on an H100 at level 0 it won at T16 (58.6-59.7 us against 63.9) and
# lost at T26 (107 against 92); the two passes' 4-channel partial-sum tiles have since brought them to
# 58.0 / 86.0 (_BWD_CHANNELS_NCHW). (A one-pass forward, x held the same way, lost at every setting timed,
# T16: 40.7-59.7 us against 33.4 for the two passes, one tile per program or persistent; so did a
# lagged forward, one persistent kernel re-reading x from L2 a few MB behind its statistics (42.9-113
# us against 32.1, 2026-11-27): waiting on its groups' statistics, not memory, bound it.)
# Tile per program: the smallest power of two from _ONE_PASS_MIN_TILE that keeps a group's programs
# within one per SM (the condition for the group to be resident at once), at most _ONE_PASS_MAX_TILE
# for the element size (else the two-pass kernels). Level 0 at 320x512: 4096 (T16: 100 programs per
# group) and 8192 (T26: 90). The largest tiles still fit ONE_PASS_MIN_RESIDENT programs per sm_90 SM
# (fp16 8192 and fp32 4096: 2; checked by tests/gpu_compile_check.py), so even that many launches
# running at once on other streams, each with a group waiting to be resident, cannot fill the GPU with
# waiting programs.
ONE_PASS = False
ONE_PASS_MIN_RESIDENT = 2
_ONE_PASS_MIN_TILE = 4096
_ONE_PASS_MAX_TILE = {2: 8192, 4: 4096}  # by element size: the tile is held in registers
_INTERP_GROUP_PROGRAMS = 32  # the interpreter runs programs one by one: no residency limit, only cost
_INTERP_CHUNKS = 3  # a few programs per (n, channel block) under TRITON_INTERPRET (still exercises merging)
_FINAL_BLOCK = 4096  # partials per finalize block: the U-Net's groups need one (up to 3200 of them)


def _chunking(n: int, n_cb: int, n_tiles: int, device: torch.device):
    """(tiles per chunk, chunks) for the reductions over the n_tiles tiles of one (n, channel block)."""
    if INTERPRETED:
        want = _INTERP_CHUNKS
    else:
        want = cdiv(STATS_PROGRAMS_PER_SM * sm_count(device), n * n_cb)
    want = max(1, min(want, n_tiles))
    per = cdiv(n_tiles, want)
    return per, cdiv(n_tiles, per)


def _even_block(s: int, block: int) -> int:
    """``block``, or the largest power of two down to block / 4 that divides ``s``: a statistics tile
    with no ragged end runs the loop without per-lane counts (a ragged one divides per lane and tile)."""
    b = block
    while s % b and b > max(1, block // 4):
        b //= 2
    return b if s % b == 0 else block


def _grid2(programs: int, n_cb: int, channel_unit: bool):
    """(grid, CB_FIRST) of a (positions, channel blocks) launch: channel blocks first under
    CHANNEL_BLOCKS_FIRST where x's channels are contiguous, or where they do not fit grid axis 1 (NCHW
    tiles are one channel wide: C channel blocks), if the positions fit it."""
    if min(programs, n_cb) > _MAX_GRID_1:
        raise ValueError(f"group_norm: {n_cb} channel blocks x {programs} tiles exceed the grid's second axis "
                         f"({_MAX_GRID_1}) either way round")
    wanted = CHANNEL_BLOCKS_FIRST and channel_unit and n_cb > 1 or n_cb > _MAX_GRID_1
    cb_first = wanted and programs <= _MAX_GRID_1
    return ((n_cb, programs) if cb_first else (programs, n_cb)), cb_first


def _vec_or_dummy(v, like):
    return (v, int(v.stride(0))) if v is not None else (like, 0)


def _nvidia(device: torch.device) -> bool:
    """Whether kernels launch on an NVIDIA GPU (not ROCm, not the interpreter): the CUDA-only options."""
    return not INTERPRETED and device.type == "cuda" and torch.version.hip is None


@functools.lru_cache(maxsize=None)
def _has_pdl(device: torch.device) -> bool:
    return gdc_wait is not None and torch.cuda.get_device_capability(device)[0] >= 9


def _pdl(device: torch.device) -> bool:
    """Whether this call chains its kernels by programmatic dependent launch (see PDL)."""
    return PDL and _nvidia(device) and _has_pdl(device)


def _launch_after(pdl: bool) -> dict:
    """Launch options of a kernel that waits for the previous one in _wait_for_previous."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def _let_next_launch(PDL: tl.constexpr):
    """The next kernel in the stream may start its programs now (they wait in _wait_for_previous)."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def _wait_for_previous(PDL: tl.constexpr):
    """Blocks until the previous kernel in the stream has finished and its writes are visible."""
    if PDL:
        gdc_wait()


@triton.jit
def _sigmoid_parts(z, PRECISE: tl.constexpr):
    """(sigmoid(z), 1 - sigmoid(z)).

    PRECISE (fp32 tensors): to a few ulps. GPUs' default fp32 '/' is approximate, so the division is
    round-to-nearest; exp(-|z|) cannot overflow; and 1 - sigmoid(z) is never formed by subtraction,
    which for z > 0 cancels sigmoid's rounding into an error z times larger in SiLU's derivative
    sigmoid(z) * (1 + z * (1 - sigmoid(z))). The fast form's error is far below fp16/bf16 rounding,
    and in one H200 run the precise form made fp16 GroupNorm+SiLU at 320x512 16% slower."""
    if PRECISE:
        e = tl.exp(-tl.abs(z))
        r = tl.div_rn(1.0, 1.0 + e)  # sigmoid(|z|)
        er = e * r  # sigmoid(-|z|)
        pos = z >= 0
        return tl.where(pos, r, er), tl.where(pos, er, r)
    else:
        sig = tl.sigmoid(z)
        return sig, 1.0 - sig


@triton.jit
def _tile_origin(pid_tile, n_sb, BLOCK_S: tl.constexpr):
    """tile index within one n -> (t, first s)."""
    t = pid_tile // n_sb
    s0 = (pid_tile - t * n_sb) * BLOCK_S
    return t, s0


@triton.jit
def _chunk_count(chunk, tiles_per_chunk, n_tiles, n_sb, S, BLOCK_S: tl.constexpr):
    """Elements per channel in chunk(s) ``chunk``: BLOCK_S per tile, less the ragged end of each
    t-row's last s-block (tiles i with (i + 1) % n_sb == 0)."""
    first = chunk * tiles_per_chunk
    last = tl.minimum(first + tiles_per_chunk, n_tiles)
    ragged = last // n_sb - first // n_sb
    return ((last - first) * BLOCK_S - ragged * (n_sb * BLOCK_S - S)).to(tl.float32)


@triton.jit
def _channel_vec(ptr, cc, cmask, stride, HAS: tl.constexpr, BLOCK_C: tl.constexpr):
    """An optional per-channel vector (bias, shift) as fp32; zeros when absent."""
    if HAS:
        return tl.load(ptr + cc * stride, mask=cmask, other=0.0).to(tl.float32)
    else:
        return tl.zeros([BLOCK_C], dtype=tl.float32)


@triton.jit
def _grid_ids(CB_FIRST: tl.constexpr):
    """(program along the positions, channel block, and the counts of both) of a 2D grid: (positions,
    channel blocks), or with CB_FIRST (channel blocks, positions), launching a position's channel blocks
    together (see CHANNEL_BLOCKS_FIRST)."""
    if CB_FIRST:
        ids = tl.program_id(1), tl.program_id(0), tl.num_programs(1), tl.num_programs(0)
    else:
        ids = tl.program_id(0), tl.program_id(1), tl.num_programs(0), tl.num_programs(1)
    return ids


@triton.jit
def _chunk_program(C, n_chunks, BLOCK_C: tl.constexpr, CB_FIRST: tl.constexpr):
    """(n, chunk, channels, channel mask) of a program of a (N * chunks, channel blocks) grid."""
    pid, cb, _, _ = _grid_ids(CB_FIRST)
    n = pid // n_chunks
    cc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    return n.to(tl.int64), pid - n * n_chunks, cc, cc < C  # int64 n: n * C passes 2^31 for large N


@triton.jit
def _chunk_tile(base, i, cc, cmask, ar, S, n_sb, sc, st, ss, EVEN_S: tl.constexpr, BLOCK_S: tl.constexpr):
    """Tile i of one (n, channel block) of a chunk-walking reduction, upcast to fp32; zeros past S."""
    t, s0 = _tile_origin(i, n_sb, BLOCK_S)
    s = s0 + ar
    if EVEN_S:
        mask = cmask[:, None]
    else:
        mask = cmask[:, None] & (s < S)[None, :]
    offs = t.to(tl.int64) * st + cc.to(tl.int64)[:, None] * sc + s.to(tl.int64)[None, :] * ss  # see tile_offsets
    return tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _per_lane_stats(x_n, first, last, cc, cmask, ar, S, n_sb, sxc, sxt, sxs,
                    EVEN_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr):
    """(mean, M2) per channel of tiles first..last-1, from a Welford state per lane."""
    # Each element of the tile updates its own lane's (mean, M2) in registers, so the loop needs no
    # cross-thread reduction. A per-tile reduction over S goes through shared memory when the tile's
    # threads run along C (channels-last); the per-tile two-pass version ran 3.6x longer on
    # channels-last than on NCHW tensors in an H200 U-Net step.
    # Loads in flight bound this pass: the loop is software-pipelined (STAGES - 1 tiles ahead, copied
    # asynchronously into shared memory: cp.async on sm_80+), which keeps the registers down to the
    # (mean, M2) state (see STATS_STAGES).
    # With no ragged s-blocks (EVEN_S) every lane counts the same tiles: one scalar count, no masks.
    cnt = tl.zeros([BLOCK_S], dtype=tl.float32)  # elements seen per S lane (the same for every channel)
    mean = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for i in tl.range(first, last, num_stages=STAGES):
        x = _chunk_tile(x_n, i, cc, cmask, ar, S, n_sb, sxc, sxt, sxs, EVEN_S, BLOCK_S)
        if EVEN_S:
            delta = x - mean
            mean += delta * tl.div_rn(1.0, (i - first + 1).to(tl.float32))
            m2 += delta * (x - mean)
        else:
            smask = (_tile_origin(i, n_sb, BLOCK_S)[1] + ar) < S
            cnt += smask.to(tl.float32)
            delta = tl.where(smask[None, :], x - mean, 0.0)
            mean += delta * tl.div_rn(1.0, tl.maximum(cnt, 1.0))[None, :]
            m2 += delta * (x - mean)  # 0 where masked: delta is
    if EVEN_S:
        cnt += (last - first).to(tl.float32)
    # Chan-merge the lanes (a lane that saw nothing has cnt = mean = M2 = 0 and adds nothing), about lane
    # 0's mean (every tile has its lane 0): the rounded weights cnt / total of a plain weighted sum moved
    # equal means off their value, and a constant group then normalised that error times 1/sqrt(eps) to
    # output values up to 0.2 where the answer is the bias
    total = tl.sum(cnt, axis=0)
    ref = tl.sum(tl.where((ar == 0)[None, :], mean, 0.0), axis=1)
    chunk_mean = ref + tl.div_rn(tl.sum((mean - ref[:, None]) * cnt[None, :], axis=1), total)
    d = mean - chunk_mean[:, None]
    return chunk_mean, tl.sum(m2 + d * d * cnt[None, :], axis=1)


@triton.jit
def _gn_stats_kernel(
    x_ptr, pmean_ptr, pm2_ptr,
    C, T, S, n_sb, n_tiles, tiles_per_chunk, n_chunks,
    sxn, sxc, sxt, sxs,
    EVEN_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr,
    CB_FIRST: tl.constexpr,
):
    _let_next_launch(PDL)
    n, chunk, cc, cmask = _chunk_program(C, n_chunks, BLOCK_C, CB_FIRST)
    first = chunk * tiles_per_chunk
    last = tl.minimum(first + tiles_per_chunk, n_tiles)
    x_n = x_ptr + n.to(tl.int64) * sxn
    ar = tl.arange(0, BLOCK_S)
    mean, m2 = _per_lane_stats(x_n, first, last, cc, cmask, ar, S, n_sb, sxc, sxt, sxs,
                               EVEN_S, BLOCK_C, BLOCK_S, STAGES)
    out = (n.to(tl.int64) * C + cc) * n_chunks + chunk
    tl.store(pmean_ptr + out, mean, mask=cmask)
    tl.store(pm2_ptr + out, m2, mask=cmask)


@triton.jit
def _partial_means(pmean_ptr, sh_ptr, idx, m, n_chunks, tiles_per_chunk, n_tiles, n_sb, S,
                   HAS_SHIFT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK: tl.constexpr):
    """(element count, mean + shift) of a group's partials idx (channel idx // n_chunks, chunk
    idx % n_chunks); 0 counts where m is False."""
    cnt = tl.where(m, _chunk_count(idx % n_chunks, tiles_per_chunk, n_tiles, n_sb, S, BLOCK_S), 0.0)
    mu = tl.load(pmean_ptr + idx, mask=m, other=0.0) + _channel_vec(sh_ptr, idx // n_chunks, m, 1, HAS_SHIFT, BLOCK)
    return cnt, mu


@triton.jit
def _group_mean_rstd(pmean_ptr, pm2_ptr, sh_ptr, grp, cpg, n_chunks, tiles_per_chunk, n_tiles, n_sb, S, group_numel,
                     eps, HAS_SHIFT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK: tl.constexpr):
    """(mean, rstd) of group grp (n * G + g) from its cpg * n_chunks statistics partials."""
    base = grp.to(tl.int64) * cpg * n_chunks  # (n, g*cpg, 0) of the (N, C, chunks) buffers
    sh_ptr += grp.to(tl.int64) * cpg  # the group's channels of the (N, C) shift
    # Chan-merge the partials (the shift moves each channel's partial means, not their M2), BLOCK at a
    # time: each block's (count, mean, M2) from registers, merged into the running one, so every partial
    # is loaded once (a chain of dependent loads: latency-bound).
    length = cpg * n_chunks
    ar = tl.arange(0, BLOCK)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for r0 in range(0, length, BLOCK):
        idx = r0 + ar
        m = idx < length
        cnt, mu = _partial_means(pmean_ptr + base, sh_ptr, idx, m, n_chunks, tiles_per_chunk, n_tiles, n_sb, S,
                                 HAS_SHIFT, BLOCK_S, BLOCK)
        pm2 = tl.load(pm2_ptr + base + idx, mask=m, other=0.0)
        b_count = tl.sum(cnt, axis=0)
        ref = tl.sum(tl.where(ar == 0, mu, 0.0), axis=0)  # about partial r0's mean, as the lanes above
        b_mean = ref + tl.div_rn(tl.sum(cnt * (mu - ref), axis=0), b_count)
        d = mu - b_mean
        b_m2 = tl.sum(pm2 + cnt * d * d, axis=0)
        total = count + b_count
        delta = b_mean - mean
        mean += delta * tl.div_rn(b_count, total)
        m2 += b_m2 + delta * delta * tl.div_rn(count * b_count, total)
        count = total
    return mean, tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(m2, group_numel) + eps))


@triton.jit
def _gn_finalize_kernel(
    pmean_ptr, pm2_ptr, sh_ptr, mean_ptr, rstd_ptr,
    G, cpg, n_chunks, tiles_per_chunk, n_tiles, n_sb, S, group_numel, eps, smn, smg, srn, srg,
    HAS_SHIFT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    _let_next_launch(PDL)
    _wait_for_previous(PDL)
    pid = tl.program_id(0)
    n = pid // G
    g = pid - n * G
    n = n.to(tl.int64)  # n * G and n * C pass 2^31 for large N
    mean, rstd = _group_mean_rstd(pmean_ptr, pm2_ptr, sh_ptr, pid, cpg, n_chunks, tiles_per_chunk, n_tiles, n_sb, S,
                                  group_numel, eps, HAS_SHIFT, BLOCK_S, BLOCK)
    tl.store(mean_ptr + n * smn + g * smg, mean)
    tl.store(rstd_ptr + n * srn + g * srg, rstd)


@triton.jit
def _gn_apply_kernel(
    x_ptr, w_ptr, b_ptr, sh_ptr, y_ptr, mean_ptr, rstd_ptr,
    C, T, S, n_sb, cpg, sw, sb_, smn, smg, srn, srg,
    sxn, sxc, sxt, sxs, syn, syc, syt, sys,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, PRECISE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, REVERSE: tl.constexpr, EVICT_FIRST: tl.constexpr,
    PDL: tl.constexpr, CB_FIRST: tl.constexpr,
):
    """y = (x - mean) * rstd * w + b (+ SiLU) of one tile."""
    pid, cb, n_pid, n_cb = _grid_ids(CB_FIRST)
    policy: tl.constexpr = "evict_first" if EVICT_FIRST else ""  # x's last read and y: see APPLY_EVICT_FIRST
    if REVERSE:  # blocks start in grid order: the last tiles first
        pid = n_pid - 1 - pid
        cb = n_cb - 1 - cb
    tiles_per_n = T * n_sb
    n = pid // tiles_per_n
    t, s0 = _tile_origin(pid - n * tiles_per_n, n_sb, BLOCK_S)
    cc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    ss = s0 + tl.arange(0, BLOCK_S)
    cmask = cc < C
    n64 = n.to(tl.int64)
    mask = cmask[:, None] & (ss < S)[None, :]
    x = tl.load(x_ptr + tile_offsets(n, t, cc, ss, sxn, sxt, sxc, sxs), mask=mask, other=0.0,
                eviction_policy=policy).to(tl.float32)
    _wait_for_previous(PDL)  # for mean and rstd
    g = cc // cpg
    mean = tl.load(mean_ptr + n64 * smn + g * smg, mask=cmask, other=0.0)
    a = tl.load(rstd_ptr + n64 * srn + g * srg, mask=cmask, other=0.0)
    # (x + shift - mean) = (x - (mean - shift))
    mu = mean - _channel_vec(sh_ptr + n64 * C, cc, cmask, 1, HAS_SHIFT, BLOCK_C)
    if HAS_W:
        a *= tl.load(w_ptr + cc * sw, mask=cmask, other=0.0).to(tl.float32)
    b = _channel_vec(b_ptr, cc, cmask, sb_, HAS_B, BLOCK_C)
    y = (x - mu[:, None]) * a[:, None]
    if HAS_B:
        y += b[:, None]
    if SILU:
        y = y * _sigmoid_parts(y, PRECISE)[0]
    tl.store(y_ptr + tile_offsets(n, t, cc, ss, syn, syt, syc, sys), store_cast(y, y_ptr.dtype.element_ty),
             mask=mask, eviction_policy=policy)


@triton.jit
def _group_ticket(sync_ptr, P):
    """(group, index in the group) of this program, assigned in the order programs start: the group's
    P programs hold consecutive tickets. See _gn_one_pass_bwd_kernel for why start order matters."""
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed")  # orders nothing: only its count matters
    grp = ticket // P
    return grp, ticket - grp * P


@triton.jit
def _row_tile(grp, k, G, cpg, n_chunks, L, TILE: tl.constexpr):
    """(n, channel, channel within the group, element offsets, mask, element count) of the tile of
    program k of group grp (n * G + g): TILE elements of one channel's row of L."""
    ch = k // n_chunks
    chunk = k - ch * n_chunks
    n = grp // G
    offs = chunk * TILE + tl.arange(0, TILE)
    count = tl.minimum(L - chunk * TILE, TILE).to(tl.float32)
    return n.to(tl.int64), (grp - n * G) * cpg + ch, ch, offs, offs < L, count


@triton.jit
def _arrive(arrived_ptr):
    """Publishes the partials this program stored to its group."""
    tl.debug_barrier()  # every thread's stores precede the release
    tl.atomic_add(arrived_ptr, 1, sem="release")


@triton.jit
def _wait_for_group(arrived_ptr, P):
    """Returns once all P programs of the group have published their partials (as a cooperative grid
    sync does, for one group)."""
    arrived = tl.atomic_add(arrived_ptr, 0, sem="acquire")
    while arrived < P:
        arrived = tl.atomic_add(arrived_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _group_partials(ptr, part, P, n_chunks, L, TILE: tl.constexpr, BLOCK_P: tl.constexpr):
    """(values, element counts; 0 past P) of a group's P partials, published by other programs. The
    acquire in _wait_for_group already makes them visible; the loads are volatile besides, so no L1
    line read before could serve them (Triton keeps that on NVIDIA; on AMD its buffer loads drop it)."""
    pi = tl.arange(0, BLOCK_P)
    pm = pi < P
    cnt = tl.where(pm, tl.minimum(L - (pi % n_chunks) * TILE, TILE).to(tl.float32), 0.0)
    return tl.load(ptr + part + pi, mask=pm, other=0.0, volatile=True), cnt


@triton.jit
def _gn_one_pass_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, b_ptr, sh_ptr, mean_ptr, rstd_ptr, dx_ptr, pa_ptr, pb_ptr, sync_ptr,
    C, L, G, cpg, n_chunks, sw, sb_, smn, smg, srn, srg, sdn, sdc, sxn, sxc, son, soc,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, PRECISE: tl.constexpr,
    TILE: tl.constexpr, BLOCK_P: tl.constexpr, WAIT: tl.constexpr,
):
    """The backward in one pass: each program holds one tile of dy and x while the group exchanges
    sum dz * xhat and sum dz (also the per-channel dweight / dbias partials), then writes
    dx = rstd * (w dz - c1 - xhat c2). dy and x are read once instead of twice.

    One tile per program, so a group's P programs wait for each other: they must be resident together.
    Programs take tickets in the order they start and a group is P consecutive tickets, so a program
    holding a ticket of a later group proves that every program of the earliest unfinished group has
    started; with room for P programs on the GPU (the launcher keeps P <= SMs) that group finishes.
    Block indices could not promise this: the hardware need not start blocks in index order."""
    P = cpg * n_chunks
    grp, k = _group_ticket(sync_ptr, P)
    n, c, ch, offs, mask, count = _row_tile(grp, k, G, cpg, n_chunks, L, TILE)
    g = grp - n * G
    mu = tl.load(mean_ptr + n * smn + g * smg)
    if HAS_SHIFT:
        mu -= tl.load(sh_ptr + n * C + c)  # x + shift - mean
    r = tl.load(rstd_ptr + n * srn + g * srg)
    n64, c64 = n.to(tl.int64), c.to(tl.int64)
    dz = tl.load(dy_ptr + n64 * sdn + c64 * sdc + offs, mask=mask, other=0.0).to(tl.float32)  # 0 past L
    xhat = (tl.load(x_ptr + n64 * sxn + c64 * sxc + offs, mask=mask, other=0.0).to(tl.float32) - mu) * r
    w = 1.0
    if HAS_W:
        w = tl.load(w_ptr + c * sw).to(tl.float32)
    if SILU:
        z = xhat * w
        if HAS_B:
            z += tl.load(b_ptr + c * sb_).to(tl.float32)
        sig, one_minus_sig = _sigmoid_parts(z, PRECISE)
        dz = dz * (sig * (1.0 + z * one_minus_sig))
    part = grp.to(tl.int64) * P
    tl.store(pa_ptr + part + k, tl.sum(dz * xhat, axis=0))
    tl.store(pb_ptr + part + k, tl.sum(dz, axis=0))
    _arrive(sync_ptr + 1 + grp)
    if WAIT:
        _wait_for_group(sync_ptr + 1 + grp, P)
        # c1 = mean(w dz), c2 = mean(w dz xhat) over the group: each partial times its channel's weight
        total = tl.cast(cpg * L, tl.float32)
        pa = _group_partials(pa_ptr, part, P, n_chunks, L, TILE, BLOCK_P)[0]
        pb = _group_partials(pb_ptr, part, P, n_chunks, L, TILE, BLOCK_P)[0]
        if HAS_W:
            pi = tl.arange(0, BLOCK_P)
            p_w = _channel_vec(w_ptr + (c - ch) * sw, pi // n_chunks, pi < P, sw, HAS_W, BLOCK_P)
            pa *= p_w
            pb *= p_w
        c1 = tl.div_rn(tl.sum(pb, axis=0), total)
        c2 = tl.div_rn(tl.sum(pa, axis=0), total)
        # dz * w kept rounded, as in _gn_bwd_apply_kernel; not by `mask`, which is constant (folded, select
        # and all) for one-element rows (L = TILE = 1), the very case it is for: r is NaN only where dx is
        dx = r * (tl.where(r == r, dz * w, 0.0) - c1 - xhat * c2)
        tl.store(dx_ptr + n64 * son + c64 * soc + offs, store_cast(dx, dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_partials_kernel(
    dy_ptr, x_ptr, w_ptr, b_ptr, sh_ptr, mean_ptr, rstd_ptr, pa_ptr, pb_ptr,
    C, T, S, n_sb, n_tiles, tiles_per_chunk, n_chunks, cpg, sw, sb_, smn, smg, srn, srg,
    sdn, sdc, sdt, sds, sxn, sxc, sxt, sxs,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, PRECISE: tl.constexpr,
    EVEN_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, STAGES: tl.constexpr,
    PDL: tl.constexpr, CB_FIRST: tl.constexpr,
):
    _let_next_launch(PDL)
    n, chunk, cc, cmask = _chunk_program(C, n_chunks, BLOCK_C, CB_FIRST)
    g = cc // cpg
    mu = (tl.load(mean_ptr + n * smn + g * smg, mask=cmask, other=0.0)
          - _channel_vec(sh_ptr + n * C, cc, cmask, 1, HAS_SHIFT, BLOCK_C))[:, None]  # x + shift - mean
    r = tl.load(rstd_ptr + n * srn + g * srg, mask=cmask, other=0.0)[:, None]
    if SILU:
        if HAS_W:
            w = tl.load(w_ptr + cc * sw, mask=cmask, other=0.0).to(tl.float32)[:, None]
        if HAS_B:
            b = tl.load(b_ptr + cc * sb_, mask=cmask, other=0.0).to(tl.float32)[:, None]
    n64 = n.to(tl.int64)
    dy_n = dy_ptr + n64 * sdn
    x_n = x_ptr + n64 * sxn
    ar = tl.arange(0, BLOCK_S)
    acc_a = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)  # sum dz * xhat
    acc_b = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)  # sum dz
    first = chunk * tiles_per_chunk
    last = tl.minimum(first + tiles_per_chunk, n_tiles)
    for i in tl.range(first, last, num_stages=STAGES):  # pipelined as in the statistics pass
        dz = _chunk_tile(dy_n, i, cc, cmask, ar, S, n_sb, sdc, sdt, sds, EVEN_S, BLOCK_S)
        x = _chunk_tile(x_n, i, cc, cmask, ar, S, n_sb, sxc, sxt, sxs, EVEN_S, BLOCK_S)
        xhat = (x - mu) * r
        if SILU:
            z = xhat
            if HAS_W:
                z = z * w
            if HAS_B:
                z = z + b
            sig, one_minus_sig = _sigmoid_parts(z, PRECISE)
            dz = dz * (sig * (1.0 + z * one_minus_sig))
        acc_a += dz * xhat  # masked lanes have dz = 0
        acc_b += dz
    out = (n64 * C + cc) * n_chunks + chunk
    tl.store(pa_ptr + out, tl.sum(acc_a, axis=1), mask=cmask)
    tl.store(pb_ptr + out, tl.sum(acc_b, axis=1), mask=cmask)


@triton.jit
def _gn_bwd_finalize_kernel(
    pa_ptr, pb_ptr, w_ptr, coef_ptr,
    G, cpg, n_chunks, group_numel, sw,
    HAS_W: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    _let_next_launch(PDL)
    _wait_for_previous(PDL)
    pid = tl.program_id(0)  # n * G + g
    g = pid % G
    base = pid.to(tl.int64) * cpg * n_chunks  # (n, g*cpg, 0) of the (N, C, chunks) buffers
    length = cpg * n_chunks
    ar = tl.arange(0, BLOCK)
    acc_a = tl.zeros([BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK], dtype=tl.float32)
    for r0 in range(0, length, BLOCK):
        idx = r0 + ar
        m = idx < length
        pa = tl.load(pa_ptr + base + idx, mask=m, other=0.0)
        pb = tl.load(pb_ptr + base + idx, mask=m, other=0.0)
        if HAS_W:
            w = tl.load(w_ptr + (g * cpg + idx // n_chunks) * sw, mask=m, other=0.0).to(tl.float32)
            pa = pa * w
            pb = pb * w
        acc_a += pa
        acc_b += pb
    tl.store(coef_ptr + pid.to(tl.int64) * 2, tl.div_rn(tl.sum(acc_b, axis=0), group_numel))  # c1 = mean(w dz)
    tl.store(coef_ptr + pid.to(tl.int64) * 2 + 1, tl.div_rn(tl.sum(acc_a, axis=0), group_numel))  # c2 = mean(w dz xhat)


@triton.jit
def _gn_bwd_apply_kernel(
    dy_ptr, x_ptr, w_ptr, b_ptr, sh_ptr, mean_ptr, rstd_ptr, coef_ptr, dx_ptr,
    C, T, S, n_sb, G, cpg, sw, sb_, smn, smg, srn, srg,
    sdn, sdc, sdt, sds, sxn, sxc, sxt, sxs, son, soc, sot, sos,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SHIFT: tl.constexpr, SILU: tl.constexpr, PRECISE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr, CB_FIRST: tl.constexpr,
):
    pid, cb, _, _ = _grid_ids(CB_FIRST)
    tiles_per_n = T * n_sb
    n = pid // tiles_per_n
    t, s0 = _tile_origin(pid - n * tiles_per_n, n_sb, BLOCK_S)
    cc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    ss = s0 + tl.arange(0, BLOCK_S)
    cmask = cc < C
    mask = cmask[:, None] & (ss < S)[None, :]
    g = cc // cpg
    n64 = n.to(tl.int64)
    mu = (tl.load(mean_ptr + n64 * smn + g * smg, mask=cmask, other=0.0)
          - _channel_vec(sh_ptr + n64 * C, cc, cmask, 1, HAS_SHIFT, BLOCK_C))[:, None]  # x + shift - mean
    r = tl.load(rstd_ptr + n64 * srn + g * srg, mask=cmask, other=0.0)[:, None]
    if HAS_W:
        w = tl.load(w_ptr + cc * sw, mask=cmask, other=0.0).to(tl.float32)[:, None]
    dz = tl.load(dy_ptr + tile_offsets(n, t, cc, ss, sdn, sdt, sdc, sds), mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + tile_offsets(n, t, cc, ss, sxn, sxt, sxc, sxs), mask=mask, other=0.0).to(tl.float32)
    _wait_for_previous(PDL)  # for the group coefficients
    coef = coef_ptr + (n64 * G + g) * 2
    c1 = tl.load(coef, mask=cmask, other=0.0)[:, None]
    c2 = tl.load(coef + 1, mask=cmask, other=0.0)[:, None]
    xhat = (x - mu) * r
    if SILU:
        z = xhat
        if HAS_W:
            z = z * w
        if HAS_B:
            z = z + tl.load(b_ptr + cc * sb_, mask=cmask, other=0.0).to(tl.float32)[:, None]
        sig, one_minus_sig = _sigmoid_parts(z, PRECISE)
        dz = dz * (sig * (1.0 + z * one_minus_sig))
    if HAS_W:  # the select keeps dz * w rounded, as c1 summed it: fused into an FMA with "- c1" below, a
        # one-element group's dx would be the product's rounding error times 1/sqrt(eps), not 0
        dz = tl.where(mask, dz * w, 0.0)
    dx = r * (dz - c1 - xhat * c2)
    tl.store(dx_ptr + tile_offsets(n, t, cc, ss, son, sot, soc, sos), store_cast(dx, dx_ptr.dtype.element_ty),
             mask=mask)


def _check_views(*views):
    shape = tuple(views[0].shape)
    assert len(shape) == 4, shape
    for v in views:
        assert tuple(v.shape) == shape, (tuple(v.shape), shape)


def gn_fwd(x, weight, bias, shift, y, mean, rstd, num_groups: int, eps: float, silu: bool) -> None:
    """y = GroupNorm(x + shift) (then SiLU); x, y: (N, C, T, S) views with any strides; shift: None or
    contiguous fp32 (N, C); mean/rstd: (N, G) fp32."""
    _check_views(x, y)
    if CLUSTER_FORWARD and x.is_cuda and not INTERPRETED:
        from hbkernels.cuda.group_norm import try_gn_fwd

        if try_gn_fwd(x, weight, bias, shift, y, mean, rstd, num_groups, eps, silu, CLUSTER_BLOCKS,
                      CLUSTER_COOPERATIVE, CLUSTER_STAGES if CLUSTER_COOPERATIVE else 1):
            return
    n, c, t, s = x.shape
    cpg = c // num_groups
    w, sw = _vec_or_dummy(weight, mean)
    b, sb_ = _vec_or_dummy(bias, mean)
    sh = shift if shift is not None else mean
    ms = (mean.stride(0), mean.stride(1), rstd.stride(0), rstd.stride(1))
    dev = x.device
    pdl = _pdl(dev)

    # 1. per-channel partial (mean, M2) over chunks of the (t, s) plane: only x's strides to merge
    t3, s3, (xs3,) = merge_ts([strides4(x)], t, s)
    bc3, bs3 = tile_shape(c, s3, (xs3,), _STATS_TILE_CHANNELS_LAST if xs3[1] == 1 else _STATS_TILE,
                          _STATS_CHANNELS_NCHW)
    bs3 = _even_block(s3, bs3)
    n_sb3 = cdiv(s3, bs3)
    n_cb3 = cdiv(c, bc3)
    per, n_chunks = _chunking(n, n_cb3, t3 * n_sb3, dev)
    pmean = empty((n, c, n_chunks), dtype=torch.float32, device=dev)  # NaN when poisoning, like outputs
    pm2 = empty((n, c, n_chunks), dtype=torch.float32, device=dev)
    grid, cb_first = _grid2(n * n_chunks, n_cb3, xs3[1] == 1)
    _gn_stats_kernel[grid](
        x, pmean, pm2,
        c, t3, s3, n_sb3, t3 * n_sb3, per, n_chunks, *xs3,
        EVEN_S=s3 % bs3 == 0, BLOCK_C=bc3, BLOCK_S=bs3, STAGES=STATS_STAGES, PDL=pdl, num_warps=warps_for(bc3 * bs3),
        CB_FIRST=cb_first,
    )

    # 2. per-group mean and rstd; the merge needs the partials' chunks, the statistics tiling that
    # counts each one's elements, the group's element count and eps
    final_block = min(next_pow2(cpg * n_chunks), _FINAL_BLOCK)
    _gn_finalize_kernel[(n * num_groups,)](
        pmean, pm2, sh, mean, rstd, num_groups, cpg, n_chunks, per, t3 * n_sb3, n_sb3, s3, float(cpg * t * s),
        float(eps), *ms,
        HAS_SHIFT=shift is not None, BLOCK_S=bs3, BLOCK=final_block, PDL=pdl, num_warps=warps_for(final_block),
        **_launch_after(pdl),
    )

    # 3. y (reads x, writes y)
    t2, s2, (xs, ys) = merge_ts([strides4(x), strides4(y)], t, s)
    block_c, block_s = tile_shape(c, s2, (xs, ys), _APPLY_TILE_CHANNELS_LAST if xs[1] == 1 else _APPLY_TILE,
                                  _APPLY_CHANNELS_NCHW)
    n_sb = cdiv(s2, block_s)
    grid, cb_first = _grid2(n * t2 * n_sb, cdiv(c, block_c), xs[1] == 1)
    _gn_apply_kernel[grid](
        x, w, b, sh, y, mean, rstd,
        c, t2, s2, n_sb, cpg, sw, sb_, *ms, *xs, *ys,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_SHIFT=shift is not None, SILU=bool(silu),
        PRECISE=x.dtype == torch.float32,
        BLOCK_C=block_c, BLOCK_S=block_s, REVERSE=APPLY_REVERSED, EVICT_FIRST=APPLY_EVICT_FIRST, PDL=pdl,
        CB_FIRST=cb_first, num_warps=warps_for(block_c * block_s), **_launch_after(pdl),
    )


def _rows(views, t: int, s: int):
    """(row length, each view's merged strides) where every channel's (t, s) plane of these (N, C, T, S)
    views is one contiguous row (NCHW), else None."""
    t1, length, strides = merge_ts([strides4(v) for v in views], t, s)
    if t1 != 1 or any(st[3] != 1 for st in strides):
        return None
    return length, strides


def _one_pass_plan(views, t: int, s: int, cpg: int, device: torch.device):
    """(tile, row length, each view's merged strides) of the one-pass backward for these (N, C, T, S)
    views, or None where it does not apply."""
    rows = _rows(views, t, s)
    if rows is None:
        return None
    length, strides = rows
    limit = _INTERP_GROUP_PROGRAMS if INTERPRETED else sm_count(device)
    tile = min(_ONE_PASS_MIN_TILE, next_pow2(length))
    while cpg * cdiv(length, tile) > limit:
        tile *= 2
        if tile > _ONE_PASS_MAX_TILE[views[0].element_size()]:
            return None
    return tile, length, strides


def _launch_one_pass(tensors, c: int, num_groups: int, plan, strides, **meta):
    """Runs _gn_one_pass_bwd_kernel over (N, C, T, S) ``tensors`` (its leading pointer arguments) and
    returns its two partial-sum buffers as (N, C, chunks): one value per tile, in channel order.
    ``strides``: the kernel's scalar arguments after (C, L, G, cpg, n_chunks)."""
    tile, length, _ = plan
    n, cpg = tensors[0].shape[0], c // num_groups
    n_chunks = cdiv(length, tile)
    dev = tensors[0].device
    partials = [empty((n, c, n_chunks), dtype=torch.float32, device=dev) for _ in range(2)]
    sync = torch.zeros(1 + n * num_groups, dtype=torch.int32, device=dev)  # ticket, arrivals
    # The interpreter runs programs one after another, so a waiting program would wait forever: there
    # the grid runs twice, first only publishing the partials (WAIT=False), then, with the tickets
    # handed out again, to merge and use them.
    for wait in (False, True) if INTERPRETED else (True,):
        if INTERPRETED:
            sync[0] = 0
        _gn_one_pass_bwd_kernel[(partials[0].numel(),)](
            *tensors, *partials, sync, c, length, num_groups, cpg, n_chunks, *strides,
            TILE=tile, BLOCK_P=next_pow2(cpg * n_chunks), WAIT=wait, num_warps=warps_for(tile), **meta,
        )
    return partials


def _channel_sums(pa, pb, dweight, dbias) -> None:
    """dweight = sum dz * xhat, dbias = sum dz over n and the (t, s) plane, from (N, C, chunks) partials."""
    if dweight is not None:
        torch.sum(pa, dim=(0, 2), out=dweight)
    if dbias is not None:
        torch.sum(pb, dim=(0, 2), out=dbias)


def gn_bwd(dy, x, weight, bias, shift, mean, rstd, dx, dweight, dbias, num_groups: int, silu: bool) -> None:
    """dx (and dweight/dbias when given, fp32 (C,)) of y = GroupNorm(x + shift) (then SiLU)."""
    _check_views(dy, x, dx)
    if CLUSTER_BACKWARD and x.is_cuda and not INTERPRETED:
        from hbkernels.cuda.group_norm import try_gn_bwd

        if try_gn_bwd(dy, x, weight, bias, shift, mean, rstd, dx, dweight, dbias, num_groups, silu, CLUSTER_BLOCKS):
            return
    n, c, t, s = x.shape
    cpg = c // num_groups
    w, sw = _vec_or_dummy(weight, mean)
    b, sb_ = _vec_or_dummy(bias, mean)
    has_w, has_b, has_sh, silu = weight is not None, bias is not None, shift is not None, bool(silu)
    sh = shift if has_sh else mean
    precise = x.dtype == torch.float32
    ms = (mean.stride(0), mean.stride(1), rstd.stride(0), rstd.stride(1))
    dev = x.device
    if ONE_PASS:
        plan = _one_pass_plan([dy, x, dx], t, s, cpg, dev)
        if plan is not None:
            ds, xs, os_ = plan[2]
            pa, pb = _launch_one_pass((dy, x, w, b, sh, mean, rstd, dx), c, num_groups,
                                      plan, (sw, sb_, *ms, ds[0], ds[1], xs[0], xs[1], os_[0], os_[1]),
                                      HAS_W=has_w, HAS_B=has_b, HAS_SHIFT=has_sh, SILU=silu, PRECISE=precise)
            _channel_sums(pa, pb, dweight, dbias)  # the one-pass partials are per (n, channel, chunk) too
            return
    pdl = _pdl(dev)

    # 1. per-channel partial sums over chunks of the (t, s) plane (reads dy and x)
    t2, s2, (ds2, xs2) = merge_ts([strides4(dy), strides4(x)], t, s)
    bc2, bs2 = tile_shape(c, s2, (ds2, xs2), _STATS_TILE, _BWD_CHANNELS_NCHW)
    bs2 = _even_block(s2, bs2)
    n_sb2 = cdiv(s2, bs2)
    n_cb2 = cdiv(c, bc2)
    per, n_chunks = _chunking(n, n_cb2, t2 * n_sb2, dev)
    pa = empty((n, c, n_chunks), dtype=torch.float32, device=dev)
    pb = empty((n, c, n_chunks), dtype=torch.float32, device=dev)
    grid, cb_first = _grid2(n * n_chunks, n_cb2, False)  # as the forward's: C / 4 can pass grid axis 1
    _gn_bwd_partials_kernel[grid](
        dy, x, w, b, sh, mean, rstd, pa, pb,
        c, t2, s2, n_sb2, t2 * n_sb2, per, n_chunks, cpg, sw, sb_, *ms, *ds2, *xs2,
        HAS_W=has_w, HAS_B=has_b, HAS_SHIFT=has_sh, SILU=silu, PRECISE=precise,
        EVEN_S=s2 % bs2 == 0, BLOCK_C=bc2, BLOCK_S=bs2, STAGES=STATS_STAGES, PDL=pdl, num_warps=warps_for(bc2 * bs2),
        CB_FIRST=cb_first,
    )

    # 2. per-group coefficients
    coef = empty((n * num_groups, 2), dtype=torch.float32, device=dev)
    block = min(next_pow2(cpg * n_chunks), _FINAL_BLOCK)
    _gn_bwd_finalize_kernel[(n * num_groups,)](
        pa, pb, w, coef, num_groups, cpg, n_chunks, float(cpg * t * s), sw,
        HAS_W=has_w, BLOCK=block, PDL=pdl, num_warps=warps_for(block), **_launch_after(pdl),
    )

    # 3. dx (reads dy and x, writes dx)
    t3, s3, (ds3, xs3, os3) = merge_ts([strides4(dy), strides4(x), strides4(dx)], t, s)
    bc3, bs3 = tile_shape(c, s3, (ds3, xs3, os3), None, _BWD_APPLY_CHANNELS_NCHW)
    n_sb3 = cdiv(s3, bs3)
    grid, cb_first = _grid2(n * t3 * n_sb3, cdiv(c, bc3), False)
    _gn_bwd_apply_kernel[grid](
        dy, x, w, b, sh, mean, rstd, coef, dx,
        c, t3, s3, n_sb3, num_groups, cpg, sw, sb_, *ms, *ds3, *xs3, *os3,
        HAS_W=has_w, HAS_B=has_b, HAS_SHIFT=has_sh, SILU=silu, PRECISE=precise,
        BLOCK_C=bc3, BLOCK_S=bs3, PDL=pdl, CB_FIRST=cb_first, num_warps=warps_for(bc3 * bs3), **_launch_after(pdl),
    )

    _channel_sums(pa, pb, dweight, dbias)  # tiny (N, C, chunks) reductions
