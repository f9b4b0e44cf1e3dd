"""hbkernels: fused video-diffusion ops (temporal attention, GroupNorm+SiLU, layout fusions,
GEGLU, LayerNorm) with Triton (GPU), C++ (CPU) and pure-PyTorch reference backends."""
from hbkernels import nn
from hbkernels.backend import use_backend
from hbkernels.ops.geglu import geglu
from hbkernels.ops.group_norm import group_norm, group_norm_to_tokens
from hbkernels.ops.layer_norm import layer_norm
from hbkernels.ops.layout import residual_add, tokens_to_video
from hbkernels.ops.temporal_attention import temporal_attention
from hbkernels.patch import apply_to

__version__ = "0.1.0"
__all__ = [
    "apply_to",
    "geglu",
    "nn",
    "group_norm",
    "group_norm_to_tokens",
    "layer_norm",
    "residual_add",
    "temporal_attention",
    "tokens_to_video",
    "use_backend",
]
