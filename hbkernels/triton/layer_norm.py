"""LayerNorm over the last dim of (M, C) rows, forward and backward.

The transformer blocks of video U-Nets normalise 10^4-10^5 short rows (C = 320-1280) per call;
PyTorch's CUDA kernel gives each row its own thread block, whose setup dominates at that length.
Here a program normalises [BLOCK_M, BLOCK_C] rows at once, a whole row per tile row (two passes over
registers for a stable variance), so the activation is read once and written once. With a residual,
the transformer block's ``x = f(x) + x`` add happens in the same pass (reads 2, writes 2 tensors
instead of reading 3 and writing 2 in an add and a norm).

Backward: programs walk ``rows_per_program`` rows each, writing dx and accumulating dweight / dbias
partials per program in registers; torch sums the (programs, C) partials (no atomics: deterministic).
"""
import torch
import triton
import triton.language as tl

from hbkernels.backend import empty, empty_like
from hbkernels.ops.layer_norm import TRITON_MAX_C
from hbkernels.triton.layout import INTERPRETED, cdiv, next_pow2, store_cast, warps_for

_TILE = 4096  # elements per forward tile
# Backward tiles are half that at 4 warps: its loop holds the next tile's dy and x besides this one's
# arithmetic, and at 122-150 registers 3-4 such programs fit an sm_90 SM (48-64 KiB of loads in
# flight; bench/results/compile-sm90.txt) where 2 of the 8-warp, one-tile-at-a-time version did (32 KiB).
_BWD_TILE = 2048
_BWD_PROGRAMS = 1024  # enough programs for an H100, few enough that the partials stay small
_INTERP_PROGRAMS = 3  # under TRITON_INTERPRET: each program is a batch of numpy ops


