"""GEGLU forward/backward: out = h * gelu(g) with (h, g) the two halves of each row, exact erf GELU.

Forward reads the 2F inputs of a row once and writes F outputs; backward reads dy and x once and writes
dx once. Tiles are [BLOCK_M rows, BLOCK_F columns]; rows (which may number millions) are grid axis 0.
Math is in fp32 whatever the storage dtype.
"""
import triton
import triton.language as tl

from hbkernels.triton.layout import cdiv, next_pow2, pick_block, store_cast, warps_for

_TILE = 4096  # output elements per program



@triton.jit
def _geglu_fwd_kernel(x_ptr, out_ptr, M, F, sxm, som, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    rr = tl.arange(0, BLOCK_M).to(tl.int64)  # times a row stride: past 2^31 for a strided dy
    ff = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rr < M - row0)[:, None] & (ff < F)[None, :]
    xp = x_ptr + row0 * sxm + rr[:, None] * sxm + ff[None, :]
    h = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(xp + F, mask=mask, other=0.0).to(tl.float32)
    out = h * (0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)))
    out_ptrs = out_ptr + row0 * som + rr[:, None] * som + ff[None, :]
    tl.store(out_ptrs, store_cast(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(dy_ptr, x_ptr, dx_ptr, M, F, sdm, sxm, sdxm,
                      BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    rr = tl.arange(0, BLOCK_M).to(tl.int64)  # times a row stride: past 2^31 for a strided dy
    ff = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rr < M - row0)[:, None] & (ff < F)[None, :]
    dy = tl.load(dy_ptr + row0 * sdm + rr[:, None] * sdm + ff[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = x_ptr + row0 * sxm + rr[:, None] * sxm + ff[None, :]
    h = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(xp + F, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))  # Phi(g)
    pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327  # phi(g)
    dh = dy * (g * cdf)
    dg = dy * h * (cdf + g * pdf)
    dxp = dx_ptr + row0 * sdxm + rr[:, None] * sdxm + ff[None, :]
    ty = dx_ptr.dtype.element_ty
    tl.store(dxp, store_cast(dh, ty), mask=mask)
    tl.store(dxp + F, store_cast(dg, ty), mask=mask)


def _tiles(m: int, f: int):
    block_f = pick_block(f, 1024)
    block_m = min(max(1, _TILE // block_f), next_pow2(m))
    return block_m, block_f


def geglu_fwd(x, out) -> None:
    """x (M, 2F), out (M, F), both with unit column stride: out = x[:, :F] * gelu(x[:, F:])."""
    m, f = out.shape
    assert tuple(x.shape) == (m, 2 * f) and x.stride(1) == 1 and out.stride(1) == 1, (x.shape, out.shape)
    block_m, block_f = _tiles(m, f)
    grid = (cdiv(m, block_m), cdiv(f, block_f))
    _geglu_fwd_kernel[grid](x, out, m, f, x.stride(0), out.stride(0),
                            BLOCK_M=block_m, BLOCK_F=block_f, num_warps=warps_for(block_m * block_f))


def geglu_bwd(dy, x, dx) -> None:
    """dy (M, F), x and dx (M, 2F): dx[:, :F] = dy * gelu(g), dx[:, F:] = dy * h * gelu'(g)."""
    m, f = dy.shape
    assert tuple(x.shape) == (m, 2 * f) and tuple(dx.shape) == (m, 2 * f), (dy.shape, x.shape, dx.shape)
    assert dy.stride(1) == 1 and x.stride(1) == 1 and dx.stride(1) == 1
    block_m, block_f = _tiles(m, f)
    grid = (cdiv(m, block_m), cdiv(f, block_f))
    _geglu_bwd_kernel[grid](dy, x, dx, m, f, dy.stride(0), x.stride(0), dx.stride(0),
                            BLOCK_M=block_m, BLOCK_F=block_f, num_warps=warps_for(block_m * block_f))
