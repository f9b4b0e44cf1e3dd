"""C++/OpenMP CPU backend: thin wrappers over ``torch.ops.hbkernels.*`` (built from csrc/ into
``hbkernels._C``).

Every primitive writes into preallocated outputs (out-parameter style, like the Triton backend).
The ops are registered with mutation annotations and fake kernels, so ``torch.compile`` traces
them without graph breaks. Importing this module raises ImportError when the extension is not
built, which :func:`hbkernels.backend.cpp_available` turns into the reference-backend fallback.
"""
import torch

import hbkernels._C  # noqa: F401  (loads the library; registers torch.ops.hbkernels.*)

_ops = torch.ops.hbkernels

__all__ = ["ATTN_ROW_STATS", "attn_bwd", "attn_fwd", "copy_add", "geglu_bwd", "geglu_fwd", "gn_bwd", "gn_fwd",
           "ln_bwd", "ln_fwd"]


# ---------------------------------------------------------------- fake kernels (torch.compile)
# The ops only mutate their output arguments and return nothing, so the fake kernels have nothing to do.
@torch.library.register_fake("hbkernels::attn_fwd")
def _attn_fwd_fake(q, k, v, out, scale, causal):
    return None


@torch.library.register_fake("hbkernels::attn_bwd")
def _attn_bwd_fake(grad_out, q, k, v, dq, dk, dv, scale, causal):
    return None


@torch.library.register_fake("hbkernels::gn_fwd")
def _gn_fwd_fake(x, weight, bias, shift, y, mean, rstd, num_groups, eps, silu):
    return None


@torch.library.register_fake("hbkernels::gn_bwd")
def _gn_bwd_fake(dy, x, weight, bias, shift, mean, rstd, dx, dweight, dbias, num_groups, silu):
    return None


@torch.library.register_fake("hbkernels::copy_add")
def _copy_add_fake(src, residual, bias, out):
    return None


@torch.library.register_fake("hbkernels::geglu_fwd")
def _geglu_fwd_fake(x, out):
    return None


@torch.library.register_fake("hbkernels::geglu_bwd")
def _geglu_bwd_fake(dy, x, dx):
    return None


@torch.library.register_fake("hbkernels::ln_fwd")
def _ln_fwd_fake(x, residual, weight, bias, y, s, mean, rstd, eps):
    return None


@torch.library.register_fake("hbkernels::ln_bwd")
def _ln_bwd_fake(dy, x, weight, mean, rstd, dx, dweight, dbias):
    return None


# ---------------------------------------------------------------- primitives
# The backward recomputes each (short) softmax row whole, so it needs no statistics from the forward.
ATTN_ROW_STATS = 0


def attn_fwd(q, k, v, out, stats, scale: float, causal: bool) -> None:
    """q, k, v (N, T, H, D), stride(-1) == 1; writes out (N, T, H, D). ``stats`` is None (none kept)."""
    _ops.attn_fwd(q, k, v, out, float(scale), bool(causal))


def attn_bwd(do, q, k, v, out, stats, dq, dk, dv, scale: float, causal: bool) -> None:
    """Attention backward from q, k, v and dO alone (out and stats unused); writes dq, dk, dv."""
    _ops.attn_bwd(do, q, k, v, dq, dk, dv, float(scale), bool(causal))


def gn_fwd(x, weight, bias, shift, y, mean, rstd, num_groups: int, eps: float, silu: bool) -> None:
    """x, y: (N, C, T, S) views with any strides; shift: None or contiguous float32 (N, C) added to x
    before normalising; writes y and mean/rstd (N, G) float32 (statistics of x + shift)."""
    _ops.gn_fwd(x, weight, bias, shift, y, mean, rstd, int(num_groups), float(eps), bool(silu))


def gn_bwd(dy, x, weight, bias, shift, mean, rstd, dx, dweight, dbias, num_groups: int, silu: bool) -> None:
    """Writes dx (the gradient of x + shift), and dweight/dbias (C,) float32 where given (None skips them)."""
    _ops.gn_bwd(dy, x, weight, bias, shift, mean, rstd, dx, dweight, dbias, int(num_groups), bool(silu))


def copy_add(src, residual, bias, out) -> None:
    """out = src (+ residual) (+ bias, contiguous float32 (C,), per channel), all (N, C, T, S) views with any strides."""
    _ops.copy_add(src, residual, bias, out)


def geglu_fwd(x, out) -> None:
    """x (M, 2F) -> out (M, F) = x[:, :F] * gelu(x[:, F:])."""
    _ops.geglu_fwd(x, out)


def geglu_bwd(dy, x, dx) -> None:
    """dx (M, 2F) from dy (M, F) and x."""
    _ops.geglu_bwd(dy, x, dx)


def ln_fwd(x, residual, weight, bias, y, s, mean, rstd, eps: float) -> None:
    """LayerNorm over the last dim of x (+ residual, whose sum goes to s), all (M, C) with stride(-1) == 1;
    writes y and mean/rstd (M,) float32."""
    _ops.ln_fwd(x, residual, weight, bias, y, s, mean, rstd, float(eps))


def ln_bwd(dy, x, weight, mean, rstd, dx, dweight, dbias) -> None:
    """Writes dx (M, C), and overwrites dweight/dbias (C,) float32 where given (None skips them)."""
    _ops.ln_bwd(dy, x, weight, mean, rstd, dx, dweight, dbias)
