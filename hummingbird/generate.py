"""``hummingbird generate``: text -> video file, with per-stage timings.

Cheap checks (output path, model folder, height/width and --steps against the model's config files,
device) run before the model loads, so a typo costs no loading time; they exit with a one-line
message, no traceback. torch/diffusers are imported inside :func:`run` to keep ``--help`` instant.
"""
import argparse
import importlib.util
import json
import math
import os
import random
import time

from hummingbird import DEFAULT_SIZE

TINY_RANDOM = "tiny-random"  # a built-in tiny random model: noise out, but exercises the whole path
TINY_SIZE = 64  # its default height/width: its output is noise anyway, so keep the CPU demo quick
TINY_MULTIPLE = 16  # its height/width multiple: VAE factor 8 x its U-Net's one downsampling (hummingbird.testing)
DTYPES = ("fp16", "bf16", "fp32")
# Playback rate of the written video, by whether the model is guidance-distilled: Hummingbird is trained
# and conditioned at 8 fps; VideoCrafter2 is conditioned on 28 but its inference scripts save at 10 fps
# (16 frames at 28 would last 0.57 s).
SAVE_FPS = {True: 8, False: 10}


def _int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _positive_int(text):
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _finite_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _seed(text):
    value = _int(text)
    if not 0 <= value < 2**64:  # what torch.Generator.manual_seed takes (negative seeds wrap around to these)
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64 - 1], got {value}")
    return value


def _multiple_of_8(text):
    value = _int(text)
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 8 (the VAE downsamples by 8), got {value}")
    return value


def add_parser(subparsers):
    p = subparsers.add_parser(
        "generate", help="generate a video from a text prompt",
        description="Generate a video from a text prompt with a Hummingbird (LCM, guidance distilled) or "
        "VideoCrafter2 (DDIM + classifier-free guidance) model. Steps/frames/guidance/fps default to the model's "
        "own (8 / 26 / 7.5 / 8 for Hummingbird, 50 / 16 / 12 / 28 for VideoCrafter2).",
    )
    p.add_argument("prompt")
    p.add_argument("--model", required=True,
                   help=f"pipeline folder (save_pretrained, or `hummingbird convert` output + tokenizer/), "
                   f"or '{TINY_RANDOM}' for a built-in tiny random model")
    p.add_argument("--out", default="video.mp4", help="output .mp4 or .gif (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--frames", type=_positive_int, help="number of frames (default: the model's)")
    p.add_argument("--steps", type=_positive_int, help="denoising steps (default: the model's)")
    size_help = ("a multiple of the model's VAE factor x U-Net downsampling: 64 for the released models, "
                 f"{TINY_MULTIPLE} for {TINY_RANDOM}")
    p.add_argument("--height", type=_multiple_of_8, help=f"default: {DEFAULT_SIZE[0]} ({TINY_SIZE} for {TINY_RANDOM}); {size_help}")
    p.add_argument("--width", type=_multiple_of_8, help=f"default: {DEFAULT_SIZE[1]} ({TINY_SIZE} for {TINY_RANDOM}); {size_help}")
    p.add_argument("--guidance-scale", type=_finite_float, help="guidance scale w (default: the model's)")
    p.add_argument("--negative-prompt", help="unconditional prompt for classifier-free guidance (VideoCrafter2 only)")
    p.add_argument("--fps", type=_positive_int, help="fps conditioning (default: the model's: 8 Hummingbird, 28 VideoCrafter2)")
    p.add_argument("--save-fps", type=_positive_int,
                   help="playback rate of the written video (default: 8 Hummingbird, 10 VideoCrafter2)")
    p.add_argument("--seed", type=_seed, help="random seed (default: random, printed)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=DTYPES, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--decode-chunk-size", type=_positive_int, default=8,
                   help="frames decoded by the VAE at once; lower it to save memory (default: %(default)s)")
    p.set_defaults(func=run)


def _fail(message):
    raise SystemExit(f"hummingbird generate: error: {message}")


def _check_output(path: str, save_fps, overwrite: bool):
    from hummingbird.export import EXPORTERS, GIF_MAX_FPS, temporary_path

    ext = os.path.splitext(path)[1].lower()
    if ext not in EXPORTERS:
        _fail(f"--out must end in {' or '.join(EXPORTERS)}, got {path!r}")
    if os.path.isdir(path):
        _fail(f"--out {path} is a folder; give a file name ending in {' or '.join(EXPORTERS)}")
    if os.path.lexists(path) and not overwrite:
        _fail(f"{path} exists; choose another --out or overwrite it (--overwrite)")
    if ext == ".mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:  # else found out after generating
        _fail("writing .mp4 needs imageio-ffmpeg: pip install 'hbkernels[video]' (or write a .gif)")
    if ext == ".gif" and save_fps and save_fps > GIF_MAX_FPS:
        _fail(f"--save-fps {save_fps}: GIFs play at most {GIF_MAX_FPS} fps; write an .mp4")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        _fail(f"cannot write {path}: folder {folder} does not exist")
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows) or no answer
        name_max = 255
    if len(os.path.basename(path).encode()) > name_max:
        _fail(f"cannot write {path}: its name is longer than the {name_max} bytes a file name may have")
    # a name like the export's temporary file: os.access says yes to root even on read-only file systems
    probe = temporary_path(path, f"probe{os.getpid()}")
    try:
        open(probe, "xb").close()
        os.unlink(probe)
    except OSError as err:
        _fail(f"cannot write {path}: {err.strerror}")


