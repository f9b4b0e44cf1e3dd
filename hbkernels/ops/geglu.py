"""GEGLU: ``hidden, gate = x.chunk(2, -1); hidden * gelu(gate)`` in one pass.

Eager PyTorch materialises gelu(gate) and then the product (read 2F + write F, read 2F + write F
per row); the fused kernel reads the 2F inputs once and writes F outputs once.
"""
import torch
from torch.autograd.function import once_differentiable

from hbkernels import backend, checks, reference


class GEGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, backend_name):
        x2 = x.reshape(-1, x.shape[-1])
        x2 = x2 if x2.stride(-1) == 1 and x2.stride(0) == x2.shape[1] else x2.contiguous()
        # allocated in the output's shape and returned whole: a returned view of a buffer made here
        # could not be modified in place (autograd refuses in-place ops on a Function's view outputs)
        out = backend.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=x.dtype, device=x.device)
        backend.primitives(backend_name).geglu_fwd(x2, out.view(x2.shape[0], -1))
        ctx.save_for_backward(x2)
        ctx.shape, ctx.backend_name = x.shape, backend_name
        return out

    @staticmethod
    @once_differentiable  # kernel gradients: a double backward must raise, not silently drop terms
    def backward(ctx, grad_out):
        (x2,) = ctx.saved_tensors
        dy = backend.unit_last_stride(grad_out.reshape(x2.shape[0], -1))
        dx = backend.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        backend.primitives(ctx.backend_name).geglu_bwd(dy, x2, dx)
        return dx.view(ctx.shape), None


def geglu(x):
    """(..., 2F) -> (..., F): first half times exact (erf) GELU of the second half, as in
    diffusers' GEGLU and VideoCrafter2's feed-forward."""
    checks.tensor("x", x)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x's last dim must be even (value and gate halves), got shape {tuple(x.shape)}")
    name = backend.select(x.device, x.dtype, empty=x.numel() == 0)
    if name == "torch":
        return reference.geglu(x)
    return backend.run_function(GEGLUFunction, x, name)
