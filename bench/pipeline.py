"""End-to-end text-to-video latency: Hummingbird (0.7B U-Net, 4 LCM steps, guidance distilled in: 4
U-Net calls) against its teacher VideoCrafter2 (1.4B U-Net, 50 DDIM steps with classifier-free
guidance: 50 calls at batch 2), split into text encoding, denoising and VAE decoding; on a GPU also
Hummingbird with its denoising steps replayed as CUDA graphs (``pipe.enable_cuda_graph()``) and
channels-last U-Net activations (``pipe.enable_channels_last()``).

Random weights at the real sizes: OpenCLIP ViT-H text tower as a 23-layer CLIPTextModel, SD KL-f8
VAE, the named U-Net configs. GPU: 320x512, 16 and 26 frames, fp16. CPU: a reduced model
(64 base channels, 4-layer text encoder, narrow VAE) at 64x64 and 8 frames, fp32, to check the path
and the ratio of U-Net work; its absolute times say nothing about a GPU.

    python -m bench.pipeline [--repeats N] [--out bench/results]
"""
import argparse
import gc
import os
import statistics

import torch
from diffusers import AutoencoderKL
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPTextConfig, CLIPTextModel

from bench import common
from hummingbird.models import HummingbirdUNet3DModel
from hummingbird.pipeline import HummingbirdPipeline
from hummingbird.schedulers import ddim_scheduler, lcm_scheduler
from hummingbird.testing import tiny_tokenizer

# (label, named U-Net config, scheduler factory, steps, GPU tuning: CUDA graphs + channels-last);
# the teacher last (the ratio's base)
MODELS = [
    ("hummingbird-0.7b LCM 4 steps", "hummingbird-0.7b", lcm_scheduler, 4, False),
    ("hummingbird-0.7b LCM 4 steps + CUDA graph + channels-last", "hummingbird-0.7b", lcm_scheduler, 4, True),
    ("videocrafter2 DDIM 50 steps + CFG", "videocrafter2", ddim_scheduler, 50, False),
]
FULL = dict(
    text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
    unet={},
    shapes=[(320, 512, 16), (320, 512, 26)],
)
REDUCED = dict(
    text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
    vae=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1),
    unet=dict(model_channels=64, attention_head_dim=32, context_dim=256),
    shapes=[(64, 64, 8)],
)


def random_pipeline(config_name, scheduler, sizes, dev, dtype) -> HummingbirdPipeline:
    """Random weights, created directly on ``dev``. The character-level test tokenizer gives 77 valid
    token ids, which is all the text encoder's cost depends on."""
    tokenizer = tiny_tokenizer()
    with dev:
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                                    hidden_act="gelu", **sizes["text"]))
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            latent_channels=4, scaling_factor=0.18215, **sizes["vae"])
        unet = HummingbirdUNet3DModel.from_named_config(config_name, **sizes["unet"])
    pipe = HummingbirdPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                               scheduler=scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev, dtype)


def measure(pipe, steps, height, width, frames, repeats):
    """Median seconds per stage and of the whole call over ``repeats`` runs (after a 1-step warm-up),
    and peak MiB over the warm-up and the runs: a CUDA-graph pipeline captures its graph (and allocates
    its memory pool) during the warm-up, and each call resets the peak counter."""
    kwargs = dict(height=height, width=width, num_frames=frames, seed=0, output_type="pt")
    warm = pipe("warm-up", num_inference_steps=1, **kwargs)
    runs = [pipe("a hummingbird hovering by a red flower", num_inference_steps=steps, **kwargs) for _ in range(repeats)]
    stages = {k: statistics.median(r.timings[k] for r in runs) for k in runs[0].timings}
    total = statistics.median(sum(r.timings.values()) for r in runs)  # not the sum of per-stage medians
    return stages, total, max(r.peak_memory_mb for r in (warm, *runs))


# a CPU run has no per-case peak counter: ru_maxrss only grows, so a case shows the largest before it too
CPU_PEAK = "the process's resident-memory high-water mark when the case ended (includes earlier cases)"


class PipelineReport(common.Report):
    def markdown(self) -> str:
        lines = [f"# Text-to-video pipeline latency — {self.device}", "",
                 f"date {self.date}, commit {self.commit}, torch {self.torch}; medians of "
                 f"{self.rows[0].extra['repeats'] if self.rows else 0} timed run(s) per case", "",
                 "| case | model | total s | text encode s | denoise s | ms / U-Net call | decode s | peak MiB "
                 "| speedup vs videocrafter2 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            e = r.extra
            lines.append(f"| {r.case} | {r.impl} | {r.median_ms / 1e3:.2f} | {e['text_encode_s']:.3f} | "
                         f"{e['denoise_s']:.2f} | {e['ms_per_unet_call']:.1f} | {e['decode_s']:.2f} | "
                         f"{e['peak_mib']:.0f} | {e['speedup_vs_videocrafter2']:.1f}x |")
        if any(r.extra.get("peak") == CPU_PEAK for r in self.rows):
            lines += ["", f"peak MiB: {CPU_PEAK}"]
        return "\n".join(lines) + "\n"


def run(report, dev, dtype, sizes, repeats):
    results = {}
    for label, config_name, scheduler, steps, tuned in MODELS:
        if tuned and dev.type != "cuda":
            continue
        pipe = random_pipeline(config_name, scheduler, sizes, dev, dtype)
        if tuned:
            pipe.enable_cuda_graph()
            pipe.enable_channels_last()
        for height, width, frames in sizes["shapes"]:
            case = f"{height}x{width} T{frames}"
            stages, total, peak = measure(pipe, steps, height, width, frames, repeats)
            results[case, label] = stages, total, peak, steps
            split = ", ".join(f"{k} {v:.3f}s" for k, v in stages.items())
            print(f"{case} / {label}: {split}, peak {peak:.0f} MiB")
        del pipe
        gc.collect()  # whatever a cycle still holds goes before the next model's peak is measured
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    teacher = MODELS[-1][0]
    for (case, label), (stages, total, peak, steps) in results.items():
        report.add("pipeline", case, label, total, steps=steps,
                   text_encode_s=stages["text_encode"], denoise_s=stages["denoise"], decode_s=stages["decode"],
                   ms_per_unet_call=stages["denoise"] / steps * 1e3, peak_mib=peak,
                   speedup_vs_videocrafter2=results[case, teacher][1] / total, repeats=repeats,
                   **({} if dev.type == "cuda" else {"peak": CPU_PEAK}))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=_positive, help="timed runs per case (default: 3 on GPU, 1 on CPU)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)

    diffusers_logging.set_verbosity_error()  # .to(dtype) on a fresh model warns about nothing worth seeing
    dev = common.device()
    on_gpu = dev.type == "cuda"
    dtype = torch.float16 if on_gpu else torch.float32
    report = PipelineReport(device=common.device_name(dev))
    print(f"{report.device}: dtype {dtype}, commit {report.commit}")
    repeats = args.repeats if args.repeats is not None else (3 if on_gpu else 1)
    run(report, dev, dtype, FULL if on_gpu else REDUCED, repeats)
    report.save(args.out, "pipeline", str(dtype).split(".")[-1])


if __name__ == "__main__":
    main()
