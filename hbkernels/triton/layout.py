"""Strided (N, C, T, S) copies: tokens <-> video layout changes with an optional fused residual add,
plus the tiling helpers that the GroupNorm kernels share.

Every tensor is addressed through its own (n, c, t, s) strides, so one kernel serves contiguous,
channels-last and token layouts. A [BLOCK_C, BLOCK_S] tile is loaded in a layout coalesced along
whichever of its axes has stride 1 in the source, and stored coalesced along the stride-1 axis of the
destination; Triton converts between the two register layouts through shared memory, which is what
makes the tokens -> video transpose run at copy bandwidth. Fusing the residual add reads each input
once and writes once: 3 passes over the activation where a permute-copy (read, write) and then the
add (two reads, a write) make 5.
"""
import functools

import torch
import triton
import triton.language as tl

from hbkernels.backend import interpreting

# Fixed at import, like triton.jit itself: whether kernels run in Triton's CPU interpreter (launch
# plans and bf16 handling differ there), not on a GPU.
INTERPRETED = interpreting()
_ROUND_BF16_BY_HAND = tl.constexpr(INTERPRETED)


@triton.jit
def store_cast(x, dtype: tl.constexpr):
    """fp32 ``x`` converted to ``dtype`` for a store, rounded to nearest even as GPUs convert. The
    interpreter truncates fp32 -> bf16, which doubled bf16 outputs' rounding error on CPU; the bits are
    rounded by hand there (a no-op on a GPU, where the branch is compiled out)."""
    if _ROUND_BF16_BY_HAND and dtype == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)


# Elements per [BLOCK_C, BLOCK_S] tile. 4096 keeps 16 elements per thread at 8 warps on a GPU;
# under the interpreter a program is a batch of numpy ops, so any size is fine there.
_TILE = 4096
_NUM_WARPS = 8


# Host-side arithmetic in plain Python: triton.cdiv / next_power_of_2 are constexpr functions whose
# host calls cost microseconds each, and launch planning runs on every op call.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def merge_ts(strides, t: int, s: int):
    """Collapse (T, S) into one axis when every tensor allows it (T == 1, S == 1, or
    stride_t == S * stride_s), so that tiles run along T*S without per-element index division.

    ``strides``: list of (sn, sc, st, ss). Returns (T', S', ((sn, sc, st', ss'), ...))."""
    if t == 1:
        return 1, s, tuple((sn, sc, 0, ss) for sn, sc, _, ss in strides)
    if s == 1:
        return 1, t, tuple((sn, sc, 0, st) for sn, sc, st, _ in strides)
    if all(st == s * ss for _, _, st, ss in strides):
        return 1, t * s, tuple((sn, sc, 0, ss) for sn, sc, _, ss in strides)
    return t, s, tuple(strides)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors (compute units on ROCm) of a GPU: grids sized in whole waves."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=4096)
def pick_block(n: int, hi: int, lo: int = 16) -> int:
    """A power-of-two block in [lo, hi] for an axis of length n: the largest that wastes at most
    1/8 of the lanes on the ragged last block, else the least wasteful."""
    hi = max(1, min(hi, next_pow2(n)))
    lo = max(1, min(lo, hi))
    best, best_waste = hi, None
    b = hi
    while b >= lo:
        waste = (cdiv(n, b) * b - n) / n
        if waste <= 0.125:
            return b
        if best_waste is None or waste < best_waste:
            best, best_waste = b, waste
        b //= 2
    return best


