"""``apply_to(model)``: route a diffusers video model's GroupNorm(+SiLU), LayerNorm, temporal
self-attention and GEGLU paths through hbkernels, in place, keeping parameters and state_dict keys.

Patches are chosen by exact module type and by what the owning module's forward is known to do
with it (read from diffusers' source), so subclasses that may override a forward are left alone:

* every ``torch.nn.LayerNorm`` over the last dim becomes :class:`hbkernels.nn.LayerNorm`;
* every ``torch.nn.GroupNorm`` becomes :class:`hbkernels.nn.GroupNorm`; SiLU is fused into it where
  it is applied straight to the norm's output (``ResnetBlock2D``, ``TemporalResnetBlock``, the
  U-Nets' ``conv_norm_out``/``conv_act``, ``nn.Sequential(GroupNorm, SiLU, ...)`` as in
  ``TemporalConvLayer``);
* self-attention inside temporal transformers (frames as the sequence axis) gets
  :class:`TemporalAttnProcessor`;
* diffusers' ``GEGLU`` becomes :class:`hbkernels.nn.GEGLU` (sharing ``proj``);
* ``TransformerTemporalModel`` / ``AnimateDiffTransformer3D`` get a forward whose norm writes the
  token layout directly and whose output permute is fused with the residual add;
* ``ResnetBlock2D`` ("default" time-embedding mode) gets a forward whose ``norm2`` adds the time
  embedding itself (``group_norm(..., shift=temb)``), saving the broadcast-add pass.

Patch before adding hooks (accelerate's offload, diffusers' layerwise casting or group offload):
a module that already runs hooks when ``apply_to`` meets it is left as it is, with its SiLU (a
warning counts them), since its hooks wrap the forward it has. Hooks added after patching run:
hooked convolutions and norms are called as modules (their biases are then not fused into the next
op), a fused GroupNorm whose hooks or whose SiLU's run leaves the SiLU to that module, so that they
see, and may replace, the norm's own output, and a hooked ``norm2`` of ``ResnetBlock2D`` gets the time
embedding already added, as unpatched.
``model.set_attn_processor(AttnProcessor2_0())`` puts diffusers' attention back everywhere (the
patched forwards work with any processor); ``set_default_attn_processor`` refuses, as diffusers does
for every model holding a processor class of its own lists.
"""
import functools
import importlib
import logging
import warnings

import torch.nn.functional as F
from torch import nn

from hbkernels import checks
from hbkernels import nn as hbnn
from hbkernels.ops.layout import residual_add, tokens_to_video
from hbkernels.ops.temporal_attention import MAX_HEAD_DIM, temporal_attention

logger = logging.getLogger(__name__)

__all__ = ["TemporalAttnProcessor", "apply_to"]


