"""U-Net step benchmark: median ms per HummingbirdUNet3DModel forward (one denoising step), and peak
GPU memory, for three ways of running the same model:

- ``eager``: ``hbkernels.use_backend("torch")``, i.e. the plain-PyTorch reference ops
- ``hbkernels``: hbkernels' automatic backend (Triton on GPUs, the C++ extension on CPUs)
- ``compile``: ``torch.compile`` of the eager model
- ``eager + CUDA graph`` / ``hbkernels + CUDA graph`` (GPU): the step replayed as one CUDA graph
  (:class:`hummingbird.cuda_graph.CUDAGraphCall`, what ``HummingbirdPipeline.enable_cuda_graph`` uses),
  which takes the per-kernel launch cost out of both

GPU: the real hummingbird-0.7b (26 frames, batch 1: guidance is distilled in) and videocrafter2
(16 frames, batch 2: the classifier-free-guidance pair) at 320x512 (40x64 latents) in fp16.
CPU: a reduced 0.7B-shaped model (64 base channels) on 8 frames of 16x16 latents, in fp32.

    python -m bench.unet_step [--quick] [--no-compile] [--out bench/results]

Speedups in the report are against ``eager``.
"""
import argparse
import contextlib
import functools
import os

import torch
from diffusers.utils import logging as diffusers_logging

import hbkernels
from bench import common
from hummingbird.cuda_graph import CUDAGraphCall
from hummingbird.models import HummingbirdUNet3DModel, guidance_scale_embedding

# (label, named config, overrides, batch, frames, latent height, latent width)
CASES_GPU = [
    ("hummingbird-0.7b 320x512 T26 B1", "hummingbird-0.7b", {}, 1, 26, 40, 64),
    ("videocrafter2 320x512 T16 B2", "videocrafter2", {}, 2, 16, 40, 64),
]
CASES_CPU = [("0.7b-shaped c64 128x128 T8 B1", "hummingbird-0.7b", {"model_channels": 64, "attention_head_dim": 32}, 1, 8, 16, 16)]


def make_step(model, batch, frames, height, width, dev, dtype):
    g = torch.Generator(device=dev).manual_seed(0)
    sample = torch.randn(batch, 4, frames, height, width, generator=g, device=dev, dtype=dtype)
    context = torch.randn(batch, 77, model.config.context_dim, generator=g, device=dev, dtype=dtype)
    timestep = torch.full((batch,), 999, device=dev)
    cond = None
    if model.config.time_cond_proj_dim:
        w = torch.full((batch,), 7.5, device=dev)
        cond = guidance_scale_embedding(w, model.config.time_cond_proj_dim).to(dtype)

    @torch.no_grad()
    def step(unet=model):
        return unet(sample, timestep, context, fps=8, timestep_cond=cond, return_dict=False)[0]

    return step


def measure(fn, backend, dev, timer):
    """(median seconds, peak GPU MiB or None) of ``fn`` run under ``backend`` (None: automatic)."""
    with hbkernels.use_backend(backend) if backend else contextlib.nullcontext():
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        seconds = timer(fn)
        peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    return seconds, peak


def run(report, dev, dtype, cases, compile_too, timer):
    for label, name, overrides, batch, frames, height, width in cases:
        with dev:  # random init on the device: seconds instead of a minute of CPU init at 1.4B
            model = HummingbirdUNet3DModel.from_named_config(name, **overrides).to(dtype).eval()
        params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        step = make_step(model, batch, frames, height, width, dev, dtype)
        impls = [("eager", "torch", step), ("hbkernels", None, step)]
        if dev.type == "cuda":  # one graph per backend: each captures the kernels its backend launches
            impls += [("eager + CUDA graph", "torch", CUDAGraphCall(step)), ("hbkernels + CUDA graph", None, CUDAGraphCall(step))]
        if compile_too:
            compiled = torch.compile(model)
            impls.append(("compile", "torch", functools.partial(step, compiled)))
        for impl, backend, fn in impls:
            try:
                seconds, peak = measure(fn, backend, dev, timer)
            except RuntimeError as err:  # e.g. out of memory at the largest shape: keep the other rows
                print(f"{label} / {impl}: failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
                continue
            extra = {"params_m": params_m, "config": name, **({"peak_mem_mib": round(peak)} if peak else {})}
            report.add("unet_step", label, impl, seconds, **extra)
            print(f"{label} / {impl}: {seconds * 1e3:.1f} ms" + (f", peak {peak:.0f} MiB" if peak else ""))
        del model, step
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.unet_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short timing")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile (slow to build on CPU)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)

    diffusers_logging.set_verbosity_error()  # .to(dtype) on a fresh model warns about nothing worth seeing
    dev = common.device()
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    report = common.Report(device=common.device_name(dev))
    print(f"{report.device}: dtype {dtype}, commit {report.commit}")
    min_time = 0.5 if args.quick else 2.0
    run(report, dev, dtype, CASES_GPU if dev.type == "cuda" else CASES_CPU, args.compile,
        timer=lambda fn: common.median_seconds(fn, min_time))
    slug = "".join(ch if ch.isalnum() else "-" for ch in report.device).strip("-").lower()
    paths = report.write(args.out, f"unet_step-{slug}-{str(dtype).split('.')[-1]}")
    print(report.markdown())
    print("wrote " + ", ".join(paths))


if __name__ == "__main__":
    main()
