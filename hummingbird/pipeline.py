"""Text-to-video pipeline for Hummingbird (LCM, guidance distilled in) and VideoCrafter2 (DDIM + CFG).

Components, as ``save_pretrained`` writes them and ``from_pretrained`` reads them back:

- ``text_encoder``: a transformers ``CLIPTextModel``. VideoCrafter2 conditions on OpenCLIP ViT-H's
  *penultimate* layer followed by the final LayerNorm; that is exactly the ``last_hidden_state`` of
  a CLIPTextModel that stores only the first 23 of the 24 blocks (as Stable Diffusion 2.x ships it),
  so the pipeline uses ``last_hidden_state`` of whatever depth is stored.
- ``tokenizer``: ``CLIPTokenizer``, 77 tokens; longer prompts are truncated with a warning.
- ``vae``: ``AutoencoderKL`` (SD KL-f8, scaling factor 0.18215); frames are decoded as images,
  ``decode_chunk_size`` at a time.
- ``unet``: :class:`hummingbird.models.HummingbirdUNet3DModel`.
- ``scheduler``: :func:`hummingbird.schedulers.lcm_scheduler` or ``ddim_scheduler``.

Sampling mode: a U-Net with ``time_cond_proj`` (Hummingbird) has the guidance scale distilled in, so
each step is ONE U-Net call fed the guidance embedding; otherwise (VideoCrafter2) each step runs the
conditional and unconditional batches together in one call and combines them (classifier-free
guidance). With an ``LCMScheduler`` the timesteps are Hummingbird's (:func:`~hummingbird.schedulers.lcm_timesteps`).
"""
import inspect
import json
import math
import numbers
import operator
import os
import sys
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, LCMScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from hbkernels.nn import inplace_version
from hummingbird import DEFAULT_SIZE
from hummingbird.cuda_graph import CUDAGraphCall
from hummingbird.models import HummingbirdUNet3DModel, guidance_scale_embedding
from hummingbird.schedulers import DDIM_ETA, lcm_timesteps, max_inference_steps, scheduler_for

# Defaults per sampling mode. Hummingbird (guidance-distilled, LCM) as shipped: 8 steps, 26 frames, fps 8,
# w 7.5 (4 steps, timesteps [999, 759, 519, 279], is its fastest published setting). VideoCrafter2 (DDIM +
# CFG): its reference sampling, 50 steps, guidance 12, fps 28, at its training length of 16 frames.
DISTILLED_DEFAULTS = dict(num_inference_steps=8, num_frames=26, guidance_scale=7.5, fps=8)
CFG_DEFAULTS = dict(num_inference_steps=50, num_frames=16, guidance_scale=12.0, fps=28)


@dataclass
class HummingbirdPipelineOutput(BaseOutput):
    """frames: (B, F, 3, H, W) float in [0, 1] ("pt"), (B, F, H, W, 3) float32 in [0, 1] ("np", as diffusers'
    video pipelines return it, so ``diffusers.utils.export_to_video(frames[0])`` works), B lists of F
    PIL images ("pil"), or (B, 4, F, H/8, W/8) latents ("latent"). timings: seconds per stage (text_encode, denoise, decode). peak_memory_mb:
    torch.cuda.max_memory_allocated during the call on CUDA; on CPU the process's peak resident set
    size so far (ru_maxrss, not reset per call), 0 where that is unknown (Windows)."""

    frames: object
    timings: dict = field(default_factory=dict)
    peak_memory_mb: float = 0.0


def _is_adapter_layer(module) -> bool:
    """A peft tuner layer (LoRA and kin), told by what it holds, since peft is not a dependency."""
    return isinstance(getattr(module, "scaling", None), dict) and hasattr(module, "active_adapters")


def _adapter_state(layer):
    """The Python state an adapter layer's forward reads: each adapter's scale, the active, disabled
    and merged adapters."""
    return (tuple(sorted(layer.scaling.items())), tuple(layer.active_adapters),
            bool(getattr(layer, "disable_adapters", False)), tuple(getattr(layer, "merged_adapters", ())))


class HummingbirdPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Text to video with a Hummingbird (or VideoCrafter2) U-Net. LoRA as in diffusers' Stable Diffusion
    pipelines: ``load_lora_weights`` / ``save_lora_weights`` (U-Net and CLIP text encoder layers),
    ``set_adapters``, ``fuse_lora`` / ``unfuse_lora``, ``unload_lora_weights``."""

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds"]  # what callback_on_step_end may read and replace

    def __init__(self, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 unet: HummingbirdUNet3DModel, scheduler):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self._graphed_unet = None

    def enable_cuda_graph(self):
        """Run each denoising step as a replayed CUDA graph (captured at the first step of each shape),
        removing the per-kernel launch cost: a hummingbird-0.7b step at 320x512 x 26 frames on an H200
        goes from 61.5 to 44.6 ms. Costs two warm-up U-Net calls and a capture per new shape, and the
        graph's activation memory. Pipelines on the CPU keep running plain steps. Not with accelerate's
        CPU offload (it moves the weights during each call)."""
        self._check_no_offload_hooks()
        pipe = weakref.ref(self)  # not self: the pipeline holding a closure over itself is a cycle, which
        # `del pipe` does not free (its weights and graph pools stay until the garbage collector runs)

        def step(sample, timestep, context, timestep_cond, fps):
            return pipe().unet(sample, timestep, context, fps=fps, timestep_cond=timestep_cond, return_dict=False)[0]

        self._graphed_unet = CUDAGraphCall(step)

    def _check_no_offload_hooks(self):
        # accelerate's hooks (_hf_hook) and diffusers' own group offloading (_diffusers_hook)
        if any(hasattr(m, "_hf_hook") or hasattr(m, "_diffusers_hook") for m in self.unet.modules()):
            raise ValueError("CUDA graphs cannot run a U-Net under offload hooks (enable_model_cpu_offload, "
                             "enable_sequential_cpu_offload, enable_group_offload): they move its weights during "
                             "each call, and a graph replays the addresses it captured. Remove the hooks or call "
                             "disable_cuda_graph()")

    def _cuda_graph_weights_key(self):
        """What the graphs read besides their inputs, so that a change recaptures instead of replaying
        stale or freed weights: every parameter's and buffer's address, dtype and device (.to(),
        loading, LoRA merges that swap .data, added adapters), the parameters' in-place versions (a
        load_state_dict: fused projections copy the new weights in at the next capture), the U-Net's
        weights_version (layout or fusion switches, whose new tensors may reuse freed addresses) and
        the Python state of adapter layers, which a capture bakes in as constants (peft LoRA layers:
        each adapter's scale, the active, disabled and merged ones). Other Python state read while
        capturing is not in it: call disable_cuda_graph() around such changes. Once per call: a few
        thousand tensors and modules."""
        parameters = tuple((p.data_ptr(), inplace_version(p), p.dtype, p.device) for p in self.unet.parameters())
        buffers = tuple((b.data_ptr(), b.dtype, b.device) for b in self.unet.buffers())
        adapters = tuple(_adapter_state(m) for m in self.unet.modules() if _is_adapter_layer(m))
        return id(self.unet), self.unet.weights_version, parameters, buffers, adapters

    def disable_cuda_graph(self):
        self._graphed_unet = None

    def enable_channels_last(self):
        """Channels-last activations in the U-Net (``unet.enable_channels_last()``): its GPU convolutions
        then skip converting every NCHW input and output to their native NHWC. The VAE stays NCHW: with
        it channels-last, decoding 26 frames at 320x512 on an H200 went from 0.20 to 0.27 s."""
        self.unet.enable_channels_last()

    def disable_channels_last(self):
        self.unet.disable_channels_last()

    def fuse_qkv_projections(self):
        """One GEMM per attention input in the U-Net (``unet.fuse_qkv_projections()``)."""
        self.unet.fuse_qkv_projections()

    def unfuse_qkv_projections(self):
        self.unet.unfuse_qkv_projections()

    def _unet(self, sample, timestep, context, timestep_cond, fps):
        if self._graphed_unet is not None and sample.is_cuda:
            return self._graphed_unet(sample, timestep, context, timestep_cond, fps)
        return self.unet(sample, timestep, context, fps=fps, timestep_cond=timestep_cond).sample

    # what diffusers' step callbacks read and set (SDCFGCutoffCallback sets _guidance_scale to 0), as in
    # its pipelines: the values of the running or last call
    @property
    def guidance_scale(self):
        return getattr(self, "_guidance_scale", None)

    @property
    def do_classifier_free_guidance(self) -> bool:
        return not self.guidance_distilled and self.guidance_scale is not None and self.guidance_scale > 1

    @property
    def num_timesteps(self):
        return getattr(self, "_num_timesteps", None)

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` (e.g. in a step callback) to stop denoising after this step."""
        return getattr(self, "_interrupt", False)

    @property
    def guidance_distilled(self) -> bool:
        """True when the U-Net takes the guidance scale as an input (one call per step, no CFG)."""
        return self.unet.config.time_cond_proj_dim is not None

    @property
    def spatial_multiple(self) -> int:
        """Height/width must be multiples of this: the VAE's factor times the U-Net's downsamplings."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.channel_mult) - 1)

    def encode_prompt(self, prompt, device) -> torch.Tensor:
        """(prompts, 77, hidden) text embeddings of a string or a list of strings; prompts over 77 tokens
        are cut with a warning."""
        prompt = [prompt] if isinstance(prompt, str) else prompt  # a string's characters are not its prompts
        tok = self.tokenizer
        for p in prompt:
            ids = tok(p).input_ids
            if len(ids) > tok.model_max_length:  # keep <bos> + 75 tokens + <eos>
                dropped = tok.decode(ids[tok.model_max_length - 1:-1])
                warnings.warn(f"prompt is longer than {tok.model_max_length} tokens; dropped: {dropped!r}",
                              stacklevel=3)
        ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return self.text_encoder(ids.to(device)).last_hidden_state

    def decode_latents(self, latents: torch.Tensor, decode_chunk_size: int) -> torch.Tensor:
        """(B, 4, F, h, w) latents -> (B, F, 3, H, W) float32 in [0, 1], decoding frames as images."""
        b, c, f, h, w = latents.shape
        frames = latents.transpose(1, 2).reshape(b * f, c, h, w) / self.vae.config.scaling_factor
        frames = frames.to(self.vae.dtype)
        images = torch.cat([self.vae.decode(chunk).sample for chunk in frames.split(decode_chunk_size)])
        return (images.float() / 2 + 0.5).clamp(0, 1).reshape(b, f, *images.shape[1:])

    def check_inputs(self, prompt, negative_prompt, num_frames, height, width, num_inference_steps, guidance_scale,
                     fps, output_type, decode_chunk_size, prompt_embeds=None, negative_prompt_embeds=None,
                     callback_on_step_end_tensor_inputs=("latents",)):
        """Checks the arguments as __call__ was given them, its defaults filled in."""
        if prompt_embeds is None:
            if not _is_prompt(prompt):
                raise TypeError(f"prompt must be a string or a sequence of strings (or pass prompt_embeds), "
                                f"got {type(prompt).__name__}")
            if not isinstance(prompt, str) and not prompt:
                raise ValueError("prompt must be a string or a non-empty sequence of strings, got an empty one")
            num_prompts = 1 if isinstance(prompt, str) else len(prompt)
        else:
            if prompt is not None:
                raise ValueError("pass either prompt or prompt_embeds, not both")
            self._check_embeds("prompt_embeds", prompt_embeds)
            num_prompts = len(prompt_embeds)
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
        if negative_prompt is not None and not _is_prompt(negative_prompt):
            raise TypeError("negative_prompt must be None, a string or a sequence of strings, "
                            f"got {type(negative_prompt).__name__}")
        if negative_prompt is not None and not isinstance(negative_prompt, str) and len(negative_prompt) != num_prompts:
            raise ValueError(f"{len(negative_prompt)} negative prompts for {num_prompts} prompts")
        if negative_prompt_embeds is not None:
            self._check_embeds("negative_prompt_embeds", negative_prompt_embeds)
            if len(negative_prompt_embeds) != num_prompts:
                raise ValueError(f"negative_prompt_embeds holds {len(negative_prompt_embeds)} prompts, for "
                                 f"{num_prompts} prompts")
        if isinstance(callback_on_step_end_tensor_inputs, str) or not all(
                k in self._callback_tensor_inputs for k in callback_on_step_end_tensor_inputs):
            raise ValueError(f"callback_on_step_end_tensor_inputs must be a list of names from "
                             f"{self._callback_tensor_inputs}, got {callback_on_step_end_tensor_inputs!r}")
        for name, value in (("num_frames", num_frames), ("height", height), ("width", width),
                            ("num_inference_steps", num_inference_steps), ("fps", fps),
                            ("decode_chunk_size", decode_chunk_size)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        m = self.spatial_multiple
        if height % m or width % m or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {m} (the VAE's {self.vae_scale_factor} "
                             f"x the U-Net's downsampling), got {height}x{width}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if not isinstance(guidance_scale, numbers.Real) or isinstance(guidance_scale, bool):
            raise TypeError(f"guidance_scale must be a real number, got {type(guidance_scale).__name__}")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
        if fps < 1:
            raise ValueError(f"fps must be >= 1, got {fps}")
        if output_type not in ("pt", "np", "pil", "latent"):
            raise ValueError(f"output_type must be 'pt', 'np', 'pil' or 'latent', got {output_type!r}")
        if decode_chunk_size < 1:
            raise ValueError(f"decode_chunk_size must be >= 1, got {decode_chunk_size}")

    def _check_embeds(self, name, embeds):
        """Text embeddings as encode_prompt returns them: (prompts, tokens, the U-Net's context width)."""
        if not torch.is_tensor(embeds) or not embeds.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(embeds).__name__}")
        width = self.unet.config.context_dim
        if embeds.dim() != 3 or len(embeds) == 0 or embeds.shape[-1] != width:
            raise ValueError(f"{name} must have shape (prompts >= 1, tokens, {width}), got {tuple(embeds.shape)}")

    def _text_context(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, do_cfg, device):
        """The U-Net's context, [uncond, cond] with CFG: given embeddings as they are, prompts encoded
        (those of both halves in one text-encoder call)."""
        n = len(prompt) if prompt_embeds is None else len(prompt_embeds)
        parts = [prompt if prompt_embeds is None else prompt_embeds]
        if do_cfg:
            parts.insert(0, negative_prompt_embeds if negative_prompt_embeds is not None else
                         negative_prompt or [""] * n)
        texts = [t for part in parts if isinstance(part, list) for t in part]
        encoded = iter(self.encode_prompt(texts, device).split([len(p) for p in parts if isinstance(p, list)])
                       if texts else ())
        halves = [next(encoded) if isinstance(part, list) else part.to(device) for part in parts]
        if len({h.shape[1] for h in halves}) > 1:  # CFG runs both halves as one batch
            names = ["negative_prompt_embeds" if negative_prompt_embeds is not None else "negative_prompt",
                     "prompt_embeds" if prompt_embeds is not None else "prompt"]
            raise ValueError(f"{names[0]} and {names[1]} must have as many tokens for classifier-free guidance, "
                             f"got {halves[0].shape[1]} and {halves[1].shape[1]}")
        return torch.cat(halves)

    def _set_timesteps(self, num_inference_steps, device):
        if isinstance(self.scheduler, LCMScheduler):
            steps = lcm_timesteps(num_inference_steps, self.scheduler.config.original_inference_steps,
                                  self.scheduler.config.num_train_timesteps)
            self.scheduler.set_timesteps(timesteps=steps, device=device)
        else:
            most = max_inference_steps(self.scheduler.config, type(self.scheduler))
            if num_inference_steps > most:  # past it the last timestep indexes beyond the training schedule
                raise ValueError(f"num_inference_steps must be in [1, {most}] for this scheduler, got {num_inference_steps}")
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.timesteps

    def _step_kwargs(self, generator, eta):
        """Pass eta and the generator to the schedulers whose step() takes them. eta=None: DDIM's is
        VideoCrafter2's; the others keep their own (TCD's eta is its gamma, 0.3)."""
        if eta is None and isinstance(self.scheduler, DDIMScheduler):
            eta = DDIM_ETA
        wanted = {"generator": generator} if eta is None else {"generator": generator, "eta": eta}
        params = inspect.signature(self.scheduler.step).parameters
        return {k: v for k, v in wanted.items() if k in params}

    @torch.no_grad()
    def __call__(
        self,
        prompt=None,
        negative_prompt=None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        fps: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        eta: float | None = None,
        output_type: str = "np",
        decode_chunk_size: int = 8,
        return_dict: bool = True,
        num_videos_per_prompt: int = 1,
        callback_on_step_end=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        callback_on_step_end_tensor_inputs=("latents",),
    ):
        """Generate videos. ``num_inference_steps`` / ``num_frames`` / ``guidance_scale`` / ``fps`` default
        to 8 / 26 / 7.5 / 8 for a guidance-distilled U-Net (Hummingbird) and 50 / 16 / 12 / 28 otherwise
        (VideoCrafter2): :data:`DISTILLED_DEFAULTS`, :data:`CFG_DEFAULTS`.

        negative_prompt: the unconditional prompt of classifier-free guidance (default ""); a
        guidance-distilled U-Net has no unconditional branch, so it is ignored there with a warning.
        Without distillation, guidance_scale <= 1 turns classifier-free guidance off (batch B, not 2B).
        seed: shorthand for a CPU ``generator`` (the same seed gives the same noise on any device); pass
        one of the two.
        height, width: default :data:`DEFAULT_SIZE` (320 x 512).
        latents: (B, 4, F, H/8, W/8) initial noise instead of sampling it. eta: DDIM's noise weight
        (default 1.0 for DDIM, VideoCrafter2's; a swapped-in scheduler whose step takes eta keeps its own).
        num_videos_per_prompt: videos per prompt, each from its own noise (B = prompts x this).
        output_type: "np" ((B, F, H, W, 3) float32 in [0, 1], as diffusers' TextToVideoSDPipeline returns,
        ready for ``diffusers.utils.export_to_video(frames[0])``), "pt" ((B, F, 3, H, W) on the pipeline's
        device), "pil", or "latent" (the (B, 4, F, H/8, W/8) latents, not decoded).
        prompt_embeds, negative_prompt_embeds: (prompts, tokens, context width) text embeddings instead
        of prompt / negative_prompt (e.g. from :meth:`encode_prompt`, or weighted); the negative ones are
        encoded from "" where CFG needs them and they are not given.
        callback_on_step_end: ``fn(pipe, step_index, timestep, tensors)`` after each step, or a diffusers
        ``PipelineCallback`` / ``MultiPipelineCallbacks`` (their ``tensor_inputs`` are used): ``tensors``
        holds the names in ``callback_on_step_end_tensor_inputs`` ("latents", and "prompt_embeds": the
        U-Net's context, [uncond, cond] with CFG); a returned dict's entries replace them. A callback may
        set ``pipe._guidance_scale`` (e.g. diffusers' ``SDCFGCutoffCallback`` turning CFG off, for one
        prompt: it keeps the context's last row; setting it alone uses the conditional half) or
        ``pipe._interrupt = True`` (stop after this step).
        Returns :class:`HummingbirdPipelineOutput` (or ``(frames,)`` when ``return_dict=False``).
        """
        defaults = DISTILLED_DEFAULTS if self.guidance_distilled else CFG_DEFAULTS
        num_inference_steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        num_frames = defaults["num_frames"] if num_frames is None else num_frames
        guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        fps = defaults["fps"] if fps is None else fps
        height = DEFAULT_SIZE[0] if height is None else height
        width = DEFAULT_SIZE[1] if width is None else width
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self.check_inputs(prompt, negative_prompt, num_frames, height, width, num_inference_steps, guidance_scale,
                          fps, output_type, decode_chunk_size, prompt_embeds, negative_prompt_embeds,
                          callback_on_step_end_tensor_inputs)
        if prompt_embeds is None:
            prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        num_prompts = len(prompt) if prompt_embeds is None else len(prompt_embeds)
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * num_prompts
        elif negative_prompt is not None:
            negative_prompt = list(negative_prompt)
        if generator is not None and seed is not None:
            raise ValueError("pass either seed or generator, not both")
        if not isinstance(num_videos_per_prompt, numbers.Integral) or isinstance(num_videos_per_prompt, bool):
            raise TypeError(f"num_videos_per_prompt must be an int, got {type(num_videos_per_prompt).__name__}")
        if num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be >= 1, got {num_videos_per_prompt}")
        if seed is not None:
            if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
                raise TypeError(f"seed must be an int, got {type(seed).__name__}")
            seed = operator.index(seed)  # numpy integers too: torch.Generator.manual_seed takes Python ints
            if not 0 <= seed < 2**64:
                raise ValueError(f"seed must be in [0, 2**64 - 1], got {seed}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}")
        if seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        device, dtype = self._execution_device, self.unet.dtype
        batch = num_prompts * num_videos_per_prompt
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"generator is a list of {len(generator)} generators for {batch} videos (prompts x "
                             "num_videos_per_prompt); pass one per video, or a single generator")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timings, clock = {}, _Clock(device)
        if self.unet.fused_qkv:  # a compiled U-Net cannot see changed weights itself
            self.unet.refresh_fused_projections()
        if self._graphed_unet is not None and device.type == "cuda":
            self._check_no_offload_hooks()
            self._graphed_unet.set_weights_key(self._cuda_graph_weights_key())

        # Text: one U-Net call per step either way; CFG doubles its batch to [uncond, cond].
        do_cfg = not self.guidance_distilled and guidance_scale > 1
        negative = "negative_prompt" if negative_prompt_embeds is None else "negative_prompt_embeds"
        given_negative = negative_prompt is not None or negative_prompt_embeds is not None
        if self.guidance_distilled and given_negative:
            warnings.warn(f"{negative} is ignored: this U-Net has classifier-free guidance distilled in "
                          "(no unconditional branch)", stacklevel=3)  # 2 is torch.no_grad's wrapper
        elif not do_cfg and given_negative:
            warnings.warn(f"{negative} is ignored: guidance_scale {guidance_scale} <= 1 turns classifier-free "
                          "guidance off", stacklevel=3)
        context = self._text_context(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, do_cfg, device)
        context = context.to(dtype).repeat_interleave(num_videos_per_prompt, dim=0)
        timings["text_encode"] = clock.lap()

        timesteps = self._set_timesteps(num_inference_steps, device)
        shape = (batch, self.unet.config.in_channels, num_frames, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device, dtype) * self.scheduler.init_noise_sigma
        timestep_cond = cond_scale = None
        step_kwargs = self._step_kwargs(generator, eta)
        self._guidance_scale, self._num_timesteps, self._interrupt = guidance_scale, len(timesteps), False

        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    break
                if self.guidance_distilled and self.guidance_scale != cond_scale:  # at the start, or a callback's
                    cond_scale = self.guidance_scale
                    w = torch.full((batch,), float(cond_scale), device=device)
                    timestep_cond = guidance_scale_embedding(w, self.unet.config.time_cond_proj_dim).to(dtype)
                do_cfg = self.do_classifier_free_guidance
                if not do_cfg and len(context) == 2 * batch:  # a callback turned CFG off: the conditional half
                    context = context[batch:]
                model_in = self.scheduler.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
                noise = self._unet(model_in, t, context, timestep_cond, fps)
                if do_cfg:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + self.guidance_scale * (cond - uncond)
                # The last LCM step returns its denoised estimate, so prev_sample is the result either way.
                latents = self.scheduler.step(noise, t, latents, **step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    named = {"latents": latents, "prompt_embeds": context}
                    given = {k: named[k] for k in callback_on_step_end_tensor_inputs}
                    out = callback_on_step_end(self, i, t, given) or {}
                    latents = out.get("latents", latents)
                    context = out.get("prompt_embeds", context)
                progress.update()
        timings["denoise"] = clock.lap()

        if output_type == "latent":
            frames = latents
        else:
            video = self.decode_latents(latents, decode_chunk_size)
            timings["decode"] = clock.lap()
            frames = _to_output_type(video, output_type)
        self.maybe_free_model_hooks()
        if device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        else:  # ru_maxrss is KiB on Linux, bytes on macOS
            try:
                import resource  # POSIX only: imported where used, so the pipeline imports on Windows
            except ImportError:  # Windows: unknown, reported as 0 rather than failing the finished call
                peak_mb = 0.0
            else:
                peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                peak_mb = peak_rss / (2**20 if sys.platform == "darwin" else 1024)
        if not return_dict:
            return (frames,)
        return HummingbirdPipelineOutput(frames=frames, timings=timings, peak_memory_mb=peak_mb)


def _is_prompt(value) -> bool:
    """A string or a sequence of strings."""
    return isinstance(value, str) or isinstance(value, Sequence) and all(isinstance(p, str) for p in value)


def _diffusers_dtype(dtype) -> dict:
    """from_pretrained's dtype argument: diffusers renamed ``torch_dtype`` to ``dtype`` in 2026 (the old
    name warns there; older releases know only it)."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def load_pipeline(path, dtype=None) -> HummingbirdPipeline:
    """A pipeline from a folder: one ``save_pretrained`` wrote (model_index.json), or one that
    ``hummingbird convert`` wrote (unet/, text_encoder/, vae/) plus a CLIP BPE ``tokenizer/`` folder. In
    the latter the scheduler follows the U-Net: LCM when it has time_cond_proj, else DDIM.

    ``dtype=None`` loads every component in the U-Net's stored dtype (diffusers would load the U-Net and
    VAE in fp32 and transformers the text encoder in its stored dtype). Weights saved with a
    ``variant`` (e.g. "fp16") are found: the plain ones where both are there."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder {path} does not exist")
    variant, weights = _unet_weights(os.path.join(path, "unet"))
    if dtype is None:
        dtype = _stored_dtype(weights)
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return HummingbirdPipeline.from_pretrained(path, variant=variant, **_diffusers_dtype(dtype))
    missing = [c for c in ("unet", "text_encoder", "vae", "tokenizer") if not os.path.isdir(os.path.join(path, c))]
    if missing:
        raise FileNotFoundError(
            f"{path} has no model_index.json and lacks {', '.join(m + '/' for m in missing)}. Expected a pipeline "
            "saved with save_pretrained, or a `hummingbird convert` output plus tokenizer/ (OpenCLIP's tokenizer is "
            "CLIP's BPE; Stable Diffusion 2.x's tokenizer/ folder matches it, including OpenCLIP's '!' padding)")
    unet = HummingbirdUNet3DModel.from_pretrained(path, subfolder="unet", variant=variant, **_diffusers_dtype(dtype))
    return HummingbirdPipeline(
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, **_diffusers_dtype(dtype)),
        text_encoder=CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"), variant=variant, dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer")),
        unet=unet,
        scheduler=scheduler_for(unet.config.time_cond_proj_dim),
    )