def _find(module: str, name: str):
    """A diffusers class, or None where this diffusers version (or no diffusers) lacks it."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# GroupNorm (+ SiLU)


class _TaggedSiLUGroupNorm(hbnn.GroupNorm):
    """GroupNorm with SiLU fused, marking its output so the owner's :class:`_SiLUUnlessFused`
    passes exactly that tensor through. The owner's forward stays diffusers' own: the SiLU module
    is also applied to other tensors (``ResnetBlock2D`` runs it on ``temb``), so it cannot simply
    become an identity."""

    def forward(self, x, shift=None):
        # hooks get the norm's output, as unpatched, the SiLU coming after (the norm's own, and its SiLU's)
        if hbnn.runs_hooks(self) or not self._silu_follows():
            return self._norm(x, shift, None)
        out = self._norm(x, shift, "silu")
        out._hbkernels_silu_applied = True
        return out

    def _silu_follows(self) -> bool:
        """Whether the owner still applies this norm's SiLU, as it is: not replaced (say by another
        activation, which would then run on a SiLU'd output), and running no hooks (their input is the
        norm's output; a pre-hook's new tensor would lose the mark and take SiLU twice)."""
        silu, owner, key = self._silu_at
        current = owner[key] if isinstance(key, int) else getattr(owner, key, None)
        return current is silu and not hbnn.runs_hooks(silu)


class _SiLUUnlessFused(nn.SiLU):
    """SiLU, except on a tensor that a fused GroupNorm+SiLU just produced."""

    def follows(self, norm: _TaggedSiLUGroupNorm, owner: nn.Module, key) -> "_SiLUUnlessFused":
        """Tells ``norm`` that this SiLU, at ``owner``'s attribute (or index) ``key``, is applied to its
        output."""
        # plain attributes, not submodules: the model's module tree and state_dict stay diffusers'
        object.__setattr__(norm, "_silu_at", (self, owner, key))
        return self

    def forward(self, x):
        return x if getattr(x, "_hbkernels_silu_applied", False) else F.silu(x, inplace=self.inplace)


def _silu_after_norms(module, d):
    """(activation attribute, [norm attributes]) where, in the forward of ``module``'s exact class,
    that activation runs directly on each of those norms' outputs; None for other modules."""
    cls = type(module)
    if cls is d["ResnetBlock2D"]:
        # norm2 feeds the activation directly only in "default" mode ("scale_shift" modulates first)
        return "nonlinearity", ["norm1"] + (["norm2"] if module.time_embedding_norm == "default" else [])
    if cls is d["TemporalResnetBlock"]:
        return "nonlinearity", ["norm1", "norm2"]
    if cls in d["unets"]:
        return "conv_act", ["conv_norm_out"]
    return None


def _unhooked(module, cls, hooked: list) -> bool:
    """``module`` is exactly a ``cls`` and runs no hooks; a hooked one is noted in ``hooked``, not patched:
    its hooks wrap the forward it has, which a copy would run instead of the patched one."""
    if type(module) is not cls:
        return False
    if hbnn.runs_hooks(module):
        hooked.append(module)
        return False
    return True


def _fuse_silu(model, d, hooked: list) -> None:
    for owner in list(model.modules()):
        if type(owner) is nn.Sequential:
            # the order is the data flow: a GroupNorm then a SiLU fuse, the SiLU passing the fused output on
            for i in range(len(owner) - 1):
                if _unhooked(owner[i], nn.GroupNorm, hooked) and _unhooked(owner[i + 1], nn.SiLU, hooked):
                    owner[i] = _TaggedSiLUGroupNorm.from_torch(owner[i], activation="silu")
                    owner[i + 1] = _SiLUUnlessFused(inplace=owner[i + 1].inplace).follows(owner[i], owner, i + 1)
            continue
        found = _silu_after_norms(owner, d)
        if found is None or not _unhooked(getattr(owner, found[0], None), nn.SiLU, hooked):
            continue  # only SiLU (diffusers' "silu"/"swish") is fused
        act_name, norm_names = found
        norm_names = [n for n in norm_names if _unhooked(getattr(owner, n, None), nn.GroupNorm, hooked)]
        if norm_names:
            silu = _SiLUUnlessFused(inplace=getattr(owner, act_name).inplace)
            setattr(owner, act_name, silu)
        for name in norm_names:
            setattr(owner, name, _TaggedSiLUGroupNorm.from_torch(getattr(owner, name), activation="silu"))
            silu.follows(getattr(owner, name), owner, act_name)


def _swap_group_norms(model, hooked: list) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _unhooked(child, nn.GroupNorm, hooked):
                setattr(parent, name, hbnn.GroupNorm.from_torch(child))


def _swap_layer_norms(model, hooked: list) -> None:
    # a drop-in whatever the owner does with the output; LayerNorms over several dims keep torch's path
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _unhooked(child, nn.LayerNorm, hooked) and len(child.normalized_shape) == 1:
                setattr(parent, name, hbnn.LayerNorm.from_torch(child))


# ---------------------------------------------------------------------------------------------
# Temporal self-attention


