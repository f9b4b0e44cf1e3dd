"""tokens (N*H*W, T, C) -> video (N, C, T, H, W), with the residual add fused in.

The eager path ``rearrange(tokens) + residual`` reads the tokens and writes a permuted copy, then
reads that copy and the residual and writes the sum; the fused op reads each input once and writes
once (4 -> 3 passes over the activation, and no temporary).
"""
import torch
from torch.autograd.function import once_differentiable

from hbkernels import backend, checks, reference
from hbkernels.ops.group_norm import _as_video, _tokens_as_video, empty_video_like, video_view


class TokensToVideoFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, residual, shape, backend_name):
        n, c, f, h, w = shape
        if residual is not None:
            out, out4 = empty_video_like(residual)
        else:
            out = backend.empty(shape, dtype=tokens.dtype, device=tokens.device)
            out4 = video_view(out)
        res4 = _as_video(residual) if residual is not None else None
        backend.primitives(backend_name).copy_add(_tokens_as_video(tokens, n, c, f, h * w), res4, out4)
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
            grad4, None, _tokens_as_video(grad_tokens, n, c, f, h * w)
        )
        return grad_tokens, (grad_out if ctx.has_residual else None), None, None


def tokens_to_video(tokens, residual=None, *, shape=None):
    """Inverse of the temporal token layout: (N*H*W, T, C) -> (N, C, T, H, W) (+ ``residual``).

    ``shape`` = (N, C, T, H, W) is needed only without ``residual``; with one, the output has the
    residual's shape and memory layout (so a permuted view of diffusers' (B*T, C, H, W) activations
    gets its result in that same memory order).
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
    shape = tuple(int(s) for s in shape)
    if len(shape) != 5:
        raise ValueError(f"shape must be (N, C, T, H, W), got {shape}")
    n, c, f, h, w = shape
    if tuple(tokens.shape) != (n * h * w, f, c):
        raise ValueError(f"tokens must have shape (N*H*W, T, C) = {(n * h * w, f, c)} for video {shape}, got {tuple(tokens.shape)}")
    name = backend.select(tokens.device, tokens.dtype)
    if name == "torch":
        return reference.tokens_to_video(tokens, shape, residual)
    return backend.run_function(TokensToVideoFunction, tokens, residual, shape, name)
