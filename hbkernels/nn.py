"""Drop-in modules whose state_dict keys match torch.nn / diffusers, running on hbkernels ops."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from hbkernels.ops.geglu import geglu
from hbkernels.ops.group_norm import group_norm, group_norm_to_tokens
from hbkernels.ops.layer_norm import layer_norm
from hbkernels.ops.temporal_attention import temporal_attention


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` (same parameters and keys) with an optional fused SiLU.

    Inputs of any rank >= 2 are accepted like torch's, as (N, C, *spatial)."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, activation=None, device=None, dtype=None,
                 **kwargs):
        # kwargs: torch's own keyword-only options (``bias=False`` on the torch versions that have it)
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype, **kwargs)
        self.activation = activation

    def forward(self, x, shift=None):
        """``shift`` (N, C), optional: added to x per sample and channel before normalising (see
        :func:`hbkernels.group_norm`)."""
        return self._norm(x, shift, self.activation)

    def _norm(self, x, shift, activation):
        if x.dim() in (4, 5):
            return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, activation, shift)
        if x.dim() < 2:
            raise ValueError(f"x must be (N, C, *spatial), got shape {tuple(x.shape)}")
        flat = x.reshape(*x.shape[:2], math.prod(x.shape[2:]), 1)  # (N, C, L) and (N, C) as 4D; N may be 0
        return group_norm(flat, self.num_groups, self.weight, self.bias, self.eps, activation, shift).view(x.shape)

    def extra_repr(self):
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")

    @classmethod
    def from_torch(cls, norm: nn.GroupNorm, activation=None) -> "GroupNorm":
        """A copy of ``norm`` to replace it: it shares ``norm``'s state (parameters, buffers, hooks)."""
        new = cls.__new__(cls)
        new.__dict__.update(norm.__dict__)
        new.activation = activation
        return new


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` (same parameters and keys) on :func:`hbkernels.layer_norm` when it
    normalises over the last dim only."""

    def forward(self, x, residual=None):
        """With ``residual``: ``(norm(x + residual), x + residual)`` in one pass (see
        :func:`hbkernels.layer_norm`)."""
        if len(self.normalized_shape) != 1:
            if residual is None:
                return super().forward(x)
            s = x + residual
            return super().forward(s), s
        if x.dim() < 1 or x.shape[-1] != self.normalized_shape[0]:  # no weight to check it against otherwise
            raise ValueError(f"x's last dim must be normalized_shape {tuple(self.normalized_shape)}, "
                             f"got shape {tuple(x.shape)}")
        return layer_norm(x, self.weight, self.bias, self.eps, residual)

    @classmethod
    def from_torch(cls, norm: nn.LayerNorm) -> "LayerNorm":
        """A copy of ``norm`` to replace it: it shares ``norm``'s state (parameters, buffers, hooks)."""
        new = cls.__new__(cls)
        new.__dict__.update(norm.__dict__)
        return new


def runs_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's forward: torch hooks (forward or backward, its
    own or global ones), or a forward replaced on the instance, as accelerate's offload hooks and diffusers'
    hooks (layerwise casting, group offload) do. Code that reads such a module's weights itself, or fuses
    its work into another op, must call it instead: the hooks move or cast the weights only around the
    call, and see (and may replace) its inputs, outputs and their gradients."""
    forward = vars(module).get("forward")
    # removing such a hook (accelerate, diffusers) leaves the class's own forward bound on the instance
    restored = getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward
    g = nn.modules.module
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks,
             g._global_forward_hooks, g._global_forward_pre_hooks, g._global_backward_hooks,
             g._global_backward_pre_hooks)
    return any(hooks) or (forward is not None and not restored)


def norm_to_tokens(norm: nn.GroupNorm, video: torch.Tensor) -> torch.Tensor:
    """``norm`` (a GroupNorm, with its fused SiLU if it has one) of a video (N, C, T, H, W) as tokens
    (N*H*W, T, C), as temporal transformers take them: written straight in that layout by
    :func:`group_norm_to_tokens`, or, where ``norm`` runs hooks (its weights are ready only inside its
    call) or is not exactly torch's or this GroupNorm (a subclass's forward, another module put in its
    place), by calling it and copying the permuted result."""
    c, t = video.shape[1:3]
    if runs_hooks(norm) or type(norm) not in (nn.GroupNorm, GroupNorm):
        return norm(video).permute(0, 3, 4, 2, 1).reshape(-1, t, c)
    return group_norm_to_tokens(video, norm.num_groups, norm.weight, norm.bias, norm.eps,
                                getattr(norm, "activation", None))


def conv_deferring_bias(conv: nn.Module, x: torch.Tensor):
    """``(conv(x) without its bias, the bias)`` for a plain biased ``nn.Conv2d`` / ``nn.Conv3d``, so
    that the caller adds the bias where it costs no pass of its own, e.g. as the next
    :class:`GroupNorm`'s ``shift`` (cuDNN adds a convolution's bias in a separate broadcast pass over
    the whole output). ``(conv(x), None)`` for anything else (a LoRA-wrapped or hooked conv, no bias)."""
    plain = type(conv) in (nn.Conv2d, nn.Conv3d) and not runs_hooks(conv)
    if plain and conv.bias is not None:
        return conv._conv_forward(x, conv.weight, None), conv.bias
    return conv(x), None


class GEGLU(nn.Module):
    """diffusers' ``GEGLU`` (``proj`` Linear to 2 * dim_out, then value * gelu(gate)), fused."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias)

    def forward(self, x):
        return geglu(self.proj(x))


def inplace_version(t: torch.Tensor):
    """``t``'s in-place version counter, or None where it keeps none: an inference tensor (made under
    torch.inference_mode, e.g. weights loaded there), or a parameter made as one whose ``.data`` was
    replaced since (``is_inference()`` is then False, and the counter still raises). Their in-place
    changes go unseen."""
    try:
        return t._version
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


def fusable(layer: nn.Module) -> bool:
    """Whether ``layer`` computes ``F.linear(x, weight, bias)`` and nothing else, so its weights can join
    one GEMM with others: an ``nn.Linear`` with nn.Linear's forward. A peft LoRA layer (not an
    nn.Linear) or a quantised linear (its own forward) is not: fused, its adapter or scales would be
    dropped without a word."""
    return isinstance(layer, nn.Linear) and type(layer).forward is nn.Linear.forward


class FusedLinear(nn.Module):
    """Linear layers that read the same input, as one: their weights (and biases) concatenated along
    the outputs, so one GEMM reads the input once instead of once per layer.

    Without gradients (inference), a copy in non-persistent buffers (``state_dict`` keeps only the
    separate layers' keys), brought up to date in place when a layer's weights have changed since (an
    optimizer step, a load, ``.data`` replaced): its addresses stay, so captured CUDA graphs read the
    new values. Writes into ``.data`` (diffusers' ``EMAModel.copy_to``, ``param.data.copy_``) leave
    no trace in tensor versions, and inside torch.compile the copy is used as it stands (the check
    reads tensor versions, which dynamo cannot trace): call :meth:`refresh` after either. Where a
    gradient is wanted for a layer's parameters, the weights are concatenated afresh on each call, so
    the layers themselves are trained. Layers with hooks (offload, layerwise casting) are called one by
    one.

    The layers must be :func:`fusable`. Code that owns them checks :meth:`fuses` before each use: a
    layer replaced since (e.g. wrapped in a peft LoRA layer) is then called instead."""

    def __init__(self, *linears: nn.Linear):
        super().__init__()
        for i, lin in enumerate(linears):
            if not fusable(lin):
                raise TypeError(f"linears[{i}] must be a plain nn.Linear (see hbkernels.nn.fusable), got "
                                f"{type(lin).__name__}: merge an adapter into its weights before fusing")
        self._linears = linears  # a tuple: not submodules, whose keys would duplicate the layers' own
        weight, bias = self._concatenated(torch.Tensor.detach)
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self._copied = self._versions()

    def fuses(self, *linears: nn.Module) -> bool:
        """Whether ``linears`` are the layers fused here, in order (an owner's current attributes: one
        an adapter has wrapped since is another module)."""
        return len(linears) == len(self._linears) and all(a is b for a, b in zip(linears, self._linears))

    def _parameters_of_layers(self):
        return [p for lin in self._linears for p in (lin.weight, lin.bias) if p is not None]

    def _versions(self):
        """What identifies the layers' current weights: each parameter's storage and in-place version."""
        return tuple((p.data_ptr(), inplace_version(p)) for p in self._parameters_of_layers())

    def _concatenated(self, take):
        weight = torch.cat([take(lin.weight) for lin in self._linears])
        if all(lin.bias is None for lin in self._linears):
            return weight, None
        return weight, torch.cat([take(lin.bias) if lin.bias is not None else weight.new_zeros(lin.out_features)
                                  for lin in self._linears])

    def forward(self, x):
        if any(runs_hooks(lin) for lin in self._linears):  # offloaded / cast around each call: call them
            return torch.cat([lin(x) for lin in self._linears], dim=-1)
        if torch.is_grad_enabled() and any(p.requires_grad for p in self._parameters_of_layers()):
            return F.linear(x, *self._concatenated(lambda p: p))
        if not torch.compiler.is_compiling() and self._versions() != self._copied:
            self.refresh()
        return F.linear(x, self.weight, self.bias)

    def refresh(self) -> None:
        """Copies the layers' weights into the fused copy, in place. Not while a layer runs hooks: its
        weights may be elsewhere (offloaded to the meta device) and the forward calls the layers."""
        if any(runs_hooks(lin) for lin in self._linears):
            return
        with torch.no_grad():
            for buffer, fresh in zip((self.weight, self.bias), self._concatenated(torch.Tensor.detach)):
                if buffer is not None:
                    buffer.copy_(fresh)
        self._copied = self._versions()


class TemporalAttention(nn.Module):
    """Self-attention over frames of tokens (B, T, C), with diffusers ``Attention`` key names
    (``to_q``, ``to_k``, ``to_v``, ``to_out.0``). The per-head views of the projections go to the
    kernel without the head-split copies diffusers makes; after :meth:`fuse_projections` they come
    from one GEMM (one read of the tokens instead of three)."""

    def __init__(self, query_dim: int, heads: int = 8, dim_head: int = 64, bias: bool = False,
                 out_bias: bool = True, dropout: float = 0.0, causal: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.causal = heads, dim_head, causal
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(query_dim, inner, bias=bias)
        self.to_v = nn.Linear(query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)])
        self.to_qkv = None

    def fuse_projections(self) -> None:
        """Compute q, k, v with one :class:`FusedLinear` over to_q, to_k, to_v (TypeError where one is not
        :func:`fusable`). Where one is replaced later (a LoRA layer wrapping it), forward calls them."""
        self.to_qkv = FusedLinear(self.to_q, self.to_k, self.to_v)

    def unfuse_projections(self) -> None:
        self.to_qkv = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be tokens (B, T, C), got shape {tuple(x.shape)}")
        b, t, _ = x.shape
        if self.to_qkv is not None and self.to_qkv.fuses(self.to_q, self.to_k, self.to_v):
            # strided per-head views of one (B, T, 3, H, D) output: no copies
            q, k, v = self.to_qkv(x).view(b, t, 3, self.heads, self.dim_head).unbind(2)
        else:
            q, k, v = (proj(x).view(b, t, self.heads, self.dim_head) for proj in (self.to_q, self.to_k, self.to_v))
        out = temporal_attention(q, k, v, causal=self.causal).reshape(b, t, -1)
        return self.to_out[1](self.to_out[0](out))