class TemporalAttnProcessor:
    """diffusers attention processor for self-attention over frames, tokens (N, T, C).

    The ``to_q/to_k/to_v`` outputs go to :func:`hbkernels.temporal_attention` as (N, T, heads,
    head_dim) views, without the head-split copies. Calls the fast path cannot reproduce exactly
    (cross-attention, a mask, spatial/group/q-k norms, residual or rescaled output, 4D input, head
    dim over the kernel limit) run ``fallback``, the processor this one replaced.
    """

    def __init__(self, fallback=None):
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        while isinstance(fallback, TemporalAttnProcessor):  # wrapping one again wraps what it wraps
            fallback = fallback.fallback
        self.fallback = AttnProcessor2_0() if fallback is None else fallback
        # the fast path reproduces diffusers' default processors only; any other runs every call
        self._fast = type(self.fallback) in (AttnProcessor, AttnProcessor2_0)
        # AttnProcessor2_0 leaves the scale to SDPA (1/sqrt(head_dim)); AttnProcessor uses attn.scale
        self._use_attn_scale = type(self.fallback) is AttnProcessor

    def _fast_path_ok(self, attn, hidden_states, encoder_hidden_states, attention_mask) -> bool:
        q_dim = getattr(attn.to_q, "out_features", None)
        return (
            self._fast
            and encoder_hidden_states is None
            and attention_mask is None
            and hidden_states.dim() == 3
            and hidden_states.numel() > 0
            and hidden_states.dtype in checks.FLOAT_DTYPES
            and attn.spatial_norm is None
            and attn.group_norm is None
            and attn.norm_q is None
            and attn.norm_k is None
            and not attn.residual_connection
            and attn.rescale_output_factor == 1.0
            and attn.to_k is not None
            and attn.to_v is not None
            and attn.to_out is not None
            and q_dim is not None
            and q_dim % attn.heads == 0
            and q_dim // attn.heads <= MAX_HEAD_DIM
            and getattr(attn.to_k, "out_features", None) == q_dim
            and getattr(attn.to_v, "out_features", None) == q_dim
        )

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if not self._fast_path_ok(attn, hidden_states, encoder_hidden_states, attention_mask):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        n, t, _ = hidden_states.shape
        q, k, v = (proj(hidden_states) for proj in (attn.to_q, attn.to_k, attn.to_v))
        head_dim = q.shape[-1] // attn.heads
        q, k, v = (x.view(n, t, attn.heads, head_dim) for x in (q, k, v))
        # upcast_attention/upcast_softmax need nothing: the kernels keep scores and softmax in fp32
        out = temporal_attention(q, k, v, scale=attn.scale if self._use_attn_scale else None)
        out = out.reshape(n, t, attn.heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out))


def _install_attention(model, d) -> None:
    default_procs = tuple(c for c in (d["AttnProcessor"], d["AttnProcessor2_0"]) if c is not None)
    for container in list(model.modules()):
        cls = type(container)
        if getattr(cls, "_hbkernels_fused", False):  # the layout patch's subclass of the diffusers class
            cls = cls.__base__
        if cls not in d["temporal"]:
            continue
        for attn in container.modules():
            # self-attention only (cross-attention runs over text/image tokens, not frames), and
            # only over diffusers' default processors, whose semantics the fast path reproduces
            if (
                type(attn) is d["Attention"]  # a subclass may override what the fast path reimplements
                and not attn.is_cross_attention
                and not attn.only_cross_attention
                and attn.added_kv_proj_dim is None
                and type(attn.processor) in default_procs
            ):
                attn.set_processor(TemporalAttnProcessor(attn.processor))


# ---------------------------------------------------------------------------------------------
# GEGLU


def _swap_geglu(model, d, hooked: list) -> None:
    # diffusers' GEGLU always uses exact (erf) GELU, like hbkernels.geglu; the tanh variant is a
    # different class (ApproximateGELU) and is left alone.
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _unhooked(child, d["GEGLU"], hooked):
                fused = hbnn.GEGLU.__new__(hbnn.GEGLU)
                fused.__dict__.update(child.__dict__)  # the same proj and training flag
                setattr(parent, name, fused)


# ---------------------------------------------------------------------------------------------
# Temporal transformer layout (norm -> tokens, tokens -> video + residual)