@functools.lru_cache(maxsize=4096)
def tile_shape(c: int, s: int, strides: tuple, tile: int | None = None, narrow: int = 16):
    """[BLOCK_C, BLOCK_S] for (C, S) tensors with the given (sn, sc, st, ss) strides: wide in C
    (64 channels = 128 bytes of fp16) when some tensor has unit channel stride, so that its accesses
    are full cache lines; otherwise long in S, ``narrow`` channels (a power of two <= 16) where a row
    fills the tile, more (up to 16) where rows are shorter, so the tile keeps its size."""
    tile = tile or _TILE
    c_unit = c > 1 and any(sc == 1 for _, sc, _, _ in strides)
    block_c = min(next_pow2(c), 64 if c_unit else max(narrow, min(16, tile // pick_block(s, tile))))
    block_s = pick_block(s, max(16, tile // block_c))
    return block_c, block_s


def warps_for(elems: int) -> int:
    """num_warps for a tile of ``elems`` elements: 8 for full 4096-element tiles, fewer for small ones."""
    return max(1, min(_NUM_WARPS, elems // 512))


def strides4(t: torch.Tensor):
    assert t.dim() == 4, t.shape
    return tuple(int(v) for v in t.stride())


@triton.jit
def tile_offsets(n, t, cc, ss, sn, st, sc, sp):
    """Element offsets of the [channels cc, positions ss] tile of sample n, frame t, with strides
    (sn, st, sc, sp); in int64: a sample's channel or position offsets can pass 2^31 elements, where
    int32 products would wrap."""
    return ((n.to(tl.int64) * sn + t.to(tl.int64) * st)
            + cc.to(tl.int64)[:, None] * sc + ss.to(tl.int64)[None, :] * sp)


@triton.jit
def _copy_add_kernel(
    src_ptr, res_ptr, bias_ptr, out_ptr,
    C, T, S, n_sb,
    s_sn, s_sc, s_st, s_ss,
    r_sn, r_sc, r_st, r_ss,
    o_sn, o_sc, o_st, o_ss,
    HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # axis 0: (n, t, s-block), unbounded; axis 1: channel block (C / BLOCK_C is far below 65535)
    pid = tl.program_id(0)
    nt = pid // n_sb
    sb = pid - nt * n_sb
    n = nt // T
    t = nt - n * T
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ss = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (cc < C)[:, None] & (ss < S)[None, :]
    src = src_ptr + tile_offsets(n, t, cc, ss, s_sn, s_st, s_sc, s_ss)
    val = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        res = res_ptr + tile_offsets(n, t, cc, ss, r_sn, r_st, r_sc, r_ss)
        val += tl.load(res, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:  # a per-channel vector (a convolution's bias)
        val += tl.load(bias_ptr + cc, mask=cc < C, other=0.0)[:, None]
    out = out_ptr + tile_offsets(n, t, cc, ss, o_sn, o_st, o_sc, o_ss)
    tl.store(out, store_cast(val, out_ptr.dtype.element_ty), mask=mask)


def copy_add(src, residual, bias, out) -> None:
    """out = src (+ residual) (+ bias per channel); src, residual, out: (N, C, T, S) views with arbitrary
    strides and one dtype; bias: None or contiguous fp32 (C,)."""
    n, c, t, s = out.shape
    assert tuple(src.shape) == (n, c, t, s), (src.shape, out.shape)
    views = [src, out] + ([residual] if residual is not None else [])
    for v in views:
        assert tuple(v.shape) == (n, c, t, s) and v.dtype == out.dtype, (v.shape, v.dtype)
    t2, s2, st = merge_ts([strides4(v) for v in views], t, s)
    block_c, block_s = tile_shape(c, s2, st)
    n_sb = cdiv(s2, block_s)
    res_strides = st[2] if residual is not None else (0, 0, 0, 0)
    grid = (n * t2 * n_sb, cdiv(c, block_c))
    _copy_add_kernel[grid](
        src, residual if residual is not None else src, bias if bias is not None else src, out,
        c, t2, s2, n_sb,
        *st[0], *res_strides, *st[1],
        HAS_RES=residual is not None, HAS_BIAS=bias is not None, BLOCK_C=block_c, BLOCK_S=block_s,
        num_warps=warps_for(block_c * block_s),
    )
