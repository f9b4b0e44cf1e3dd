"""VideoCrafter2's 3D U-Net and Hummingbird's depth-pruned variants, as a diffusers model.

Activations live as frames (B*T, C, H, W), as in VideoCrafter2, so spatial layers are ordinary 2D
layers. Temporal layers look at the same memory through a (B, C, T, H, W) *view*
(``frames.view(B, T, C, H, W).transpose(1, 2)``): hbkernels' GroupNorm and layout ops read and write
that strided view directly, so the temporal transformer makes no permute copies.

Parameter names follow VideoCrafter2 (``input_blocks.N.M...``, ``middle_block``, ``output_blocks``,
``time_embed``, ``fps_embedding``, ``init_attn``, ``out``), so an original checkpoint loads after
stripping ``model.diffusion_model.``; the one rename is VideoCrafter2's misspelt ``temopral_conv``
-> ``temporal_conv`` (see :mod:`hummingbird.convert`). Sequential indices are kept too: where
hbkernels fuses the SiLU into the GroupNorm, the SiLU's slot holds an ``nn.Identity``.

Attention: spatial self- and cross-attention are diffusers ``Attention`` modules (SDPA by default),
swappable through ``attn_processors`` / ``set_attn_processor``. Temporal attention always runs on
``hbkernels.temporal_attention``; choose its backend with ``HBKERNELS_BACKEND`` or
``hbkernels.use_backend``.
"""
import contextlib
import inspect
import math
import numbers
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, _chunked_feed_forward
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

import hbkernels
from hbkernels import residual_add
from hbkernels.nn import (GEGLU, FusedLinear, GroupNorm, LayerNorm, TemporalAttention, conv_deferring_bias, fusable,
                          norm_to_tokens, runs_hooks)