def _temporal_tokens_forward(self, hidden_states, encoder_hidden_states, timestep, class_labels, num_frames,
                             cross_attention_kwargs):
    """The forward of diffusers' ``TransformerTemporalModel`` / ``AnimateDiffTransformer3D`` with
    the norm writing tokens (B*H*W, T, C) directly and the output permute fused with the residual
    add, saving two full copies of the activation."""
    batch_frames, channels, height, width = hidden_states.shape
    # (B, C, T, H, W) view of the (B*T, C, H, W) input: the norm's input and the residual
    video = hidden_states.reshape(batch_frames // num_frames, num_frames, channels, height, width)
    video = video.permute(0, 2, 1, 3, 4)
    tokens = self.proj_in(hbnn.norm_to_tokens(self.norm, video))
    for block in self.transformer_blocks:
        tokens = block(
            tokens,
            encoder_hidden_states=encoder_hidden_states,
            timestep=timestep,
            cross_attention_kwargs=cross_attention_kwargs,
            class_labels=class_labels,
        )
    tokens = self.proj_out(tokens)
    if tokens.dtype == video.dtype:
        # the sum takes the residual's (B, T, C, H, W) memory order, so this reshape is a view
        out = tokens_to_video(tokens, video)
    else:  # autocast's low-precision projection and a float32 input: the add promotes, as diffusers' does
        out = tokens_to_video(tokens, shape=video.shape) + video
    return out.permute(0, 2, 1, 3, 4).reshape(batch_frames, channels, height, width)


def _transformer_temporal_forward(self, hidden_states, encoder_hidden_states=None, timestep=None, class_labels=None,
                                  num_frames=1, cross_attention_kwargs=None, return_dict=True):
    out = _temporal_tokens_forward(self, hidden_states, encoder_hidden_states, timestep, class_labels, num_frames,
                                   cross_attention_kwargs)
    if not return_dict:
        return (out,)
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModelOutput

    return TransformerTemporalModelOutput(sample=out)


def _animatediff_forward(self, hidden_states, encoder_hidden_states=None, timestep=None, class_labels=None,
                         num_frames=1, cross_attention_kwargs=None):
    return _temporal_tokens_forward(self, hidden_states, encoder_hidden_states, timestep, class_labels, num_frames,
                                    cross_attention_kwargs)


def _resnet_forward(self, input_tensor, temb, *args, **kwargs):
    """diffusers' ``ResnetBlock2D`` in "default" time-embedding mode, with the embedding (and conv1's
    bias) added inside norm2 (GroupNorm of h + shift per sample and channel) instead of by broadcast
    adds over h, and conv2's bias inside the residual add (without output rescaling).
    Configurations outside that path (resampling, no embedding, a torch norm2, the deprecated
    ``scale`` argument) run diffusers' own forward."""
    if (args or kwargs or temb is None or self.time_emb_proj is None or self.upsample is not None
            or self.downsample is not None or not isinstance(self.norm2, hbnn.GroupNorm)
            or hbnn.runs_hooks(self.norm2)):  # its hooks must see (and may replace) h + temb
        return super(type(self), self).forward(input_tensor, temb, *args, **kwargs)
    h, bias = hbnn.conv_deferring_bias(self.conv1, self.nonlinearity(self.norm1(input_tensor)))
    emb = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))
    if bias is not None:  # conv1's bias rides in the shift too
        emb = emb + bias
    if emb.shape[0] == 1:  # one embedding for the whole batch, broadcast as diffusers' add would
        emb = emb.expand(h.shape[0], -1)
    h = self.dropout(self.nonlinearity(self.norm2(h, shift=emb)))
    shortcut = input_tensor
    if self.conv_shortcut is not None:  # contiguous in training, as diffusers (DDP gradient strides)
        shortcut = self.conv_shortcut(input_tensor.contiguous() if self.training else input_tensor)
    if self.output_scale_factor != 1:
        return (shortcut + self.conv2(h)) / self.output_scale_factor
    h, bias = hbnn.conv_deferring_bias(self.conv2, h)
    if h.dtype != shortcut.dtype:  # autocast's low-precision conv and a float32 input: the add promotes
        return shortcut + (h if bias is None else h + bias.to(h.dtype).view(-1, 1, 1))
    return residual_add(h, shortcut, bias)  # conv2's bias in the residual add's pass


