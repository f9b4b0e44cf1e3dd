"""GroupNorm (+ optional fused SiLU) over 4D/5D video tensors, in any dense layout, and its fusion
with the (N, C, T, H, W) -> (N*H*W, T, C) token layout that temporal transformers consume.

The kernels see every tensor as a strided (N, C, T, S) view (S = H*W), so contiguous,
channels-last and token layouts share one kernel; the fused token output saves the permute copy
(one full read + write of the activation) that diffusers and VideoCrafter2 pay after the norm.
"""
import torch
from torch.autograd.function import once_differentiable

from hbkernels import backend, checks, reference

ACTIVATIONS = (None, "silu")


def video_view(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) or (N, C, T, H, W) -> a (N, C, T, H*W) view (T = 1 for 4D)."""
    if t.dim() == 4:
        t = t.unsqueeze(2)
    n, c, f, h, w = t.shape
    return t.view(n, c, f, h * w)


def _hw_merge(t: torch.Tensor) -> bool:
    """Whether :func:`video_view` can merge ``t``'s H and W without a copy. Decided from the strides,
    not by trying the view: under torch.compile a failed view on fake tensors raises dynamo's own
    error, which aborts the compilation instead of reaching an ``except RuntimeError``."""
    h, w = t.shape[-2:]
    return h == 1 or w == 1 or t.stride(-2) == t.stride(-1) * w


def _as_video(t: torch.Tensor) -> torch.Tensor:
    """Like :func:`video_view`, copying first when H and W cannot be merged without one."""
    return video_view(t if _hw_merge(t) else t.contiguous())


def empty_video_like(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An output shaped like ``t`` (its layout where H and W merge, else contiguous) and its
    (N, C, T, H*W) view."""
    out = backend.empty_like(t)
    if not _hw_merge(out):
        out = backend.empty_like(t, memory_format=torch.contiguous_format)
    return out, video_view(out)


def _tokens_as_video(tokens: torch.Tensor, n: int, c: int, f: int, hw: int) -> torch.Tensor:
    """tokens (N*H*W, T, C) -> the (N, C, T, H*W) view of the same memory."""
    return tokens.reshape(n, hw, f, c).permute(0, 3, 2, 1)


class GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, shift, num_groups, eps, silu, to_tokens, backend_name):
        impl = backend.primitives(backend_name)
        n, c = x.shape[:2]
        x4 = _as_video(x)
        f, hw = x4.shape[2:]
        if to_tokens:
            out = backend.empty((n * hw, f, c), dtype=x.dtype, device=x.device)
            out4 = _tokens_as_video(out, n, c, f, hw)
        else:
            out, out4 = empty_video_like(x)
        mean = backend.empty((n, num_groups), dtype=torch.float32, device=x.device)
        rstd = backend.empty((n, num_groups), dtype=torch.float32, device=x.device)
        shift32 = fp32_vector(shift)
        impl.gn_fwd(x4, weight, bias, shift32, out4, mean, rstd, num_groups, eps, silu)
        ctx.save_for_backward(x, weight, bias, shift32, mean, rstd)
        ctx.cfg = (num_groups, silu, to_tokens, backend_name, None if shift is None else shift.dtype)
        return out

    @staticmethod
    @once_differentiable  # kernel gradients: a double backward must raise, not silently drop terms
    def backward(ctx, grad_out):
        x, weight, bias, shift32, mean, rstd = ctx.saved_tensors
        num_groups, silu, to_tokens, backend_name, shift_dtype = ctx.cfg
        n, c = x.shape[:2]
        x4 = _as_video(x)
        f, hw = x4.shape[2:]
        dy4 = _tokens_as_video(grad_out, n, c, f, hw) if to_tokens else _as_video(grad_out)
        dx, dx4 = empty_video_like(x)
        want_w = weight is not None and ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        dw = backend.empty((c,), dtype=torch.float32, device=x.device) if want_w else None
        db = backend.empty((c,), dtype=torch.float32, device=x.device) if want_b else None
        backend.primitives(backend_name).gn_bwd(
            dy4, x4, weight, bias, shift32, mean, rstd, dx4, dw, db, num_groups, silu
        )
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(bias.dtype) if db is not None else None
        dshift = _shift_grad(dx4, num_groups).to(shift_dtype) if ctx.needs_input_grad[3] else None
        return dx, dw, db, dshift, None, None, None, None, None


