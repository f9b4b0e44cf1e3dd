"""GroupNorm+SiLU forward launch tuning: the Triton forward's knobs (statistics programs, statistics
tile, apply order; see hbkernels/triton/group_norm.py) swept on the U-Net's level-0 tensors, timed as
CUDA-graph replays (kernel time). The fastest setting per shape says which defaults to keep. The
default setting is also profiled: microseconds per call of each of its kernels (statistics,
finalize, apply), which says which pass to work on next.

    python -m bench.gn_sweep [--quick] [--out bench/results]
"""
import argparse
import itertools
import os

import torch

import hbkernels
from bench import common
from bench.unet_step import kernel_breakdown
from hbkernels.triton import group_norm as gn

# (label, shape, memory format)
SHAPES = [(f"vc2 L0 B1 T{t}{' CL' if cl else ''}", (1, 320, t, 40, 64),
           torch.channels_last_3d if cl else torch.contiguous_format) for t in (16, 26) for cl in (False, True)]
PROGRAMS = (1024, 2048, 4096)
TILES = (2048, 4096, 8192)
REVERSED = (False, True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.gn_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short timing")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    dev = common.device()
    if dev.type != "cuda":
        parser.error("the sweep times GPU kernels: it needs a CUDA GPU")
    report = common.Report(device=common.device_name(dev))
    report.copy_gbps = common.copy_bandwidth(dev) / 1e9
    print(f"{report.device}: copy bandwidth {report.copy_gbps:.1f} GB/s, commit {report.commit}")
    defaults = gn._GPU_STATS_PROGRAMS, gn._STATS_TILE, gn.APPLY_REVERSED
    min_time = 0.05 if args.quick else 0.2
    try:
        for label, shape, fmt in SHAPES:
            x = (torch.randn(shape, device=dev, dtype=torch.float16) + 1).contiguous(memory_format=fmt)
            w, b = torch.randn(320, device=dev, dtype=torch.float16), torch.randn(320, device=dev, dtype=torch.float16)
            eager = common.median_seconds_graphed(
                lambda: torch.nn.functional.silu(torch.nn.functional.group_norm(x, 32, w, b)), min_time)
            report.add("group_norm_silu", label, "eager", eager, 2 * x.numel() * 2)

            def call():
                return hbkernels.group_norm(x, 32, w, b, activation="silu")

            for setting in itertools.product(PROGRAMS, TILES, REVERSED):
                gn._GPU_STATS_PROGRAMS, gn._STATS_TILE, gn.APPLY_REVERSED = setting
                seconds = common.median_seconds_graphed(call, min_time)
                programs, tile, rev = setting
                impl = f"programs={programs} tile={tile}{' reversed' if rev else ''}"
                extra = {}
                if setting == defaults:
                    impl += " (default)"
                    top = kernel_breakdown(call, calls=20)["families"]["hbkernels group_norm"]["top"]
                    extra["kernel_us"] = {name: round(ms * 1e3, 2) for name, ms in top}
                report.add("group_norm_silu", label, impl, seconds, 2 * x.numel() * 2, **extra)
                print(f"{label} | {impl} | {seconds * 1e6:.1f} us | {report.rows[-1].gbps:.0f} GB/s"
                      f"{' | ' + str(extra['kernel_us']) if extra else ''}", flush=True)
    finally:
        gn._GPU_STATS_PROGRAMS, gn._STATS_TILE, gn.APPLY_REVERSED = defaults
    report.save(args.out, "gn_sweep", "float16")


if __name__ == "__main__":
    main()