# the modules whose forward is replaced: name -> (module, forward); the temporal transformers'
# is _temporal_tokens_forward
_FUSED_FORWARDS = {
    "TransformerTemporalModel": ("diffusers.models.transformers.transformer_temporal", _transformer_temporal_forward),
    "AnimateDiffTransformer3D": ("diffusers.models.unets.unet_motion_model", _animatediff_forward),
    "ResnetBlock2D": ("diffusers.models.resnet", _resnet_forward),
}
_TEMPORAL_LAYOUTS = ("TransformerTemporalModel", "AnimateDiffTransformer3D")


@functools.lru_cache(None)
def _fused_class(name: str):
    """The diffusers class ``name`` with the fused forward: swapped in as the instance's class (not
    an instance attribute), so hooks that wrap ``module.forward`` keep working and isinstance
    checks against the diffusers class still hold."""
    module, forward = _FUSED_FORWARDS[name]
    base = _find(module, name)
    if base is None:
        return None
    return type(name, (base,), {"forward": forward, "__module__": __name__, "_hbkernels_fused": True})


def __getattr__(name: str):
    # pickle finds the fused classes here by name, also in a process that never called apply_to
    if name in _FUSED_FORWARDS and _fused_class(name) is not None:
        return _fused_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _use_fused_class(module, name: str) -> None:
    # A removed hook (accelerate, diffusers) leaves the class's forward bound on the instance, which
    # would shadow the fused class's: gone, since it is the forward the class itself gives
    vars(module).pop("forward", None)
    module.__class__ = _fused_class(name)


def _swap_layout(model, d, hooked: list) -> None:
    for module in model.modules():
        name = type(module).__name__
        if (
            name in _TEMPORAL_LAYOUTS
            and type(getattr(module, "norm", None)) in (nn.GroupNorm, hbnn.GroupNorm)  # not a subclass's forward
            and _unhooked(module, d[name], hooked)
        ):
            _use_fused_class(module, name)


def _swap_time_embedding(model, d, hooked: list) -> None:
    for module in model.modules():
        # the fused forward needs a time embedding, no resampling and norm2 to be hbkernels' GroupNorm
        # (which takes the shift); otherwise it would only ever take its unfused path, yet count as fused
        if type(module) is d["ResnetBlock2D"] and module.time_embedding_norm == "default" \
                and module.time_emb_proj is not None and module.upsample is None and module.downsample is None \
                and isinstance(module.norm2, hbnn.GroupNorm) and _unhooked(module, d["ResnetBlock2D"], hooked):
            _use_fused_class(module, "ResnetBlock2D")


# ---------------------------------------------------------------------------------------------


def _diffusers_classes() -> dict:
    c = {
        "ResnetBlock2D": _find("diffusers.models.resnet", "ResnetBlock2D"),
        "TemporalResnetBlock": _find("diffusers.models.resnet", "TemporalResnetBlock"),
        "Attention": _find("diffusers.models.attention_processor", "Attention"),
        "AttnProcessor": _find("diffusers.models.attention_processor", "AttnProcessor"),
        "AttnProcessor2_0": _find("diffusers.models.attention_processor", "AttnProcessor2_0"),
        "GEGLU": _find("diffusers.models.activations", "GEGLU"),
        "TransformerTemporalModel": _find("diffusers.models.transformers.transformer_temporal",
                                          "TransformerTemporalModel"),
        "AnimateDiffTransformer3D": _find("diffusers.models.unets.unet_motion_model", "AnimateDiffTransformer3D"),
    }
    # U-Nets whose forward runs conv_act directly on conv_norm_out's output
    c["unets"] = {
        _find("diffusers.models.unets.unet_2d_condition", "UNet2DConditionModel"),
        _find("diffusers.models.unets.unet_3d_condition", "UNet3DConditionModel"),
        _find("diffusers.models.unets.unet_motion_model", "UNetMotionModel"),
        _find("diffusers.models.unets.unet_spatio_temporal_condition", "UNetSpatioTemporalConditionModel"),
        _find("diffusers.models.unets.unet_i2vgen_xl", "I2VGenXLUNet"),
    } - {None}
    # modules whose attention runs over (batch * pixels, frames, channels) tokens
    c["temporal"] = {
        c["TransformerTemporalModel"],
        c["AnimateDiffTransformer3D"],
        _find("diffusers.models.attention", "TemporalBasicTransformerBlock"),
        _find("diffusers.models.unets.unet_i2vgen_xl", "I2VGenXLTransformerTemporalEncoder"),
    } - {None}
    return c


