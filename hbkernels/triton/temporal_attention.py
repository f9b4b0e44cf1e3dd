"""Flash-style temporal attention over (N, T, H, D) views (Triton).

Memory traffic: the kernels index q/k/v/do with their own strides, so the (N, T, H, D) -> (N*H, T, D)
permute copies that diffusers makes for q, k, v (and back for the output) never happen: each input
byte is read once per program that needs it and each output byte is written once. Softmax rows are
never stored: the forward keeps the row max and sum (8 bytes per query row), the backward recomputes P
from them and computes delta_i = sum_d do_id * out_id inline instead of a separate preprocessing pass (when all
keys fit one block, delta_i = sum_j P_ij dP_ij from the tile instead, so out is not read at all).

Grid: axis 0 = N*H (limit 2^31-1, so N*H >= 65,536 works), axis 1 = T blocks (small).
Forward: one program per (n*h, query block), online softmax over key blocks (one iteration for
T <= BLOCK_N). Backward: one program per (n*h, key block) accumulates dk/dv over query blocks; when
T fits in one key block (the common video case; in fp32 only for D <= 64) that program also writes
dq, so the whole backward is one kernel reading q, k, v, do once. Otherwise a second kernel per
(n*h, query block) makes dq.
Scores are kept in the log2 domain (qk_scale = scale * log2(e)) so the kernels use exp2. The backward
recomputes P = exp2(s - m) / l from the max and sum the forward normalised with, rather than
exp2(s - lse): an fp32 lse = m + log2(l) would add the rounding of its magnitude to every P.
Row normalisers 1/l are tl.div_rn (a GPU's default fp32 '/' is approximate, 2 ulps, which fp32 tests
see), taken once per row: a round-to-nearest division per output element cost 8% of the fp16 forward.
"""

import torch
import triton
import triton.language as tl

from hbkernels.triton.layout import INTERPRETED, cdiv, next_pow2, store_cast

LOG2E = 1.4426950408889634
ATTN_ROW_STATS = 2  # per query row: the max score m (log2 units) and the sum l of exp2(s - m)


@triton.jit
def _rows(ptr, offs_t, stride_t, offs_d, T, D, UPCAST: tl.constexpr):
    """Load a (len(offs_t), BLOCK_D) tile of rows t of one (n, h) slice; zero outside T x D."""
    mask = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    x = tl.load(ptr + offs_t.to(tl.int64)[:, None] * stride_t + offs_d[None, :], mask=mask, other=0.0)
    return x.to(tl.float32) if UPCAST else x


