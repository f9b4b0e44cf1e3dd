"""``python -m bench``: benchmark hbkernels on the available device and write JSON, markdown and a
plot under bench/results/."""
import argparse
import os

import torch

from bench import common, ops

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--dtype", choices=DTYPES, help="default: fp16 on GPU, fp32 on CPU")
    parser.add_argument("--quick", action="store_true", help="two shapes per op, short timing")
    parser.add_argument("--graph", action="store_true",
                        help="GPU: time calls replayed from a CUDA graph (kernel time without launch overhead)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile rows (each shape compiles anew)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)

    dev = common.device()
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if dev.type == "cuda" else torch.float32)
    min_time = 0.05 if args.quick else 0.3
    if args.graph and dev.type != "cuda":
        parser.error("--graph needs a CUDA GPU")
    timer = common.median_seconds_graphed if args.graph else common.median_seconds
    report = common.Report(device=common.device_name(dev), timing=common.GRAPH_TIMING if args.graph else common.WALL_TIMING)
    report.copy_gbps = common.copy_bandwidth(dev) / 1e9
    print(f"{report.device}: copy bandwidth {report.copy_gbps:.1f} GB/s, dtype {dtype}, commit {report.commit}")
    ops.run(report, dev, dtype, quick=args.quick, timer=lambda fn, fn_args: timer(fn, min_time, fn_args),
            compile_too=args.compile)
    # measured again: one copy timed while something else loaded the machine would make every row's
    # "% copy BW" too high (CPU runs showed 400%); the larger of the two is the 100% mark
    again = common.copy_bandwidth(dev) / 1e9
    print(f"copy bandwidth after the rows: {again:.1f} GB/s (before: {report.copy_gbps:.1f}); the larger is 100%")
    report.copy_gbps = max(report.copy_gbps, again)
    # runs without some rows or shapes must not overwrite the full one
    report.save(args.out, "ops", str(dtype).split(".")[-1], *(["graph"] if args.graph else []),
                *([] if args.compile else ["no-compile"]), *(["quick"] if args.quick else []))


if __name__ == "__main__":
    main()
