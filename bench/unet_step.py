"""U-Net step benchmark: median ms per HummingbirdUNet3DModel forward (one denoising step), and peak
GPU memory, for several ways of running the same model:

- ``eager``: ``hbkernels.use_backend("torch")``, the reference backend's PyTorch ops: SDPA attention
  as diffusers runs it, and the norms on fp32 copies of their inputs (GroupNorm with its time-embedding
  add and SiLU, LayerNorm), rounded once, as VideoCrafter2's GroupNorm computes (``x.float()``). In
  fp16 that moves about 3x (GroupNorm+SiLU) and 5x (LayerNorm) the bytes of stock diffusers' fp16
  ``nn.GroupNorm`` / ``nn.LayerNorm``, so a speedup against this row is larger than against those.
- ``hbkernels``: hbkernels' automatic backend (Triton on GPUs, the C++ extension on CPUs)
- ``compile``: ``torch.compile`` of the eager model; ``hbkernels + compile``: of the hbkernels model
- ``... + CUDA graph`` (GPU): the step replayed as one CUDA graph
  (:class:`hummingbird.cuda_graph.CUDAGraphCall`, what ``HummingbirdPipeline.enable_cuda_graph`` uses),
  which takes the per-kernel launch cost out
- ``..., channels-last``: the same after ``model.enable_channels_last()``; ``..., fused QKV``: also
  after ``model.fuse_qkv_projections()``

GPU: the real hummingbird-0.7b (26 frames, batch 1: guidance is distilled in) and videocrafter2
(16 frames, batch 2: the classifier-free-guidance pair) at 320x512 (40x64 latents) in fp16.
CPU: a reduced 0.7B-shaped model (64 base channels) on 8 frames of 16x16 latents, in fp32.

    python -m bench.unet_step [--quick] [--no-compile] [--profile] [--case TEXT] [--state NAME]...
                              [--impl NAME]... [--out bench/results]

``--state`` (channels-last, channels-last-fused-qkv, standard) and ``--impl`` (a row name before its
state, e.g. ``"hbkernels + CUDA graph"``) pick rows, so a short GPU lease times only what it needs.

``--profile`` (GPU) also writes where each row's GPU time goes: kernels per step, their summed time
against the step's wall time (the gap is host-bound idle GPU), and time per kernel family.

Speedups in the report are against ``eager``.
"""
import argparse
import contextlib
import functools
import os
import re

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
# (--state name, row suffix, channels-last, fused QKV projections)
STATES = [("channels-last", ", channels-last", True, False),
          ("channels-last-fused-qkv", ", channels-last, fused QKV", True, True),
          ("standard", "", False, False)]
IMPLS = ["eager", "hbkernels", "eager + CUDA graph", "hbkernels + CUDA graph", "compile", "compile + CUDA graph",
         "hbkernels + compile", "hbkernels + compile + CUDA graph"]
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


# kernel-name patterns -> family, first match wins (cuDNN/cuBLAS/flash names vary by version)
KERNEL_FAMILIES = [
    ("hbkernels attention", r"_attn_"),
    ("hbkernels group_norm", r"_gn_"),
    ("hbkernels layer_norm", r"_ln_"),
    ("hbkernels layout/geglu", r"_copy_add|_geglu"),
    ("attention (flash/SDPA)", r"flash|fmha|attention|softmax"),
    ("convolution", r"conv|fprop|dgrad|wgrad|implicit|winograd|cudnn"),
    ("matmul", r"gemm|cutlass|cublas|sm\d+_xmma|nvjet|matmul"),
    ("norm", r"norm|RowwiseMoments"),  # RowwiseMoments: PyTorch's GroupNorm statistics kernel
    ("inductor fused (triton_)", r"^triton_"),
    ("copy/layout", r"copy|transpose|permute|cat"),
    ("pointwise/reduce (aten)", r"elementwise|vectorized|reduce|unrolled"),
]


def _short(kernel_name: str) -> str:
    return re.sub(r"^void |at::native::|\(anonymous namespace\)::|c10::", "", kernel_name)[:120]