def _shift_grad(dx4, num_groups):
    """d shift: x + shift is what is normalised, so dx summed over each (n, c) plane. Those sums are of
    dx rounded to x's dtype; their part along what is exactly 0 (a group's sum: one constant added to a
    whole group changes nothing) is removed, which leaves a one-channel group's exactly 0 (else fp16
    rounding noise, 1000x torch's own error) and never moves the sums away from the true ones."""
    n, c = dx4.shape[:2]
    sums = dx4.sum(dim=(2, 3), dtype=torch.float32).view(n, num_groups, c // num_groups)
    return (sums - sums.mean(dim=2, keepdim=True)).view(n, c)


def fp32_vector(v):
    """An optional small per-channel operand (a shift, a bias) as the kernels read it: contiguous fp32
    (N * C values at most: a negligible copy)."""
    return None if v is None else v.to(torch.float32).contiguous()


def _check(x, num_groups, weight, bias, eps, activation, ndim, shift=None) -> int:
    """Raises on bad arguments; returns num_groups as an int."""
    checks.tensor("x", x, ndim=ndim)
    c = x.shape[1]
    if shift is not None:
        checks.tensor("shift", shift, ndim=2)
        if tuple(shift.shape) != (x.shape[0], c):
            raise ValueError(f"shift must have shape (N, C) = {(x.shape[0], c)}, got {tuple(shift.shape)}")
        checks.same_device(x=x, shift=shift)
    num_groups = checks.positive_int("num_groups", num_groups)
    if c % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must divide the channel count C={c} of x")
    checks.channel_vector("weight", weight, c, x)
    checks.channel_vector("bias", bias, c, x)
    checks.positive_eps(eps)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return num_groups


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, shift=None):
    """GroupNorm of (N, C, H, W) or (N, C, T, H, W), optionally followed by SiLU in the same pass.

    ``shift`` (N, C), optional: added to x per sample and channel before normalising, as a ResNet
    block adds its time embedding, without the separate broadcast-add pass over the activation.

    Contiguous and channels-last inputs keep their layout in the output; statistics are accumulated
    in fp32 with a Welford/Chan merge, so low-precision inputs with a large mean stay accurate.
    """
    num_groups = _check(x, num_groups, weight, bias, eps, activation, (4, 5), shift)
    silu = activation == "silu"
    name = backend.select(x.device, x.dtype, empty=x.numel() == 0)
    weight, bias = (checks.norm_affine(p, x) for p in (weight, bias))
    if name == "torch":
        return reference.group_norm(x, num_groups, weight, bias, float(eps), silu, shift)
    return backend.run_function(GroupNormFunction, x, weight, bias, shift, num_groups, float(eps), silu, False, name)


def group_norm_to_tokens(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None):
    """GroupNorm of a video (N, C, T, H, W), written directly as tokens (N*H*W, T, C).

    Equals ``rearrange(group_norm(x), "n c t h w -> (n h w) t c")`` without the permute copy.
    """
    num_groups = _check(x, num_groups, weight, bias, eps, activation, 5)
    silu = activation == "silu"
    name = backend.select(x.device, x.dtype, empty=x.numel() == 0)
    weight, bias = (checks.norm_affine(p, x) for p in (weight, bias))
    if name == "torch":
        return reference.group_norm_to_tokens(x, num_groups, weight, bias, float(eps), silu)
    return backend.run_function(GroupNormFunction, x, weight, bias, None, num_groups, float(eps), silu, True, name)
