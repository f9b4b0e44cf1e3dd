"""LayerNorm over the last dim, as the transformer blocks of video U-Nets use it on their tokens.

PyTorch's GPU kernel spends a thread block per row, which at the rows' length here (C = 320-1280
channels, 10^4-10^5 tokens per call) leaves it at a fraction of memory bandwidth; the kernels here
normalise many rows per program, reading the activation once and writing it once.
"""
import torch
from torch.autograd.function import once_differentiable

from hbkernels import backend, checks, reference

TRITON_MAX_C = 16384  # the Triton kernels hold a whole row in one tile; wider rows take the reference


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, backend_name):
        c = x.shape[-1]
        x2 = x.reshape(-1, c)
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        m = x2.shape[0]
        y = backend.empty((m, c), dtype=x.dtype, device=x.device)
        mean = backend.empty((m,), dtype=torch.float32, device=x.device)
        rstd = backend.empty((m,), dtype=torch.float32, device=x.device)
        backend.primitives(backend_name).ln_fwd(x2, weight, bias, y, mean, rstd, eps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.shape, ctx.backend_name = x.shape, backend_name
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(x.shape)

    @staticmethod
    @once_differentiable  # kernel gradients: a double backward must raise, not silently drop terms
    def backward(ctx, grad_out):
        x2, weight, mean, rstd = ctx.saved_tensors
        dy = grad_out.reshape(x2.shape)
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dx = backend.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        c = x2.shape[1]
        need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dw = torch.empty(c, dtype=torch.float32, device=x2.device) if need_w else None
        db = torch.empty(c, dtype=torch.float32, device=x2.device) if need_b else None
        backend.primitives(ctx.backend_name).ln_bwd(dy, x2, weight, mean, rstd, dx, dw, db)
        return (dx.view(ctx.shape), dw.to(weight.dtype) if need_w else None,
                db.to(ctx.bias_dtype) if need_b else None, None, None)


def _check(x, weight, bias, eps):
    checks.tensor("x", x)
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty tensor normalised over its last dim, got shape {tuple(x.shape)}")
    c = x.shape[-1]
    checks.channel_vector("weight", weight, c, x)
    checks.channel_vector("bias", bias, c, x)
    if not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm(x, (C,), weight, bias, eps)`` over the last dim C of x (any
    leading shape). Statistics in fp32, the variance from a second pass over the row (stable for
    large means). On GPUs, rows wider than ``TRITON_MAX_C`` take the reference path."""
    _check(x, weight, bias, eps)
    name = backend.select(x.device, x.dtype)
    if name == "torch" or (name == "triton" and x.shape[-1] > TRITON_MAX_C):
        return reference.layer_norm(x, weight, bias, float(eps))
    return backend.run_function(LayerNormFunction, x, weight, bias, float(eps), name)