def _read_config(model: str, name: str) -> dict:
    """One of the model folder's small config files (e.g. unet/config.json), read before any weights
    load; {} when it cannot be read."""
    try:
        with open(os.path.join(model, name)) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _spatial_multiple(model: str, tiny: bool):
    """What height/width must be multiples of: the VAE's factor x the U-Net's downsampling (8 x 8 = 64
    for the released models), from the folder's unet/ and vae/ config.json files. None when the U-Net's
    config cannot be read: the pipeline checks once loaded."""
    if tiny:
        return TINY_MULTIPLE
    channel_mult = _read_config(model, "unet/config.json").get("channel_mult")
    if not isinstance(channel_mult, list):
        return None
    vae_levels = _read_config(model, "vae/config.json").get("block_out_channels")
    # without it 8: Stable Diffusion's KL-f8, which every VideoCrafter2/Hummingbird model uses
    vae_factor = 2 ** (len(vae_levels) - 1) if isinstance(vae_levels, list) else 8
    return vae_factor * 2 ** (len(channel_mult) - 1)


def _max_steps(model: str, tiny: bool):
    """The most denoising steps the model's scheduler takes (:func:`~hummingbird.schedulers.max_inference_steps`).
    None when the configs cannot be read."""
    from hummingbird.schedulers import lcm_scheduler, max_inference_steps, scheduler_for

    if tiny:
        config = lcm_scheduler().config
    else:  # a saved pipeline's scheduler, or for a `hummingbird convert` folder the one load_pipeline picks
        config = _read_config(model, "scheduler/scheduler_config.json")
        if not config:
            unet = _read_config(model, "unet/config.json")
            if not unet:
                return None
            config = scheduler_for(unet.get("time_cond_proj_dim")).config
    try:
        return max_inference_steps(config)
    except (KeyError, TypeError):  # a hand-edited config: the pipeline checks once loaded
        return None


def _resolve_device(name):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        _fail(f"bad --device {name!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        _fail(f"--device {name} requested but CUDA is not available (torch {torch.__version__})")
    if device.type == "meta":
        _fail("--device meta holds no data; use cpu or cuda")
    try:  # before loading: a backend torch was not built with, or a GPU index past the last one
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as err:
        _fail(f"--device {name} is not usable here: {str(err).splitlines()[0]}")
    return device


def run(args) -> int:
    _check_output(args.out, args.save_fps, args.overwrite)
    tiny = args.model == TINY_RANDOM and not os.path.isdir(args.model)
    if not tiny and not os.path.isdir(args.model):
        _fail(f"model folder {args.model} does not exist")
    height = args.height or (TINY_SIZE if tiny else DEFAULT_SIZE[0])
    width = args.width or (TINY_SIZE if tiny else DEFAULT_SIZE[1])
    multiple = _spatial_multiple(args.model, tiny)
    if multiple and (height % multiple or width % multiple):
        _fail(f"height and width must be multiples of {multiple} for this model (the VAE's factor x the U-Net's "
              f"downsampling), got {height}x{width}")
    import torch

    from hummingbird.export import export_video
    from hummingbird.pipeline import CFG_DEFAULTS, DISTILLED_DEFAULTS, load_pipeline

    max_steps = _max_steps(args.model, tiny)
    if args.steps and max_steps and args.steps > max_steps:
        _fail(f"--steps {args.steps}: this model's scheduler takes at most {max_steps}")
    device = _resolve_device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    seed = random.randrange(2**31) if args.seed is None else args.seed

    start = time.perf_counter()
    if tiny:
        from hummingbird.testing import tiny_random_pipeline

        pipe = tiny_random_pipeline("lcm")
        if dtype != torch.float32:  # skipped for fp32: diffusers warns on any .to(dtype) of a model
            pipe.to(dtype=dtype)
    else:
        pipe = load_pipeline(args.model, dtype=dtype)
    pipe = pipe.to(device)
    if device.type == "cuda":  # faster U-Net convolutions on GPUs (slower on CPUs), same outputs up to rounding
        pipe.enable_channels_last()
    load_s = time.perf_counter() - start

    defaults = DISTILLED_DEFAULTS if pipe.guidance_distilled else CFG_DEFAULTS
    fps = args.fps or defaults["fps"]
    save_fps = args.save_fps or SAVE_FPS[pipe.guidance_distilled]
    frames = args.frames or defaults["num_frames"]
    out = pipe(args.prompt, negative_prompt=args.negative_prompt, num_frames=frames, height=height,
               width=width, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, fps=fps,
               seed=seed, decode_chunk_size=args.decode_chunk_size, output_type="np")
    start = time.perf_counter()
    path = export_video(out.frames[0], args.out, fps=save_fps, overwrite=args.overwrite)
    export_s = time.perf_counter() - start

    stages = {"load": load_s, **out.timings, "export": export_s}
    print(f"wrote {path} ({frames} frames, {height}x{width}, {save_fps} fps (conditioned on {fps}), seed {seed}, "
          f"{device} {str(dtype).removeprefix('torch.')})")
    peak = f", peak memory {out.peak_memory_mb:.0f} MiB" if out.peak_memory_mb else ""  # 0: unknown (Windows)
    print("  ".join(f"{name} {seconds:.2f}s" for name, seconds in stages.items())
          + f"  | total {sum(stages.values()):.2f}s{peak}")
    return 0