class _FusedAttnProcessor(FusedAttnProcessor2_0):
    """diffusers' fused processor while the attention's projections are still the layers it fused; once
    one has been replaced (a peft LoRA layer wrapping it), the processor the attention had before
    fusion, which calls them: the fused weights would leave the adapter out."""

    def __init__(self, unfused):
        super().__init__()
        self.unfused = unfused

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if attn.is_cross_attention:
            fused = attn.to_kv.fuses(attn.to_k, attn.to_v)
        else:
            fused = attn.to_qkv.fuses(attn.to_q, attn.to_k, attn.to_v)
        call = super().__call__ if fused else self.unfused
        return call(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise (VideoCrafter2 starts residual branches and the output head at zero)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def frames_as_video(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B*T, C, H, W) frames -> a (B, C, T, H, W) view of the same memory."""
    bt, c, h, w = x.shape
    return x.view(bt // num_frames, num_frames, c, h, w).transpose(1, 2)


def video_as_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W); free for a :func:`frames_as_video` view, else one copy."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def guidance_scale_embedding(w: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """The ``timestep_cond`` Hummingbird/T2V-Turbo feed ``time_cond_proj``: LCM's sinusoidal embedding
    (sin first, frequencies 10000^(-i/(dim/2 - 1))) of guidance scale w * 1000. w: (B,) -> (B, dim).

    Computed in LCM's order of operations: with arguments up to ~10^4 radians, another order changes
    the embedding by ~1e-4."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    args = (w.float() * 1000.0)[:, None] * freqs[None]
    return F.pad(torch.cat([args.sin(), args.cos()], dim=1), (0, dim % 2))


class PointwiseConv1d(nn.Conv1d):
    """A kernel-size-1 ``nn.Conv1d`` (the init attention's projections in VideoCrafter2, so its
    checkpoints load unchanged) applied to channel-last tokens (..., C) as the Linear it is."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, **kwargs):
        # nn.Conv1d's signature, as code that builds a layer like this one calls it (peft's LoRA A and B:
        # type(layer)(in, rank, kernel_size, stride, padding, bias=False)); as a Linear only pointwise
        for name, value in dict(kernel_size=kernel_size, stride=stride, dilation=dilation, groups=groups).items():
            if value not in (1, (1,)):
                raise ValueError(f"PointwiseConv1d: {name} must be 1, got {value!r}")
        if padding not in (0, (0,)):
            raise ValueError(f"PointwiseConv1d: padding must be 0, got {padding!r}")
        super().__init__(in_channels, out_channels, 1, bias=bias, **kwargs)

    def forward(self, x):
        return F.linear(x, self.weight.squeeze(-1), self.bias)


class FeedForward(nn.Module):
    """GEGLU feed-forward, 4x wide; ``net`` = [GEGLU, Dropout, Linear] as in VideoCrafter2."""

    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """x += attn1(LN x); x += attn2(LN x); x += FF(LN x).

    Spatial blocks: attn1 attends over the pixels of a frame, attn2 to the text (context).
    Temporal blocks: attn1 and attn2 are both self-attention over the frames of a pixel.
    """

    def __init__(self, dim, heads, dim_head, context_dim=None, temporal=False, dropout=0.0):
        super().__init__()
        if temporal:
            self.attn1 = TemporalAttention(dim, heads, dim_head, dropout=dropout)
            self.attn2 = TemporalAttention(dim, heads, dim_head, dropout=dropout)
        else:
            self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, dropout=dropout)
            self.attn2 = Attention(dim, cross_attention_dim=context_dim, heads=heads, dim_head=dim_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout)
        self.norm1, self.norm2, self.norm3 = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)
        self._chunk_size, self._chunk_dim = None, 0

    def set_chunk_feed_forward(self, chunk_size, dim=0):
        """Run the feed-forward in slices of ``chunk_size`` along ``dim`` (diffusers' convention)."""
        self._chunk_size, self._chunk_dim = chunk_size, dim

    def forward(self, x, context=None):
        # norm2 / norm3 take each residual add into their own pass: h = LN(x + f(x)), x + f(x) kept
        h, x = self.norm2(self.attn1(self.norm1(x)), residual=x)
        if context is None:
            h, x = self.norm3(self.attn2(h), residual=x)
        else:
            # All frames of a video attend to the same text: fold the frames into the query sequence
            # ((B*T, L, C) -> (B, T*L, C), a free view) rather than repeating the context T times.
            bt, seq, c = x.shape
            b = context.shape[0]
            out = self.attn2(h.view(b, bt // b * seq, c), encoder_hidden_states=context)
            h, x = self.norm3(out.view(bt, seq, c), residual=x)
        if self._chunk_size:
            h = _chunked_feed_forward(self.ff, h, self._chunk_dim, self._chunk_size)
        else:
            h = self.ff(h)
        return h + x


class SpatialTransformer(nn.Module):
    """Per frame: GN (eps 1e-6) -> tokens (B*T, H*W, C) -> Linear in -> blocks -> zero-init Linear out -> + x."""

    def __init__(self, channels, heads, dim_head, depth, context_dim, groups, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout=dropout) for _ in range(depth)
        )
        self.proj_out = _zero(nn.Linear(inner, channels))

    def forward(self, x, context):
        bt, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(bt, h * w, c))
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        tokens = self.proj_out(tokens)
        return x + tokens.view(bt, h, w, c).permute(0, 3, 1, 2)


class TemporalTransformer(nn.Module):
    """Per pixel: GN (eps 1e-6, statistics over all frames) -> tokens (B*H*W, T, C) -> proj in ->
    self-attention-only blocks -> zero-init proj out -> back to video + x.

    The norm + layout change and the layout change + residual are one hbkernels pass each.
    ``conv_proj`` gives the projections Conv1d parameter shapes (VideoCrafter2's init attention).
    """

    def __init__(self, channels, heads, dim_head, depth, groups, dropout=0.0, conv_proj=False):
        super().__init__()
        inner = heads * dim_head
        proj = PointwiseConv1d if conv_proj else nn.Linear
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, temporal=True, dropout=dropout) for _ in range(depth)
        )
        self.proj_out = _zero(proj(inner, channels))

    def forward(self, x, num_frames):
        video = frames_as_video(x, num_frames)
        tokens = self.proj_in(norm_to_tokens(self.norm, video))
        for block in self.transformer_blocks:
            tokens = block(tokens)
        tokens = self.proj_out(tokens)
        # The result takes the residual's memory layout, i.e. frames again: the reshape is free.
        return video_as_frames(hbkernels.tokens_to_video(tokens, residual=video))


