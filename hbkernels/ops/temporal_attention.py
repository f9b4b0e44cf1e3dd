"""Attention along the frame axis of video tokens, read straight from (N, T, H, D) views.

Diffusers and VideoCrafter2 reshape ``to_q/to_k/to_v`` outputs to (N*H, T, D) with a copy each, then
run SDPA, whose flash/efficient kernels fail once N*H >= 65,536. The kernels here take the
projections' strided views as they are (only the last dim must be contiguous) and put N*H on the
grid axis that has no such limit.
"""
import math
import numbers

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from hbkernels import backend, checks, reference

MAX_HEAD_DIM = 256
# The Triton kernels take scale * log2(e) as an fp32 scalar (scores in the exp2 domain): inf past this
MAX_SCALE = checks.FP32_MAX / math.log2(math.e)


class TemporalAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, backend_name, keep_stats):
        n, t, h, _ = q.shape
        out = backend.empty(q.shape, dtype=q.dtype, device=q.device)
        # Per-row softmax statistics (N, H, T, ATTN_ROW_STATS), in the backend's own units: only its
        # backward reads them, so inference does not write them.
        impl = backend.primitives(backend_name)
        stats = None
        if keep_stats and impl.ATTN_ROW_STATS:
            stats = backend.empty((n, h, t, impl.ATTN_ROW_STATS), dtype=torch.float32, device=q.device)
        impl.attn_fwd(q, k, v, out, stats, scale, causal)
        ctx.save_for_backward(q, k, v, out, stats)
        ctx.scale, ctx.causal, ctx.backend_name = scale, causal, backend_name
        return out

    @staticmethod
    @once_differentiable  # kernel gradients: a double backward must raise, not silently drop terms
    def backward(ctx, grad_out):
        q, k, v, out, stats = ctx.saved_tensors
        grad_out = backend.unit_last_stride(grad_out)
        dq, dk, dv = (backend.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        backend.primitives(ctx.backend_name).attn_bwd(grad_out, q, k, v, out, stats, dq, dk, dv, ctx.scale, ctx.causal)
        return dq, dk, dv, None, None, None, None


def temporal_attention(q, k, v, *, scale=None, causal=False):
    """softmax(q k^T * scale) v over frames. q, k, v: (N, T, H, D) -> (N, T, H, D).

    Any strides work as long as the last dim is contiguous (other layouts are copied once).
    ``scale`` defaults to 1/sqrt(D); ``causal`` masks later frames.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        checks.tensor(name, t, ndim=4)
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != q.shape:
        raise ValueError(f"v must have the shape of q {tuple(q.shape)}, got {tuple(v.shape)}")
    checks.same_device(q=q, k=k, v=v)
    device_type = q.device.type  # autocast knows no "meta" (shape inference)
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # in autocast's dtype, as F.scaled_dot_product_attention (which autocast lists as such) runs
        q, k, v = (x.to(torch.get_autocast_dtype(device_type))
                   if x.is_floating_point() and x.dtype != torch.float64 else x for x in (q, k, v))
    checks.same_dtype(q=q, k=k, v=v)
    n, t, h, d = q.shape
    if d > MAX_HEAD_DIM:
        raise ValueError(f"q head dim (last dim) must be at most {MAX_HEAD_DIM}, got {d}")
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d else 1.0  # D = 0: empty scores, any scale
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):  # numpy floats are Real
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    elif not abs(scale) <= MAX_SCALE:  # NaN, inf, or inf once times log2(e) in fp32 (and not math.isfinite:
        # torch.compile cannot trace it on a symbolic float)
        raise ValueError(f"scale must be a finite float of magnitude at most {MAX_SCALE:.4g} or None, got {scale!r}")
    if not isinstance(causal, (bool, np.bool_)):  # a string such as "no" would otherwise mean True
        raise TypeError(f"causal must be a bool, got {causal!r}")
    name = backend.select(q.device, q.dtype, empty=q.numel() == 0)
    if name == "torch":
        return reference.temporal_attention(q, k, v, float(scale), bool(causal))
    q, k, v = (backend.unit_last_stride(x) for x in (q, k, v))
    keep_stats = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return backend.run_function(TemporalAttentionFunction, q, k, v, float(scale), bool(causal), name, keep_stats)
