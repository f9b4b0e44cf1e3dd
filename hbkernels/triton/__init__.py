"""Triton backend (CUDA and ROCm; CPU tensors under TRITON_INTERPRET=1). Imported lazily by
hbkernels.backend, so ``import hbkernels`` never needs triton.

Each primitive runs its launcher directly in eager mode. Inside torch.compile (dynamo, and
AOTAutograd tracing the backward on fake tensors) it is instead a ``torch.library`` custom op
``hbkernels_triton::*`` with a fake kernel, so compiled graphs hold the kernels as opaque nodes with
no graph break and the compiler fuses everything around them. Eager calls skip the custom op: its
dispatch costs ~50 us of host time per call.
"""
import functools
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from hbkernels.triton import geglu, group_norm, layer_norm, layout, temporal_attention


def _on_tensor_device(launcher):
    """Triton launches on the *current* CUDA device; make that the device of the launcher's first
    tensor, so models on cuda:1 don't run their kernels on cuda:0."""

    @functools.wraps(launcher)
    def launch(first, *args, **kwargs):
        if first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return launcher(first, *args, **kwargs)
        return launcher(first, *args, **kwargs)

    return launch


def _traceable(op, launcher):
    """``launcher`` for real tensors, the custom op ``op`` while compiling or on fake tensors."""

    @functools.wraps(launcher)
    def primitive(first, *args):
        if torch.compiler.is_compiling() or isinstance(first, FakeTensor):
            return op(first, *args)
        return launcher(first, *args)

    return primitive


def _custom_op(name, mutates, launcher):
    launcher = _on_tensor_device(launcher)  # keeps the typed signature (functools.wraps)
    op = torch.library.custom_op(f"hbkernels_triton::{name}", mutates_args=mutates)(launcher)
    op.register_fake(lambda *args: None)  # the ops only write into their output arguments
    return _traceable(op, launcher)


# Typed signatures (custom_op derives each op's schema from them) over the launchers.
def _attn_fwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Optional[Tensor], scale: float,
              causal: bool) -> None:
    temporal_attention.attn_fwd(q, k, v, out, stats, scale, causal)


def _attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, stats: Tensor, dq: Tensor, dk: Tensor,
              dv: Tensor, scale: float, causal: bool) -> None:
    temporal_attention.attn_bwd(do, q, k, v, out, stats, dq, dk, dv, scale, causal)


def _gn_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], shift: Optional[Tensor], y: Tensor,
            mean: Tensor, rstd: Tensor, num_groups: int, eps: float, silu: bool) -> None:
    group_norm.gn_fwd(x, weight, bias, shift, y, mean, rstd, num_groups, eps, silu)


def _gn_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], shift: Optional[Tensor],
            mean: Tensor, rstd: Tensor, dx: Tensor, dweight: Optional[Tensor], dbias: Optional[Tensor],
            num_groups: int, silu: bool) -> None:
    group_norm.gn_bwd(dy, x, weight, bias, shift, mean, rstd, dx, dweight, dbias, num_groups, silu)


def _copy_add(src: Tensor, residual: Optional[Tensor], bias: Optional[Tensor], out: Tensor) -> None:
    layout.copy_add(src, residual, bias, out)


def _geglu_fwd(x: Tensor, out: Tensor) -> None:
    geglu.geglu_fwd(x, out)


def _geglu_bwd(dy: Tensor, x: Tensor, dx: Tensor) -> None:
    geglu.geglu_bwd(dy, x, dx)


def _ln_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], y: Tensor,
            s: Optional[Tensor], mean: Tensor, rstd: Tensor, eps: float) -> None:
    layer_norm.ln_fwd(x, residual, weight, bias, y, s, mean, rstd, eps)


def _ln_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, dx: Tensor,
            dweight: Optional[Tensor], dbias: Optional[Tensor]) -> None:
    layer_norm.ln_bwd(dy, x, weight, mean, rstd, dx, dweight, dbias)


ATTN_ROW_STATS = temporal_attention.ATTN_ROW_STATS
attn_fwd = _custom_op("attn_fwd", ("out", "stats"), _attn_fwd)
attn_bwd = _custom_op("attn_bwd", ("dq", "dk", "dv"), _attn_bwd)
gn_fwd = _custom_op("gn_fwd", ("y", "mean", "rstd"), _gn_fwd)
gn_bwd = _custom_op("gn_bwd", ("dx", "dweight", "dbias"), _gn_bwd)
copy_add = _custom_op("copy_add", ("out",), _copy_add)
geglu_fwd = _custom_op("geglu_fwd", ("out",), _geglu_fwd)
geglu_bwd = _custom_op("geglu_bwd", ("dx",), _geglu_bwd)
ln_fwd = _custom_op("ln_fwd", ("y", "s", "mean", "rstd"), _ln_fwd)
ln_bwd = _custom_op("ln_bwd", ("dx", "dweight", "dbias"), _ln_bwd)

__all__ = ["ATTN_ROW_STATS", "attn_bwd", "attn_fwd", "copy_add", "geglu_bwd", "geglu_fwd", "gn_bwd", "gn_fwd",
           "ln_bwd", "ln_fwd"]