def _callers(events, calls: int) -> list:
    """[(ms/step, kernel, launching aten op with its input shapes)], costliest first: which PyTorch call
    (and on what shapes) launched each kernel. Empty for graph replays, whose kernels no op launches."""
    cost: dict = {}
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU or not e.kernels:
            continue
        op = e
        while op is not None and not op.name.startswith("aten::"):
            op = op.cpu_parent
        caller = f"{op.name} {op.input_shapes}"[:160] if op is not None else "(no aten op: Triton/custom)"
        for k in e.kernels:
            key = (_short(k.name), caller)
            cost[key] = cost.get(key, 0.0) + k.duration / 1e3 / calls
    return sorted(((ms, kernel, caller) for (kernel, caller), ms in cost.items()), reverse=True)[:12]


def kernel_breakdown(fn, calls: int = 3) -> dict:
    """Profile ``calls`` runs of ``fn``: per step, wall ms, kernel count, summed kernel ms, summed ms
    per kernel family (KERNEL_FAMILIES) with the three costliest kernel names of each, and the
    costliest (kernel, launching op + shapes) pairs."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
    # GPU user annotations (inductor's "## Call CompiledFxGraph ##") span kernels listed on their own
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False)]
    families: dict = {}
    for e in kernels:
        family = next((f for f, pat in KERNEL_FAMILIES if re.search(pat, e.name, re.I)), "other")
        entry = families.setdefault(family, {"ms": 0.0, "count": 0, "top": {}})
        us = e.device_time if hasattr(e, "device_time") else e.cuda_time
        entry["ms"] += us / 1e3 / calls
        entry["count"] += 1
        name = _short(e.name)
        entry["top"][name] = entry["top"].get(name, 0.0) + us / 1e3 / calls
    for entry in families.values():
        entry["count"] //= calls
        entry["top"] = sorted(entry["top"].items(), key=lambda kv: -kv[1])[:3]
    return {"wall_ms": start.elapsed_time(end) / calls, "kernels": len(kernels) // calls,
            "kernel_ms": sum(f["ms"] for f in families.values()),
            "families": dict(sorted(families.items(), key=lambda kv: -kv[1]["ms"])),
            "callers": _callers(prof.events(), calls)}


def breakdown_markdown(label: str, impl: str, b: dict) -> str:
    lines = [f"## {label} / {impl}", "",
             f"wall {b['wall_ms']:.1f} ms per step (under the profiler), {b['kernels']} kernels, "
             f"summed kernel time {b['kernel_ms']:.1f} ms", "",
             "| family | ms/step | kernels/step | costliest kernels (ms/step) |", "|---|---:|---:|---|"]
    for family, f in b["families"].items():
        top = "; ".join(f"`{name}` {ms:.2f}" for name, ms in f["top"])
        lines.append(f"| {family} | {f['ms']:.2f} | {f['count']} | {top} |")
    if b["callers"]:
        lines += ["", "| ms/step | kernel | launched by (input shapes) |", "|---:|---|---|"]
        lines += [f"| {ms:.2f} | `{kernel}` | `{caller}` |" for ms, kernel, caller in b["callers"]]
    return "\n".join(lines) + "\n"


def measure(fn, backend, dev, timer):
    """(median seconds, peak GPU MiB or None) of ``fn`` run under ``backend`` (None: automatic)."""
    with hbkernels.use_backend(backend) if backend else contextlib.nullcontext():
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        seconds = timer(fn)
        peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    return seconds, peak


def implementations(model, step, dev, compile_too, wanted):
    """(row name, backend for use_backend or None for automatic, callable) for one model state: the
    rows named in ``wanted``."""
    impls = [("eager", "torch", step), ("hbkernels", None, step)]
    if dev.type == "cuda":  # one graph per backend: each captures the kernels its backend launches
        impls += [("eager + CUDA graph", "torch", CUDAGraphCall(step)), ("hbkernels + CUDA graph", None, CUDAGraphCall(step))]
    if compile_too and any("compile" in name for name in wanted):
        # Compiled after the layout switch: inductor specialises on the weights' strides.
        # One wrapper, two graphs: the backend choice is guarded, so each backend compiles its own
        # (hbkernels' kernels stay opaque custom ops; inductor fuses the rest around them).
        # dynamo's cache is keyed on the forward's code, shared by every model and state: without a reset
        # the next case (other batch / frames) or state would run a recompiled dynamic-shape graph
        torch.compiler.reset()
        compiled = functools.partial(step, torch.compile(model))
        for name, backend in (("compile", "torch"), ("hbkernels + compile", None)):
            impls.append((name, backend, compiled))
            if dev.type == "cuda":  # inductor's kernels in our CUDA graph: compile without its launch cost
                impls.append((f"{name} + CUDA graph", backend, CUDAGraphCall(compiled)))
    return [impl for impl in impls if impl[0] in wanted]


def run(report, dev, dtype, cases, compile_too, timer, profiles=None, states=STATES, impls=IMPLS):
    for label, name, overrides, batch, frames, height, width in cases:
        with dev:  # random init on the device: seconds instead of a minute of CPU init at 1.4B
            model = HummingbirdUNet3DModel.from_named_config(name, **overrides).to(dtype).eval()
        params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        step = make_step(model, batch, frames, height, width, dev, dtype)
        # Newest configurations first (a GPU run cut off at its time limit keeps those): channels-last,
        # also with fused QKV projections, then the standard layout. No compile rows for the fused
        # state: each compile of the model costs about a minute on a GPU.
        for _, state, channels_last, fused in states:
            if channels_last:
                model.enable_channels_last()
            else:
                model.disable_channels_last()
            if fused:
                model.fuse_qkv_projections()
            else:
                model.unfuse_qkv_projections()
            for impl, backend, fn in implementations(model, step, dev, compile_too and not fused, impls):
                impl += state
                try:
                    seconds, peak = measure(fn, backend, dev, timer)
                except Exception as err:  # e.g. out of memory at the largest shape: keep the other rows
                    error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                    report.add("unet_step", label, impl, float("nan"), params_m=params_m, config=name, error=error)
                    print(f"{label} / {impl}: failed: {error}")
                    continue
                extra = {"params_m": params_m, "config": name, **({"peak_mem_mib": round(peak)} if peak else {})}
                report.add("unet_step", label, impl, seconds, **extra)
                print(f"{label} / {impl}: {seconds * 1e3:.1f} ms" + (f", peak {peak:.0f} MiB" if peak else ""))
                if profiles is not None:
                    with hbkernels.use_backend(backend) if backend else contextlib.nullcontext():
                        profiles.append(breakdown_markdown(label, impl, kernel_breakdown(fn)))
                    print(profiles[-1])
        del model, step
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.unet_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short timing")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile (slow to build on CPU)")
    parser.add_argument("--case", default="", help="only cases whose label contains this text")
    parser.add_argument("--state", action="append", choices=[s[0] for s in STATES],
                        help="only this model state (repeatable; default: all)")
    parser.add_argument("--impl", action="append", choices=IMPLS, help="only this row (repeatable; default: all)")
    parser.add_argument("--profile", action="store_true", help="GPU: also write each row's kernel-time breakdown")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)

    diffusers_logging.set_verbosity_error()  # .to(dtype) on a fresh model warns about nothing worth seeing
    dev = common.device()
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    report = common.Report(device=common.device_name(dev), timing=common.MODEL_TIMING)
    print(f"{report.device}: dtype {dtype}, commit {report.commit}")
    if args.profile and dev.type != "cuda":
        parser.error("--profile needs a GPU (it reports CUDA kernel time)")
    profiles = [] if args.profile else None
    min_time = 0.5 if args.quick else 2.0
    cases = [c for c in (CASES_GPU if dev.type == "cuda" else CASES_CPU) if args.case in c[0]]
    if not cases:
        parser.error(f"--case {args.case!r} matches no case")
    states = [s for s in STATES if s[0] in (args.state or [s[0]])]
    run(report, dev, dtype, cases, args.compile, timer=lambda fn: common.median_seconds(fn, min_time),
        profiles=profiles, states=states, impls=args.impl or IMPLS)
    if not report.rows:
        parser.error("the --state / --impl filters leave no row to time on this device"
                     + (" (--no-compile drops the compile rows)" if not args.compile else ""))
    # a filtered run must not overwrite the full one, nor another filtered one
    filtered = [common.slug(args.case)] if args.case else []
    filtered += [common.slug(name) for name in (args.state or []) + (args.impl or [])]
    paths = report.save(args.out, "unet_step", str(dtype).split(".")[-1], *filtered)
    if profiles:
        path = paths[0].removesuffix(".json") + "-profile.md"  # beside the report, same stem
        common.atomic_write(path, f"# U-Net step kernel time — {report.device}, commit {report.commit}\n\n"
                            + "\n".join(profiles))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