@triton.jit
def _ln_fwd_kernel(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, s_ptr, mean_ptr, rstd_ptr, M, C, sxm, srm, sym, ssm, eps,
                   HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cc = tl.arange(0, BLOCK_C)
    rmask = rows < M
    cmask = cc < C
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * sxm + cc[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:  # s = x + residual, rounded to the storage dtype as an unfused add would leave it
        r = tl.load(r_ptr + rows[:, None] * srm + cc[None, :], mask=mask, other=0.0).to(tl.float32)
        s = store_cast(x + r, s_ptr.dtype.element_ty)
        tl.store(s_ptr + rows[:, None] * ssm + cc[None, :], s, mask=mask)
        x = s.to(tl.float32)
    cf = tl.cast(C, tl.float32)  # C == 1 arrives as a constexpr int (JIT specialisation)
    mean = tl.div_rn(tl.sum(x, axis=1), cf)
    d = tl.where(mask, x - mean[:, None], 0.0)
    # the mean's own rounding, taken out (corrected two-pass): a constant row's deviations are then exactly
    # 0, and it normalises to the bias, not to its mean's rounding error times 1/sqrt(eps)
    corr = tl.div_rn(tl.sum(d, axis=1), cf)
    mean += corr
    d = tl.where(mask, d - corr[:, None], 0.0)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(tl.sum(d * d, axis=1), cf) + eps))
    y = d * rstd[:, None]
    if HAS_W:
        y *= tl.load(w_ptr + cc, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y += tl.load(b_ptr + cc, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * sym + cc[None, :], store_cast(y, y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _bwd_rows(dy_ptr, x_ptr, r0, last, cc, cmask, sdym, sxm, BLOCK_M: tl.constexpr):
    """dy and x of rows r0 .. r0 + BLOCK_M (zeros from row last on), as stored."""
    rows = r0 + tl.arange(0, BLOCK_M)
    mask = (rows < last)[:, None] & cmask[None, :]
    dy = tl.load(dy_ptr + rows[:, None] * sdym + cc[None, :], mask=mask, other=0.0)
    return dy, tl.load(x_ptr + rows[:, None] * sxm + cc[None, :], mask=mask, other=0.0)


@triton.jit
def _ln_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, pdw_ptr, pdb_ptr,
                   M, C, sdym, sxm, sdxm, rows_per_program,
                   HAS_W: tl.constexpr, PARTIALS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cc = tl.arange(0, BLOCK_C)
    cmask = cc < C
    cf = tl.cast(C, tl.float32)  # C == 1 arrives as a constexpr int (JIT specialisation)
    if HAS_W:
        w = tl.load(w_ptr + cc, mask=cmask, other=0.0).to(tl.float32)
    acc_dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_C], dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    # the next rows' dy and x are loaded (as stored) before this tile's arithmetic: two tiles in flight
    nxt_dy, nxt_x = _bwd_rows(dy_ptr, x_ptr, first, last, cc, cmask, sdym, sxm, BLOCK_M)
    for r0 in range(first, last, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < last
        mask = rmask[:, None] & cmask[None, :]
        dy = nxt_dy.to(tl.float32)
        x = nxt_x.to(tl.float32)
        nxt_dy, nxt_x = _bwd_rows(dy_ptr, x_ptr, r0 + BLOCK_M, last, cc, cmask, sdym, sxm, BLOCK_M)
        mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:  # the select keeps dy * w rounded: a GPU would fuse it into an FMA with "- c1" below,
            # which leaves dx the product's rounding error (times rstd) where it should cancel to 0 (C = 1)
            g = tl.where(mask, dy * w[None, :], 0.0)
        else:
            g = dy
        c1 = tl.div_rn(tl.sum(g, axis=1), cf)
        c2 = tl.div_rn(tl.sum(g * xhat, axis=1), cf)
        dx = rstd[:, None] * (g - c1[:, None] - xhat * c2[:, None])
        tl.store(dx_ptr + rows[:, None] * sdxm + cc[None, :], store_cast(dx, dx_ptr.dtype.element_ty), mask=mask)
        if PARTIALS:
            acc_dw += tl.sum(dy * xhat, axis=0)
            acc_db += tl.sum(dy, axis=0)
    if PARTIALS:
        tl.store(pdw_ptr + pid * C + cc, acc_dw, mask=cmask)
        tl.store(pdb_ptr + pid * C + cc, acc_db, mask=cmask)


def _tiles(m: int, c: int, tile: int = _TILE):
    block_c = next_pow2(c)
    return max(1, min(tile // block_c, next_pow2(m))), block_c


def ln_fwd(x, residual, weight, bias, y, s, mean, rstd, eps: float) -> None:
    """y = LayerNorm(x (+ residual)) over the last dim; x, residual, y, s (M, C) with unit column stride;
    s receives x + residual (given with residual); weight/bias None or (C,); writes mean/rstd (M,) fp32."""
    m, c = x.shape
    views = [x, y] + ([residual, s] if residual is not None else [])
    assert all(tuple(v.shape) == (m, c) and v.stride(1) == 1 for v in views) and c <= TRITON_MAX_C
    if m == 0:
        return
    block_m, block_c = _tiles(m, c)
    res, out_s = (residual, s) if residual is not None else (x, y)  # placeholders: never touched
    _ln_fwd_kernel[(cdiv(m, block_m),)](
        x, res, weight if weight is not None else mean, bias if bias is not None else mean, y, out_s, mean, rstd,
        m, c, x.stride(0), res.stride(0), y.stride(0), out_s.stride(0), float(eps),
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps_for(block_m * block_c),
    )


def ln_bwd(dy, x, weight, mean, rstd, dx, dweight, dbias) -> None:
    """dx (M, C) from dy and the forward's x, mean, rstd; dweight/dbias (C,) fp32, overwritten, where given."""
    m, c = x.shape
    assert tuple(dy.shape) == (m, c) and tuple(dx.shape) == (m, c), (dy.shape, x.shape, dx.shape)
    assert dy.stride(1) == 1 and x.stride(1) == 1 and dx.stride(1) == 1 and c <= TRITON_MAX_C
    partials = dweight is not None or dbias is not None
    if m == 0:
        for t in (dweight, dbias):
            if t is not None:
                t.zero_()
        return
    block_m, block_c = _tiles(m, c, _BWD_TILE)
    programs = min(cdiv(m, block_m), _INTERP_PROGRAMS if INTERPRETED else _BWD_PROGRAMS)
    rows_per_program = cdiv(cdiv(m, programs), block_m) * block_m  # whole tiles per program
    programs = cdiv(m, rows_per_program)
    pdw = empty((programs, c) if partials else (1,), dtype=torch.float32, device=x.device)  # NaN when poisoning
    pdb = empty_like(pdw)
    _ln_bwd_kernel[(programs,)](
        dy, x, weight if weight is not None else mean, mean, rstd, dx, pdw, pdb,
        m, c, dy.stride(0), x.stride(0), dx.stride(0), rows_per_program,
        HAS_W=weight is not None, PARTIALS=partials, BLOCK_M=block_m, BLOCK_C=block_c,
        num_warps=warps_for(block_m * block_c),
    )
    if dweight is not None:
        torch.sum(pdw, dim=0, out=dweight)
    if dbias is not None:
        torch.sum(pdb, dim=0, out=dbias)