def _norm_conv(layer: nn.Sequential, h, shift=None, defer_bias=False):
    """(output, deferred conv bias or None) of a [GroupNorm(+SiLU), Identity, (Dropout), conv] layer,
    the norm adding ``shift``; with defer_bias the conv's bias is left for the caller to fold into the
    next norm's shift (see :func:`hbkernels.nn.conv_deferring_bias`)."""
    h = layer[0](h, shift=shift)
    for module in layer[1:-1]:
        h = module(h)
    if defer_bias:
        return conv_deferring_bias(layer[-1], h)
    return layer[-1](h), None


class TemporalConvBlock(nn.Module):
    """4 x [GN -> SiLU -> (Dropout) -> Conv3d (3,1,1)] over (B, C, T, H, W); last conv zero-init; + x.
    The first three convs' biases are added by the following GroupNorm (its shift), the last one's by
    the residual add."""

    def __init__(self, channels, groups, dropout):
        super().__init__()

        def layer(with_dropout):
            norm = [GroupNorm(groups, channels, activation="silu"), nn.Identity()]  # Identity: fused SiLU
            drop = [nn.Dropout(dropout)] if with_dropout else []
            return nn.Sequential(*norm, *drop, nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))

        self.conv1, self.conv2, self.conv3, self.conv4 = layer(False), layer(True), layer(True), layer(True)
        _zero(self.conv4[-1])

    def forward(self, x, num_frames):
        video = frames_as_video(x, num_frames)
        h, shift = video, None
        for layer in (self.conv1, self.conv2, self.conv3):  # each conv's bias goes into the next norm
            h, bias = _norm_conv(layer, h, shift, defer_bias=True)
            shift = None if bias is None else bias.expand(h.shape[0], -1)
        h, bias = _norm_conv(self.conv4, h, shift, defer_bias=True)
        # the last one's into the residual add, written in x's frame-major layout (a free view back)
        return video_as_frames(residual_add(h, video, bias))


class ResBlock(nn.Module):
    """GN+SiLU -> conv3x3 -> + time embedding -> GN+SiLU -> Dropout -> zero-init conv3x3 -> + skip,
    then the temporal convolution block. The embedding and the first conv's bias are added by the
    second GroupNorm (its shift); the second conv's and the skip conv's biases by the residual add."""

    def __init__(self, channels, emb_channels, out_channels, dropout, groups, temporal_dropout):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm(groups, channels, activation="silu"), nn.Identity(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm(groups, out_channels, activation="silu"),
            nn.Identity(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        self.temporal_conv = TemporalConvBlock(out_channels, groups, temporal_dropout)

    def forward(self, x, emb, num_frames):
        # out_layers' GroupNorm adds the time embedding and in_layers' conv bias itself: no
        # broadcast-add pass over h
        h, bias = _norm_conv(self.in_layers, x, defer_bias=True)
        shift = self.emb_layers(emb)
        h, bias = _norm_conv(self.out_layers, h, shift if bias is None else shift + bias, defer_bias=True)
        skip, skip_bias = (x, None) if isinstance(self.skip_connection, nn.Identity) else \
            conv_deferring_bias(self.skip_connection, x)
        biases = [b for b in (bias, skip_bias) if b is not None]  # both convs' ride in the residual add
        h = residual_add(h, skip, sum(biases) if biases else None)
        return self.temporal_conv(h, num_frames)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNetBlock(nn.Sequential):
    """One U-Net stage (VideoCrafter2's TimestepEmbedSequential): gives each layer the inputs it takes."""

    def forward(self, x, emb, context, num_frames):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, num_frames)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, TemporalTransformer):
                x = layer(x, num_frames)
            else:
                x = layer(x)
        return x


