"""Triton backend (CUDA and ROCm; CPU tensors under TRITON_INTERPRET=1). Imported lazily by
hbkernels.backend, so ``import hbkernels`` never needs triton."""
import functools

import torch

from hbkernels.triton import geglu, group_norm, layout, temporal_attention


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


ATTN_ROW_STATS = temporal_attention.ATTN_ROW_STATS
attn_fwd = _on_tensor_device(temporal_attention.attn_fwd)
attn_bwd = _on_tensor_device(temporal_attention.attn_bwd)
gn_fwd = _on_tensor_device(group_norm.gn_fwd)
gn_bwd = _on_tensor_device(group_norm.gn_bwd)
copy_add = _on_tensor_device(layout.copy_add)
geglu_fwd = _on_tensor_device(geglu.geglu_fwd)
geglu_bwd = _on_tensor_device(geglu.geglu_bwd)

__all__ = ["ATTN_ROW_STATS", "attn_bwd", "attn_fwd", "copy_add", "geglu_bwd", "geglu_fwd", "gn_bwd", "gn_fwd"]
