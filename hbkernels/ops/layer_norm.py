"""LayerNorm over the last dim, as the transformer blocks of video U-Nets use it on their tokens.

PyTorch's GPU kernel spends a thread block per row, which at the rows' length here (C = 320-1280
channels, 10^4-10^5 tokens per call) leaves it at a fraction of memory bandwidth; the kernels here
normalise many rows per program, reading the activation once and writing it once.
"""
import torch
from torch.autograd.function import once_differentiable

from hbkernels import backend, checks, reference

TRITON_MAX_C = 16384  # the Triton kernels hold a whole row in one tile; wider rows take the reference


def _rows(t, c):
    """t as (rows, C) with unit column stride (a view where possible)."""
    return backend.unit_last_stride(t.reshape(-1, c))


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, backend_name):
        c = x.shape[-1]
        x2 = _rows(x, c)
        m = x2.shape[0]
        # outputs allocated in x's shape and returned whole, so callers may modify them in place (see
        # GEGLUFunction); the kernels get (m, C) views
        y = backend.empty(x.shape, dtype=x.dtype, device=x.device)
        s = None if residual is None else backend.empty(x.shape, dtype=x.dtype, device=x.device)
        mean = backend.empty((m,), dtype=torch.float32, device=x.device)
        rstd = backend.empty((m,), dtype=torch.float32, device=x.device)
        r2 = None if residual is None else _rows(residual, c)
        s2 = None if s is None else s.view(m, c)
        backend.primitives(backend_name).ln_fwd(x2, r2, weight, bias, y.view(m, c), s2, mean, rstd, eps)
        ctx.save_for_backward(x2 if s is None else s, weight, mean, rstd)
        ctx.shape, ctx.backend_name = x.shape, backend_name
        ctx.bias_dtype = None if bias is None else bias.dtype
        if s is None:
            return y
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            ctx.mark_non_differentiable(s)  # x + residual: a graph (and a dx) for weight's gradient alone
        return y, s

    @staticmethod
    @once_differentiable  # kernel gradients: a double backward must raise, not silently drop terms
    def backward(ctx, grad_y, grad_s=None):
        x2, weight, mean, rstd = ctx.saved_tensors  # x2: the normalised input (x + residual when fused)
        c = x2.shape[-1]
        x2 = x2.view(-1, c)  # s is saved whole: its in-place use downstream then meets autograd's version check
        dy = _rows(grad_y, c)
        dx = backend.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        need_w, need_b = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        dw = backend.empty((c,), dtype=torch.float32, device=x2.device) if need_w else None
        db = backend.empty((c,), dtype=torch.float32, device=x2.device) if need_b else None
        backend.primitives(ctx.backend_name).ln_bwd(dy, x2, weight, mean, rstd, dx, dw, db)
        dx = dx.view(ctx.shape)
        if grad_s is not None:  # the sum x + residual was also used downstream
            dx = dx + grad_s
        dres = dx if ctx.needs_input_grad[1] else None
        return (dx, dres, dw.to(weight.dtype) if need_w else None, db.to(ctx.bias_dtype) if need_b else None,
                None, None)


def _check(x, weight, bias, eps, residual):
    checks.tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x must have a last dim to normalise over, got shape {tuple(x.shape)}")
    if residual is not None:
        checks.like("residual", residual, "x", x)
    c = x.shape[-1]
    checks.channel_vector("weight", weight, c, x)
    checks.channel_vector("bias", bias, c, x)
    checks.positive_eps(eps)


def layer_norm(x, weight=None, bias=None, eps=1e-5, residual=None):
    """``torch.nn.functional.layer_norm(x, (C,), weight, bias, eps)`` over the last dim C of x (any
    leading shape). Statistics in fp32, the variance from a second pass over the row (stable for
    large means). On GPUs, rows wider than ``TRITON_MAX_C`` take the reference path.

    With ``residual`` (x's shape and dtype) returns ``(layer_norm(s), s)`` for ``s = x + residual``,
    the pre-norm transformer block's ``x = f(x) + x; h = norm(x)`` in one pass."""
    _check(x, weight, bias, eps, residual)
    name = backend.select(x.device, x.dtype, empty=x.numel() == 0)
    use_reference = name == "torch" or (name == "triton" and x.shape[-1] > TRITON_MAX_C)
    weight, bias = (checks.norm_affine(p, x) for p in (weight, bias))
    if use_reference:
        return reference.layer_norm(x, weight, bias, float(eps), residual)
    return backend.run_function(LayerNormFunction, x, residual, weight, bias, float(eps), name)
