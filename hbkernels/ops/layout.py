"""Layout-aware adds: tokens (N*H*W, T, C) -> video (N, C, T, H, W) with the residual add fused in,
and the residual add of a convolution whose bias was left out (:func:`residual_add`).

The eager path ``rearrange(tokens) + residual`` reads the tokens and writes a permuted copy, then
reads that copy and the residual and writes the sum; the fused op reads each input once and writes
once (5 -> 3 passes over the activation, and no temporary). Likewise ``conv(x) + residual`` on cuDNN
adds the bias in a pass of its own before the residual add; ``residual_add`` takes both in one.
"""
import operator

import torch
from torch.autograd.function import once_differentiable

from hbkernels import backend, checks, reference
from hbkernels.ops.group_norm import _as_video, _tokens_as_video, empty_video_like, fp32_vector, video_view


class TokensToVideoFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, residual, shape, backend_name):
        # with a residual, its shape (strict torch.export fails on a tuple of symbolic sizes passed in)
        shape = tuple(residual.shape) if residual is not None else shape
        n, c, f, h, w = shape
        if residual is not None:
            out, out4 = empty_video_like(residual)
        else:
            out = backend.empty(shape, dtype=tokens.dtype, device=tokens.device)
            out4 = video_view(out)
        res4 = _as_video(residual) if residual is not None else None
        backend.primitives(backend_name).copy_add(_tokens_as_video(tokens, n, c, f, h * w), res4, None, out4)
        ctx.shape, ctx.backend_name = shape, backend_name
        ctx.has_residual = residual is not None
        return out

    @staticmethod
    @once_differentiable  # kernel gradients: a double backward must raise, not silently drop terms
    def backward(ctx, grad_out):
        n, c, f, h, w = ctx.shape
        grad_tokens = backend.empty((n * h * w, f, c), dtype=grad_out.dtype, device=grad_out.device)
        grad4 = grad_out.reshape(n, c, f, h * w)  # a view unless autograd handed a non-dense grad
        backend.primitives(ctx.backend_name).copy_add(
            grad4, None, None, _tokens_as_video(grad_tokens, n, c, f, h * w)
        )
        return grad_tokens, (grad_out if ctx.has_residual else None), None, None


def _is_int(s) -> bool:
    return isinstance(s, torch.SymInt) or (not isinstance(s, bool) and hasattr(type(s), "__index__"))


def tokens_to_video(tokens, residual=None, *, shape=None):
    """Inverse of the temporal token layout: (N*H*W, T, C) -> (N, C, T, H, W) (+ ``residual``).

    ``shape`` = (N, C, T, H, W) is needed only without ``residual``; with one, the output has the
    residual's shape and memory layout (so a permuted view of diffusers' (B*T, C, H, W) activations
    gets its result in that same memory order) where its H and W merge into one dim, else the kernel
    backends write it contiguous.
    """
    checks.tensor("tokens", tokens, ndim=3)
    if residual is not None:
        checks.tensor("residual", residual, ndim=5)
        checks.same_device(tokens=tokens, residual=residual)
        checks.same_dtype(tokens=tokens, residual=residual)
        if shape is not None and tuple(shape) != tuple(residual.shape):
            raise ValueError(f"shape {tuple(shape)} disagrees with residual's shape {tuple(residual.shape)}")
        shape = tuple(residual.shape)
    elif shape is None:
        raise ValueError("shape=(N, C, T, H, W) is required when no residual is given")
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise TypeError(f"shape must be a tuple (N, C, T, H, W) of ints, got {type(shape).__name__}")
    shape = tuple(shape)
    if len(shape) != 5 or any(not _is_int(s) or s < 0 for s in shape):
        raise ValueError(f"shape must be (N, C, T, H, W) of ints >= 0, got {shape}")
    if not torch.compiler.is_compiling():  # symbolic sizes stay symbolic: operator.index would make each
        shape = tuple(operator.index(s) for s in shape)  # a constant, recompiling for every frame count
    n, c, f, h, w = shape
    if tuple(tokens.shape) != (n * h * w, f, c):
        raise ValueError(f"tokens must have shape (N*H*W, T, C) = {(n * h * w, f, c)} for video {shape}, got {tuple(tokens.shape)}")
    name = backend.select(tokens.device, tokens.dtype, empty=tokens.numel() == 0)
    if name == "torch":
        return reference.tokens_to_video(tokens, shape, residual)
    return backend.run_function(TokensToVideoFunction, tokens, residual, None if residual is not None else shape, name)


class ResidualAddFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, bias, backend_name):
        out, out4 = empty_video_like(residual)
        backend.primitives(backend_name).copy_add(_as_video(x), _as_video(residual), fp32_vector(bias), out4)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        dbias = None
        if ctx.needs_input_grad[2]:
            dims = [d for d in range(grad_out.dim()) if d != 1]
            dbias = grad_out.sum(dim=dims, dtype=torch.float32).to(ctx.bias_dtype)
        return grad_out, grad_out, dbias, None


def residual_add(x, residual, bias=None):
    """``x + residual + bias[:, None, ...]`` for (N, C, H, W) or (N, C, T, H, W) tensors in one pass,
    in the residual's memory layout (the kernel backends: where its H and W merge into one dim, else
    contiguous): the residual add of a convolution run without its bias (see
    :func:`hbkernels.nn.conv_deferring_bias`), which cuDNN would otherwise add in a pass of its own."""
    checks.tensor("x", x, ndim=(4, 5))
    checks.like("residual", residual, "x", x, ndim=(4, 5))
    checks.channel_vector("bias", bias, x.shape[1], x)
    name = backend.select(x.device, x.dtype, empty=x.numel() == 0)
    if name == "torch":
        return reference.residual_add(x, residual, bias)
    return backend.run_function(ResidualAddFunction, x, residual, bias, name)
