"""Argument checks shared by the ops: bad input raises ValueError/TypeError naming the argument,
before any kernel sees it."""
import numbers
import operator

import torch

# float64 is accepted and always runs the PyTorch reference (it is what tests compare against).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FP32_TINY, FP32_MAX = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max  # scalars the kernels take


def tensor(name: str, t, *, ndim=None, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(f"{n}D" for n in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def same_dtype(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}")


def like(name: str, t, ref_name: str, ref: torch.Tensor, *, ndim=None) -> None:
    """``t`` (e.g. a residual) must be a float tensor with ``ref``'s shape, device and dtype."""
    tensor(name, t, ndim=ndim)
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have {ref_name}'s shape {tuple(ref.shape)}, got {tuple(t.shape)}")
    same_device(**{ref_name: ref, name: t})
    same_dtype(**{ref_name: ref, name: t})


def channel_vector(name: str, t, channels: int, like: torch.Tensor) -> None:
    """An optional per-channel parameter (a norm's weight/bias, a convolution's bias), of any float dtype."""
    if t is None:
        return
    tensor(name, t, ndim=1)
    if t.numel() != channels:
        raise ValueError(f"{name} must have {channels} elements (one per channel), got {t.numel()}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the input is on {like.device}")


def positive_eps(eps) -> None:
    """eps: any real number but a bool (numpy scalars too, as torch's norms take them), above 0."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a positive float, got {eps!r}")
    if not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if eps < FP32_TINY:  # the kernels add it in fp32, where it would be 0
        raise ValueError(f"eps must be at least {FP32_TINY:.3g} (the smallest normal float32), got {eps!r}")


def positive_int(name: str, value) -> int:
    """``value`` as an int: anything with ``__index__`` (numpy integers too) but a bool, at least 1."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)  # a float tensor has __index__, and raises here
    except TypeError:
        raise TypeError(f"{name} must be a positive int, got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def norm_affine(t, x: torch.Tensor):
    """A norm's optional weight/bias as the backends take it, contiguous (the Triton LayerNorm indexes it
    without strides): fp32 as given (mixed precision's master weights: every backend computes in fp32,
    so rounding them to x's fp16/bf16 would only add error), any other dtype in x's. Differentiable:
    gradients reach the caller's tensor in its own dtype."""
    if t is None:
        return None
    return (t if t.dtype == torch.float32 else t.to(x.dtype)).contiguous()