def _embedding_mlp(dim, out_dim):
    return nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


@dataclass
class HummingbirdUNet3DOutput(BaseOutput):
    """sample: (B, out_channels, T, H, W), the predicted noise."""

    sample: torch.Tensor


class HummingbirdUNet3DModel(ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin):
    """VideoCrafter2's text-to-video U-Net; with ``num_res_blocks=1`` (and optionally no middle block)
    Hummingbird's pruned students. Named configurations: :meth:`from_named_config`.

    ``enable_gradient_checkpointing()`` checkpoints each U-Net stage; ``enable_forward_chunking()``
    runs the transformer feed-forwards in slices to cap their activation memory;
    ``enable_channels_last()`` keeps activations channels-last (faster convolutions on GPUs);
    ``fuse_qkv_projections()`` computes each attention's projections of one input with one GEMM.
    LoRA through diffusers' ``PeftAdapterMixin`` (peft installed): ``add_adapter``, ``set_adapters``,
    ``disable_adapters``, ``save_lora_adapter`` / ``load_lora_adapter``.

    ``weights_version`` counts the switches that replace tensors the forward reads (layouts, fused
    projections), so that holders of captured CUDA graphs know to recapture.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 4,
        model_channels: int = 320,
        channel_mult: tuple = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_levels: tuple = (0, 1, 2),
        attention_head_dim: int = 64,
        context_dim: int = 1024,
        transformer_depth: int = 1,
        temporal_transformer_depth: int = 1,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        temporal_conv_dropout: float = 0.1,
        init_attn_heads: int = 8,
        fps_cond: bool = True,
        use_middle_block: bool = True,
        time_cond_proj_dim: int | None = None,
        default_fps: int = 16,
    ):
        super().__init__()
        emb_dim = model_channels * 4
        groups, head_dim = norm_num_groups, attention_head_dim
        self.time_embed = _embedding_mlp(model_channels, emb_dim)
        self.fps_embedding = _embedding_mlp(model_channels, emb_dim) if fps_cond else None
        self.time_cond_proj = nn.Linear(time_cond_proj_dim, model_channels, bias=False) if time_cond_proj_dim else None

        def res(cin, cout):
            return ResBlock(cin, emb_dim, cout, dropout, groups, temporal_conv_dropout)

        def attention(ch):
            heads = ch // head_dim
            return [
                SpatialTransformer(ch, heads, head_dim, transformer_depth, context_dim, groups, dropout),
                TemporalTransformer(ch, heads, head_dim, temporal_transformer_depth, groups, dropout),
            ]

        self.input_blocks = nn.ModuleList([UNetBlock(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        # VideoCrafter2's "addition_attention": a temporal transformer right after conv_in.
        self.init_attn = None
        if init_attn_heads:
            self.init_attn = UNetBlock(
                TemporalTransformer(model_channels, init_attn_heads, head_dim, transformer_depth, groups, dropout, conv_proj=True)
            )
        skip_channels, ch = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if level in attention_levels:
                    layers += attention(ch)
                self.input_blocks.append(UNetBlock(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(UNetBlock(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = UNetBlock(res(ch, ch), *attention(ch), res(ch, ch)) if use_middle_block else None

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if level in attention_levels:
                    layers += attention(ch)
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(UNetBlock(*layers))

        self.out = nn.Sequential(
            GroupNorm(groups, ch, activation="silu"), nn.Identity(), _zero(nn.Conv2d(ch, out_channels, 3, padding=1))
        )
        self.gradient_checkpointing = False
        self.channels_last = False
        self.fused_qkv = False
        self.weights_version = 0
        self._unfused_processors = None

    def save_pretrained(self, save_directory, *args, variant=None, **kwargs):
        """diffusers' ``save_pretrained``, first removing an index an earlier sharded save of this variant
        left: diffusers keeps it, and loading follows it to shards an unsharded save removed, or (after
        a failed sharded save) to a mix of old and new shards."""
        from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME, _add_variant

        for name in (SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_INDEX_NAME) if kwargs.get("is_main_process", True) else ():
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.remove(os.path.join(save_directory, _add_variant(name, variant)))
        return super().save_pretrained(save_directory, *args, variant=variant, **kwargs)

    # diffusers' pipelines pass safe_serialization, variant and max_shard_size only to a save_pretrained
    # whose signature names them
    save_pretrained.__signature__ = inspect.signature(ModelMixin.save_pretrained)

    @classmethod
    def from_named_config(cls, name: str, **overrides) -> "HummingbirdUNet3DModel":
        """A randomly initialised model of a named configuration (hummingbird.models.configs.CONFIGS)."""
        from hummingbird.models.configs import CONFIGS

        if name not in CONFIGS:
            raise ValueError(f"unknown config {name!r}; named configs: {sorted(CONFIGS)}")
        # from_config would only log a misspelt override and build the model without it
        unknown = sorted(set(overrides) - set(inspect.signature(cls.__init__).parameters) - {"self"})
        if unknown:
            raise TypeError(f"from_named_config: unknown config arguments {', '.join(unknown)}")
        return cls.from_config({**CONFIGS[name], **overrides})

    @classmethod
    def from_single_file(cls, path, config=None, *, strict=True, torch_dtype=None, extract_ema=False):
        """Load an original VideoCrafter2 / Hummingbird checkpoint (.ckpt/.pt/.pth/.safetensors, or a
        released whole-model pickle, read without running its code). ``config``: a named config, a
        dict, or a path to a config.json (or a folder holding one); None (the default) detects the named
        config the weights fit, as ``hummingbird convert`` does. ``torch_dtype``: a floating-point torch
        dtype or "fp32"/"fp16"/"bf16" to cast to. ``extract_ema``: the EMA weights of a training checkpoint
        (``model_ema.*``) in place of the raw ones. See :mod:`hummingbird.convert`."""
        from hummingbird.convert import load_checkpoint, resolve_config, resolve_dtype, unet_from_checkpoint

        # checked before reading what may be gigabytes of checkpoint
        torch_dtype = resolve_dtype(torch_dtype, "torch_dtype")
        config = None if config is None else resolve_config(config)
        model = unet_from_checkpoint(load_checkpoint(path), config, strict=strict, extract_ema=extract_ema)
        # tensors of its own, cast on the way: those of a memory-mapped checkpoint would keep the file
        # mapped, and rewriting it (saving back to the same path) would then kill the process (SIGBUS)
        return model._apply(lambda t: t.to(torch_dtype, copy=True) if torch_dtype and t.is_floating_point()
                            else t.clone())

    @staticmethod
    def _per_sample(value, batch: int, device) -> torch.Tensor:
        """A number, a 0-d, (1,) or (B,) tensor -> a (B,) tensor."""
        # Numbers (NumPy scalars too) become a fill on the device, not a host-to-device copy, which a
        # CUDA-graph capture refuses
        if isinstance(value, numbers.Number):
            v = torch.full((1,), value, device=device)
        else:
            v = torch.as_tensor(value, device=device)
        if v.dim() > 1 or v.numel() not in (1, batch):
            raise ValueError(f"expected a scalar or {batch} values (one per sample), got shape {tuple(v.shape)}")
        return v.reshape(-1).expand(batch)

    def _run(self, block, h, emb, context, num_frames):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, h, emb, context, num_frames)
        return block(h, emb, context, num_frames)

    def forward(self, sample, timestep, encoder_hidden_states, fps=None, timestep_cond=None, return_dict=True):
        """sample (B, C, T, H, W) latents (any T; H, W divisible by 2 ** (levels - 1): 8 for 4 levels);
        timestep an int, a 0-d or (B,) tensor; encoder_hidden_states (B, L, context_dim) text
        embeddings; fps frames per second (VideoCrafter2's default 16 when None); timestep_cond
        (B, time_cond_proj_dim), e.g. :func:`guidance_scale_embedding` of the guidance scale, for models
        with time_cond_proj.
        Returns :class:`HummingbirdUNet3DOutput`, or ``(sample,)`` when ``return_dict=False``."""
        cfg = self.config
        if sample.dim() != 5 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample must be (B, C={cfg.in_channels}, T, H, W), got shape {tuple(sample.shape)}")
        b, _, t, height, width = sample.shape
        down = 2 ** (len(cfg.channel_mult) - 1)  # the skip connections need every level's size to halve exactly
        if height % down or width % down:
            raise ValueError(f"sample's H and W must be multiples of {down}, got {height}x{width}")
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != b \
                or encoder_hidden_states.shape[2] != cfg.context_dim:
            raise ValueError(f"encoder_hidden_states must be (B={b}, L, context_dim={cfg.context_dim}), "
                             f"got shape {tuple(encoder_hidden_states.shape)}")
        if timestep_cond is not None and self.time_cond_proj is not None \
                and tuple(timestep_cond.shape) != (b, cfg.time_cond_proj_dim):
            raise ValueError(f"timestep_cond must be (B={b}, time_cond_proj_dim={cfg.time_cond_proj_dim}), "
                             f"got shape {tuple(timestep_cond.shape)}")
        # compute in the weights' dtype, unless hooks cast them around each call (diffusers' layerwise
        # casting stores fp8): then in the sample's, as diffusers' U-Nets do
        dtype = sample.dtype if runs_hooks(self.time_embed[0]) else self.time_embed[0].weight.dtype
        mc = self.config.model_channels

        def sinusoidal(values):  # as VideoCrafter2 embeds timesteps and fps: cos first, freqs 10000^(-i/half)
            v = self._per_sample(values, b, sample.device)
            return get_timestep_embedding(v, mc, flip_sin_to_cos=True, downscale_freq_shift=0).to(dtype)

        t_emb = sinusoidal(timestep)
        if timestep_cond is not None:
            if self.time_cond_proj is None:
                raise ValueError("timestep_cond was given but this model has no time_cond_proj (time_cond_proj_dim=None)")
            t_emb = t_emb + self.time_cond_proj(timestep_cond.to(dtype))
        emb = self.time_embed(t_emb)
        if self.fps_embedding is not None:
            emb = emb + self.fps_embedding(sinusoidal(self.config.default_fps if fps is None else fps))
        emb = emb.repeat_interleave(t, dim=0)  # one row per frame
        context = encoder_hidden_states.to(dtype)

        h = video_as_frames(sample.to(dtype))
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        skips = []
        for i, block in enumerate(self.input_blocks):
            h = self._run(block, h, emb, context, t)
            if i == 0 and self.init_attn is not None:
                h = self._run(self.init_attn, h, emb, context, t)
            skips.append(h)
        if self.middle_block is not None:
            h = self._run(self.middle_block, h, emb, context, t)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context, t)
        out = frames_as_video(self.out(h), t).contiguous().to(sample.dtype)
        return HummingbirdUNet3DOutput(sample=out) if return_dict else (out,)

    def enable_channels_last(self) -> None:
        """Run on channels-last activations: frames stored as (B*T, H, W, C), so that

        - cuDNN's convolutions read and write their native NHWC layout (on an H200, 0.7B at 26 frames
          spent 5.5 of 44.5 ms per step converting NCHW inputs to NHWC and back);
        - the spatial transformer's (B*T, H*W, C) tokens are a view, not a permute copy, and its
          residual add runs on dense tensors;
        - the temporal layers' (B, C, T, H, W) view is channels_last_3d, which the Conv3d (3, 1, 1)
          reads directly and hbkernels' GroupNorm and layout kernels read with unit channel stride.

        Converts the Conv2d / Conv3d weights in place (``model.to(memory_format=torch.channels_last)``
        cannot: it rejects the 5D Conv3d weights). Outputs are unchanged up to rounding and keep the
        standard layout."""
        self._set_conv_formats(torch.channels_last, torch.channels_last_3d)
        self.channels_last = True

    def disable_channels_last(self) -> None:
        self._set_conv_formats(torch.contiguous_format, torch.contiguous_format)
        self.channels_last = False

    def _set_conv_formats(self, fmt2d, fmt3d) -> None:
        self.weights_version += 1
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                fmt = fmt2d if isinstance(module, nn.Conv2d) else fmt3d
                module.weight.data = module.weight.data.contiguous(memory_format=fmt)

    def fuse_qkv_projections(self) -> None:
        """One GEMM per attention input: q, k, v of every self-attention (spatial and temporal) and k, v
        of the text cross-attentions, as diffusers' ``fuse_qkv_projections`` (the spatial attentions
        get ``FusedAttnProcessor2_0``). At 0.7B x 26 frames this reads the level-0 tokens (43 MB in
        fp16) once instead of three times in each self-attention.

        The fused weights are :class:`hbkernels.nn.FusedLinear` copies outside the state_dict
        (saving is unaffected), refreshed when the layers' weights change (calls that need gradients
        concatenate the live weights). A compiled forward cannot check: call
        :meth:`refresh_fused_projections` after changing weights (the pipeline does, each call). Replaces
        custom attention processors until :meth:`unfuse_qkv_projections`.

        Attentions whose projections are not plain linear layers (peft LoRA layers, quantised linears)
        stay unfused, with a warning; a projection replaced after fusion is called as it is, unfused."""
        if not self.fused_qkv:
            self._unfused_processors = self.attn_processors
        left = 0
        for name, module in self.named_modules():
            if not isinstance(module, (TemporalAttention, Attention)):
                continue
            cross = isinstance(module, Attention) and module.is_cross_attention
            layers = (module.to_k, module.to_v) if cross else (module.to_q, module.to_k, module.to_v)
            if not all(fusable(layer) for layer in layers):
                left += 1
            elif isinstance(module, TemporalAttention):
                module.fuse_projections()
            else:
                setattr(module, "to_kv" if cross else "to_qkv", FusedLinear(*layers))
                module.fused_projections = True
                module.set_processor(_FusedAttnProcessor(self._unfused_processors[f"{name}.processor"]))
        if left:
            warnings.warn(f"fuse_qkv_projections: {left} attention layers stay unfused: their projections are not "
                          "plain nn.Linear layers (adapters such as peft LoRA layers: merge them first to fuse)",
                          stacklevel=2)
        self.fused_qkv = True
        self.weights_version += 1

    def refresh_fused_projections(self) -> None:
        """Copies the layers' weights into the fused projections: after writes an eager forward
        cannot see (into ``.data``, as diffusers' ``EMAModel.copy_to`` does) and any a compiled one
        cannot (a load_state_dict, a merged LoRA)."""
        for module in self.modules():
            if isinstance(module, FusedLinear):
                module.refresh()

    def unfuse_qkv_projections(self) -> None:
        if not self.fused_qkv:
            return
        for module in self.modules():
            if isinstance(module, TemporalAttention):
                module.unfuse_projections()
            elif isinstance(module, Attention):
                for name in ("to_qkv", "to_kv"):
                    if isinstance(getattr(module, name, None), FusedLinear):
                        delattr(module, name)
                module.fused_projections = False
        self.set_attn_processor(self._unfused_processors)
        self._unfused_processors = None
        self.fused_qkv = False
        self.weights_version += 1

    def enable_forward_chunking(self, chunk_size: int | None = None, dim: int = 0) -> None:
        """Run every transformer feed-forward in slices of ``chunk_size`` (default 1) along ``dim``
        (0: batch, i.e. frames for spatial and pixels for temporal blocks; 1: sequence)."""
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 or 1, got {dim}")
        for module in self.modules():
            if isinstance(module, BasicTransformerBlock):
                module.set_chunk_feed_forward(chunk_size or 1, dim)

    def disable_forward_chunking(self) -> None:
        for module in self.modules():
            if isinstance(module, BasicTransformerBlock):
                module.set_chunk_feed_forward(None, 0)