@triton.jit
def _store_rows(ptr, x, offs_t, stride_t, offs_d, T, D):
    mask = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    ptrs = ptr + offs_t.to(tl.int64)[:, None] * stride_t + offs_d[None, :]
    tl.store(ptrs, store_cast(x, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_stats(STATS, offs_m, T):
    """(m, 1/l) of the forward's softmax rows offs_m (padded rows: m = 0, l = 1)."""
    m = tl.load(STATS + offs_m * 2, mask=offs_m < T, other=0.0)
    inv_l = tl.div_rn(1.0, tl.load(STATS + offs_m * 2 + 1, mask=offs_m < T, other=1.0))
    return m, inv_l


@triton.jit
def _probs(q, k, m, inv_l, offs_m, offs_n, T, qk_scale, CAUSAL: tl.constexpr):
    """P = exp2(S - m) / l for a (query block, key block) tile; exactly 0 where masked or padded."""
    valid = (offs_m < T)[:, None] & (offs_n < T)[None, :]
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    # the select keeps S rounded as the forward rounded it: fused into an FMA with -m (the compiler's
    # default), the row max's own exponent is that rounding, ~2^12 at scores ~1e11, and exp2 overflows
    s = tl.where(valid, tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale, float("-inf"))
    # S - m <= 0 but where this tile's dot rounds above the forward's (its tiles may take other MMA
    # instructions): an ulp of S, past 128 at scores ~1e9, must not overflow exp2. NaN stays NaN
    shifted = tl.minimum(s - m[:, None], 0.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.where(valid, tl.exp2(shifted) * inv_l[:, None], 0.0)


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, STATS, H, T, D, qk_scale,
                     sq_n, sq_t, sq_h, sk_n, sk_t, sk_h, sv_n, sv_t, sv_h, so_n, so_t, so_h,
                     CAUSAL: tl.constexpr, UPCAST: tl.constexpr, STORE_STATS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    n, h = bh // H, bh % H
    start_m = tl.program_id(1) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    Q += n * sq_n + h * sq_h
    K += n * sk_n + h * sk_h
    V += n * sv_n + h * sv_h

    q = _rows(Q, offs_m, sq_t, offs_d, T, D, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(T, start_m + BLOCK_M) if CAUSAL else T
    # m_i stays -inf while every score a row has seen is -inf (a -inf key, or masked): the exponents
    # then subtract 0, not m_i, since -inf - -inf would be NaN for the rest of the row.
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _rows(K, offs_n, sk_t, offs_d, T, D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        valid = (offs_n < T)[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _rows(V, offs_n, sv_t, offs_d, T, D, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    _store_rows(O + n * so_n + h * so_h, acc * tl.div_rn(1.0, l_i)[:, None], offs_m, so_t, offs_d, T, D)
    if STORE_STATS:  # only a backward reads them (8 bytes per row: 1.5% of the traffic at fp16, D = 64)
        # (for T = 1 the backward's exp2(s - m) / l is 1 exactly, so dq = dk = 0 exactly, as in PyTorch)
        rows = STATS + (bh * T + offs_m) * 2
        tl.store(rows, m_i, mask=offs_m < T)
        tl.store(rows + 1, l_i, mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, O, DO, STATS, DQ, DK, DV, H, T, D, scale, qk_scale,
                          sq_n, sq_t, sq_h, sk_n, sk_t, sk_h, sv_n, sv_t, sv_h, so_n, so_t, so_h,
                          sdo_n, sdo_t, sdo_h, sg_n, sg_t, sg_h,
                          CAUSAL: tl.constexpr, UPCAST: tl.constexpr, FUSE_DQ: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dk, dv for one key block, looping over query blocks (dq too when there is one key block)."""
    bh = tl.program_id(0).to(tl.int64)
    n, h = bh // H, bh % H
    start_n = tl.program_id(1) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    Q += n * sq_n + h * sq_h
    O += n * so_n + h * so_h
    DO += n * sdo_n + h * sdo_h
    STATS += bh * T * 2
    g_off = n * sg_n + h * sg_h  # dq, dk, dv are contiguous (N, T, H, D): shared strides

    k = _rows(K + n * sk_n + h * sk_h, offs_n, sk_t, offs_d, T, D, UPCAST)
    v = _rows(V + n * sv_n + h * sv_h, offs_n, sv_t, offs_d, T, D, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0  # earlier queries never see these keys
    for start_m in range(lo, T, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _rows(Q, offs_m, sq_t, offs_d, T, D, UPCAST)
        do = _rows(DO, offs_m, sdo_t, offs_d, T, D, UPCAST)
        m, inv_l = _row_stats(STATS, offs_m, T)
        p = _probs(q, k, m, inv_l, offs_m, offs_n, T, qk_scale, CAUSAL)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        if FUSE_DQ:  # this tile holds every key: delta_i = sum_j P_ij dP_ij, out is never read
            delta = tl.sum(p * dp, 1)
        else:
            o = _rows(O, offs_m, so_t, offs_d, T, D, UPCAST)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee")
        if FUSE_DQ:
            dq = tl.dot(ds.to(k.dtype), k, input_precision="ieee") * scale
            _store_rows(DQ + g_off, dq, offs_m, sg_t, offs_d, T, D)

    _store_rows(DK + g_off, dk * scale, offs_n, sg_t, offs_d, T, D)
    _store_rows(DV + g_off, dv, offs_n, sg_t, offs_d, T, D)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, O, DO, STATS, DQ, H, T, D, scale, qk_scale,
                        sq_n, sq_t, sq_h, sk_n, sk_t, sk_h, sv_n, sv_t, sv_h, so_n, so_t, so_h,
                        sdo_n, sdo_t, sdo_h, sg_n, sg_t, sg_h,
                        CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dq for one query block, looping over key blocks (only used when T > BLOCK_N)."""
    bh = tl.program_id(0).to(tl.int64)
    n, h = bh // H, bh % H
    start_m = tl.program_id(1) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    K += n * sk_n + h * sk_h
    V += n * sv_n + h * sv_h

    q = _rows(Q + n * sq_n + h * sq_h, offs_m, sq_t, offs_d, T, D, UPCAST)
    do = _rows(DO + n * sdo_n + h * sdo_h, offs_m, sdo_t, offs_d, T, D, UPCAST)
    o = _rows(O + n * so_n + h * so_h, offs_m, so_t, offs_d, T, D, UPCAST)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    m, inv_l = _row_stats(STATS + bh * T * 2, offs_m, T)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(T, start_m + BLOCK_M) if CAUSAL else T
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _rows(K, offs_n, sk_t, offs_d, T, D, UPCAST)
        v = _rows(V, offs_n, sv_t, offs_d, T, D, UPCAST)
        p = _probs(q, k, m, inv_l, offs_m, offs_n, T, qk_scale, CAUSAL)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    _store_rows(DQ + n * sg_n + h * sg_h, dq * scale, offs_m, sg_t, offs_d, T, D)


# Warps per program of the forward / backward kernels; None: the rules in _config.
# `python -m bench.sweep` times the choices.
FWD_WARPS = None
BWD_WARPS = None


def _config(t: int, d: int, elem_size: int, bwd: bool):
    """Block sizes from T and D, checked with ptxas for sm_90 (D up to 256: at most 80 KiB shared
    memory, no register spills in fp16/bf16, a few hundred bytes at worst in fp32).

    fp16/bf16: BLOCK_M = BLOCK_N = min(64, next_pow2(T)) (>= 16 for tl.dot), halved while a tile has
    more than 8192 (fwd) / 4096 (bwd: five dots, two accumulators) elements. Warps (a power of two):
    forward, one per 3072 elements of its fp32 accumulator and score tiles together (96 per thread);
    backward, one per 1024 accumulator elements (two accumulators and five dots' operands; per 512 for
    heads wider than 64, which spill otherwise), and at least one per 1024 score-tile elements.
    Counting the accumulators alone left 64-row tiles of heads up to 64 wide at 1-2 warps, 255
    registers and 16-152 bytes of spills (sm_90); those tiles' warp counts are not timed yet.
    Timed on an H100 at D = 64 (bench/results/sweep-*.md), where this is 1 / 1 warps at T = 16 and
    1 / 2 at T = 26: 62 us against 67 (2 warps) forward, 128 us against 193 (4 warps) backward at
    T = 26; no other count was faster at T = 16. Fewer warps keep a softmax row's max and sum within a
    warp (no shared-memory round trips) and fit more programs per SM.
    fp32 runs its "ieee" dots on FMA units, whose operands take many more registers: 16-row tiles
    without pipelining."""
    block_d = max(16, next_pow2(d))
    if elem_size == 4:
        return 16, block_d, dict(num_warps=8 if block_d >= 64 else 4, num_stages=1)
    block = min(64, max(16, next_pow2(t)))
    while block > 16 and block * block_d > (4096 if bwd else 8192):
        block //= 2
    if bwd:
        per_d = block * block_d // (1024 if block_d <= 64 else 512)
        num_warps = BWD_WARPS or min(8, max(1, per_d, next_pow2(cdiv(block * block, 1024))))
    else:
        num_warps = FWD_WARPS or min(8, next_pow2(cdiv(block * (block + block_d), 3072)))
    return block, block_d, dict(num_warps=num_warps, num_stages=2)


def _strides(x):
    assert x.stride(-1) == 1, "last dim must be contiguous"
    return x.stride(0), x.stride(1), x.stride(2)


def attn_fwd(q, k, v, out, stats, scale: float, causal: bool) -> None:
    """Writes out, and stats (N, H, T, ATTN_ROW_STATS) float32, the backward's input, unless None."""
    n, t, h, d = q.shape
    assert stats is None or (stats.is_contiguous() and stats.shape == (n, h, t, ATTN_ROW_STATS)
                             and stats.dtype == torch.float32)
    block, block_d, opts = _config(t, d, q.element_size(), bwd=False)
    grid = (n * h, cdiv(t, block))
    _attn_fwd_kernel[grid](
        q, k, v, out, out if stats is None else stats, h, t, d, scale * LOG2E,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        CAUSAL=bool(causal), UPCAST=INTERPRETED, STORE_STATS=stats is not None,
        BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, **opts)


def attn_bwd(do, q, k, v, out, stats, dq, dk, dv, scale: float, causal: bool) -> None:
    n, t, h, d = q.shape
    assert stats is not None, "the forward kept no row statistics: it ran with no input requiring grad"
    assert dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous()
    block, block_d, opts = _config(t, d, q.element_size(), bwd=True)
    fuse_dq = t <= block and (q.element_size() < 4 or block_d <= 64)  # a 5th FMA dot spills in fp32
    common = (h, t, d, scale, scale * LOG2E,
              *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(do), *_strides(dq))
    meta = dict(CAUSAL=bool(causal), UPCAST=INTERPRETED,
                BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, **opts)
    _attn_bwd_dkdv_kernel[(n * h, cdiv(t, block))](
        q, k, v, out, do, stats, dq, dk, dv, *common, FUSE_DQ=fuse_dq, **meta)
    if not fuse_dq:
        _attn_bwd_dq_kernel[(n * h, cdiv(t, block))](
            q, k, v, out, do, stats, dq, *common, **meta)
