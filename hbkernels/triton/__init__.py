"""Triton backend (CUDA and ROCm; CPU tensors under TRITON_INTERPRET=1). Imported lazily by
hbkernels.backend, so ``import hbkernels`` never needs triton."""
from hbkernels.triton.geglu import geglu_bwd, geglu_fwd
from hbkernels.triton.group_norm import gn_bwd, gn_fwd
from hbkernels.triton.layout import copy_add
from hbkernels.triton.temporal_attention import attn_bwd, attn_fwd

__all__ = ["attn_bwd", "attn_fwd", "copy_add", "geglu_bwd", "geglu_fwd", "gn_bwd", "gn_fwd"]
