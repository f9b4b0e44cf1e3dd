"""Where the one-read GroupNorm forward's time goes (hbkernels/cuda/group_norm_cluster.cu): every block
stamps the GPU's global timer when it starts, when its x is loaded with its statistics, when its
group's statistics are known and when its y is stored (a block holding slices of several groups, one
stage after another: per group, its stage's start first). Level 0 fp16 (1, 320, T, 40, 64), NCHW and
channels-last, for the cooperative grid in 1, 2 and 4 stages and for clusters of 4, 6 and 16 blocks.

Per configuration, medians over runs (inputs rotating through 3x L2, as bench.sweep's rows) of: the
span (first start to last store), the spread of the starts (waves start late), each block's load and
statistics, its wait for the group (loaded -> statistics known: the exchange, and the group's slowest
block), its apply (y from shared memory), and the waves (starts grouped where a gap exceeds half the
median block's duration; spread and waves from the first stage's starts). The stamps cost a few global
stores per block.

    python -m bench.gn_phases [--runs 20] [--frames 16 26] [--out bench/results]
"""
import argparse
import datetime
import json
import os
import statistics

import torch

from bench import common

# (label, blocks per group (None: the plan's), cooperative, stages)
CONFIGS = [("cooperative", None, True, 1), ("cooperative, 2 stages", None, True, 2),
           ("cooperative, 4 stages", None, True, 4), ("clusters of 4", 4, False, 1), ("clusters of 6", 6, False, 1),
           ("clusters of 16", 16, False, 1)]
PHASES = ("span_us", "start_spread_us", "load_us", "wait_us", "apply_us", "waves")


def _medians(c: torch.Tensor) -> dict:
    """Median load, wait and apply of (blocks, 4) stamps in us."""
    start, loaded, known, stored = c.unbind(-1)
    return dict(load_us=float((loaded - start).median()), wait_us=float((known - loaded).median()),
                apply_us=float((stored - known).median()))


def phases(clocks: torch.Tensor, stages: int = 1) -> dict:
    """The phase summary of one run's (groups, blocks, 4) nanosecond stamps; with ``stages``, groups
    k * ceil(groups / stages) onwards are the blocks' stage k + 1, summarised apiece under "stages" (with
    each one's median start after the first block's)."""
    c = clocks.double().cpu() / 1e3  # (groups, blocks, 4) in us
    start, stored = c[..., 0], c[..., 3]
    per = -(-clocks.shape[0] // stages)  # groups per stage
    starts = start[:per].flatten().sort().values  # the first stage's: the grid's starts
    gap = 0.5 * (stored - start).median()
    summary = dict(span_us=float(stored.max() - start.min()), start_spread_us=float(starts[-1] - starts[0]),
                   **_medians(c.flatten(0, 1)), waves=1 + int((starts.diff() > gap).sum()))
    if stages > 1:
        summary["stages"] = [dict(start_us=float((c[k:k + per, :, 0] - start.min()).median()),
                                  **_medians(c[k:k + per].flatten(0, 1))) for k in range(0, clocks.shape[0], per)]
    return summary


def measure(shape: tuple, channels_last: bool, runs: int, dev: torch.device) -> list:
    """Each configuration's phases for an fp16 (N, C, T, H, W) x in 32 groups (a CPU device: the tests'
    emulated kernels)."""
    from hbkernels.cuda import group_norm as cluster
    from hbkernels.ops.group_norm import video_view

    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=dev, dtype=torch.float16).contiguous(memory_format=fmt)
    w, b = torch.randn(shape[1], device=dev), torch.randn(shape[1], device=dev)
    y = torch.empty_like(x)
    sets = common.input_sets((x,), common.cache_bytes(dev))
    stream = torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0
    rows = []
    for label, blocks, cooperative, stages in CONFIGS:
        planned = cluster.plan_for(32, blocks, False, video_view(x), video_view(y), cooperative=cooperative,
                                   stages=stages)
        if planned is None:
            rows.append(dict(config=label, plan=None))
            continue
        p, layout = planned
        mean, rstd = torch.empty(shape[0], 32, device=dev), torch.empty(shape[0], 32, device=dev)
        clocks = torch.zeros(shape[0] * 32, p.blocks, 4, dtype=torch.int64, device=dev)
        summaries = []
        for run in range(runs + 2):  # the first two warm up (module load, opt-in attributes)
            (xr,) = sets[run % len(sets)]
            cluster.launch_fwd(p, layout, dev.index or 0, stream, video_view(xr), w, b, None, video_view(y), mean,
                               rstd, 32, 1e-5, True, clocks)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if run >= 2:
                summaries.append(phases(clocks, p.stages))
        row = dict(config=label, plan=f"{p.blocks} blocks per group, {p.smem} B each",
                   **{k: statistics.median(s[k] for s in summaries) for k in PHASES})
        if "stages" in summaries[0]:
            row["stages"] = [{k: statistics.median(s["stages"][i][k] for s in summaries) for k in stage}
                             for i, stage in enumerate(summaries[0]["stages"])]
        rows.append(row)
    return rows


def markdown(report: dict) -> str:
    lines = [f"# GroupNorm one-read forward phases — {report['device']}", "",
             f"date {report['date']}, commit {report['commit']}, torch {report['torch']}, "
             f"medians of {report['runs']} runs (us)", "",
             "| case | config | plan | span | start spread | load | wait | apply | waves |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for case, rows in report["cases"].items():
        for r in rows:
            if r["plan"] is None:
                lines.append(f"| {case} | {r['config']} | none | | | | | | |")
                continue
            values = " | ".join(f"{r[k]:.1f}" if k != "waves" else str(r[k]) for k in PHASES)
            lines.append(f"| {case} | {r['config']} | {r['plan']} | {values} |")
            for k, st in enumerate(r.get("stages", []), 1):
                lines.append(f"| {case} | {r['config']}: stage {k} | starts at {st['start_us']:.1f} | | | "
                             f"{st['load_us']:.1f} | {st['wait_us']:.1f} | {st['apply_us']:.1f} | |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.gn_phases", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 26])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or torch.version.hip is not None or torch.cuda.get_device_capability()[0] < 9:
        parser.exit(1, "bench.gn_phases needs a CUDA GPU of compute capability 9.0+ (the cluster kernels)\n")
    dev = common.device()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report = dict(device=common.device_name(dev), date=date, commit=common.git_commit(), torch=torch.__version__,
                  runs=args.runs, cases={})
    for frames in args.frames:
        for channels_last in (False, True):
            case = f"vc2 L0 B1 T{frames}" + (" CL" if channels_last else "")
            report["cases"][case] = measure((1, 320, frames, 40, 64), channels_last, args.runs, dev)
    base = os.path.join(args.out, f"gn_phases-{common.slug(report['device'])}")
    os.makedirs(args.out, exist_ok=True)
    common.atomic_write(base + ".json", json.dumps(report, indent=1))
    common.atomic_write(base + ".md", markdown(report))
    print(markdown(report))
    print(f"wrote {base}.json, {base}.md")


if __name__ == "__main__":
    main()