_SAFETENSORS_FLOATS = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _unet_weights(folder):
    """(variant, safetensors file) of a diffusers model folder: its plain weights where they are there,
    else those of its one variant (``diffusion_pytorch_model.<variant>.safetensors`` or a sharded
    index); the file is the first shard of sharded weights. Without either: (None, the plain file's
    path), which loading then reports missing."""
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME, _add_variant

    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()

    def variants_of(filename):  # the <variant> of the names "<stem>.<variant><suffix>"
        stem, suffix = os.path.splitext(filename)
        return {n[len(stem) + 1:-len(suffix)] for n in names if n.startswith(stem + ".") and n.endswith(suffix)}

    found = variants_of(SAFETENSORS_WEIGHTS_NAME) | variants_of(SAFE_WEIGHTS_INDEX_NAME)
    variants = sorted(v for v in found if v and "-of-" not in v)  # not shards
    plain = SAFETENSORS_WEIGHTS_NAME in names or SAFE_WEIGHTS_INDEX_NAME in names
    if not plain and len(variants) > 1:
        raise ValueError(f"{folder} holds weights of several variants ({', '.join(variants)}) and no plain ones; "
                         "load the one you want with HummingbirdPipeline.from_pretrained(path, variant=...)")
    variant = None if plain or not variants else variants[0]
    index = os.path.join(folder, _add_variant(SAFE_WEIGHTS_INDEX_NAME, variant))
    try:
        with open(index) as f:
            return variant, os.path.join(folder, min(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # unsharded, or an index loading reports
        return variant, os.path.join(folder, _add_variant(SAFETENSORS_WEIGHTS_NAME, variant))


def _stored_dtype(weights) -> torch.dtype:
    """The dtype of a safetensors file's weights, read from its header (no weights load); float32,
    diffusers' default, without a readable file: loading then reports a damaged one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(weights, framework="pt") as f:
            # the first floating-point tensor's: headers only, and no further than that one
            dtypes = (_SAFETENSORS_FLOATS.get(f.get_slice(name).get_dtype()) for name in f.keys())
            return next((d for d in dtypes if d is not None), torch.float32)
    except (OSError, SafetensorError):
        return torch.float32


class _Clock:
    """Stage timer; synchronises CUDA so each stage's asynchronous kernels are counted in it."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.last = self._now()

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        elapsed, self.last = now - self.last, now
        return elapsed


def _to_output_type(video: torch.Tensor, output_type: str):
    """(B, F, 3, H, W) float in [0, 1] -> the requested output type."""
    if output_type == "pt":
        return video
    if output_type == "np":  # float32 in [0, 1], diffusers' convention (its export_to_video scales by 255)
        return video.permute(0, 1, 3, 4, 2).float().cpu().numpy()
    frames = (video * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).cpu().numpy()
    return [[Image.fromarray(f) for f in clip] for clip in frames]