def _summary(model) -> dict:
    s = {"group_norm": 0, "group_norm_silu": 0, "layer_norm": 0, "temporal_attention": 0, "geglu": 0,
         "temporal_layout": 0, "time_embedding": 0}
    for m in model.modules():
        if isinstance(m, hbnn.LayerNorm):
            s["layer_norm"] += 1
        elif isinstance(m, hbnn.GroupNorm):
            s["group_norm"] += 1
            s["group_norm_silu"] += m.activation == "silu"
        elif isinstance(m, hbnn.GEGLU):
            s["geglu"] += 1
        elif isinstance(getattr(m, "processor", None), TemporalAttnProcessor):
            s["temporal_attention"] += 1
        if getattr(type(m), "_hbkernels_fused", False):
            s["time_embedding" if type(m).__name__ == "ResnetBlock2D" else "temporal_layout"] += 1
    return s


def apply_to(model: nn.Module, *, group_norm: bool = True, layer_norm: bool = True, attention: bool = True,
             geglu: bool = True, layout: bool = True, time_embedding: bool = True) -> nn.Module:
    """Patch ``model`` (a diffusers video U-Net or any module holding the pieces) in place to run
    on hbkernels, with unchanged parameters and state_dict keys; returns ``model``.

    ``group_norm``: GroupNorms to :class:`hbkernels.nn.GroupNorm`, fusing the SiLU that follows.
    ``layer_norm``: LayerNorms over the last dim to :class:`hbkernels.nn.LayerNorm`.
    ``attention``: temporal self-attention to :class:`TemporalAttnProcessor`.
    ``geglu``: diffusers ``GEGLU`` to :class:`hbkernels.nn.GEGLU`.
    ``layout``: temporal transformers' norm->tokens and tokens->video+residual fusions.
    ``time_embedding``: ResnetBlock2D's time-embedding add fused into norm2 (needs ``group_norm``).

    Idempotent. ``model._hbkernels_patched`` counts the hbkernels pieces now in the model
    (``group_norm``, ``group_norm_silu``, ``layer_norm``, ``temporal_attention``, ``geglu``,
    ``temporal_layout``, ``time_embedding``);
    a warning says when there were none.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    d = _diffusers_classes()
    hooked = []
    if group_norm:
        _fuse_silu(model, d, hooked)
        _swap_group_norms(model, hooked)
    if layer_norm:
        _swap_layer_norms(model, hooked)
    if attention and d["Attention"] is not None:
        _install_attention(model, d)
    if geglu and d["GEGLU"] is not None:
        _swap_geglu(model, d, hooked)
    if layout:
        _swap_layout(model, d, hooked)
    if time_embedding and d["ResnetBlock2D"] is not None:
        _swap_time_embedding(model, d, hooked)
    summary = _summary(model)
    model._hbkernels_patched = summary
    if hooked:  # a module is met by several of the swaps above: counted once
        warnings.warn(f"hbkernels.apply_to: left {len({id(m) for m in hooked})} modules that already run hooks "
                      "(accelerate's offload, diffusers' layerwise casting or group offload) unpatched; call "
                      "apply_to before adding hooks", RuntimeWarning, stacklevel=2)
    if not any(summary.values()):
        warnings.warn(f"hbkernels.apply_to: found nothing to patch in {type(model).__name__}", RuntimeWarning,
                      stacklevel=2)
    else:
        logger.info("hbkernels.apply_to(%s): %s", type(model).__name__, summary)
    return model
