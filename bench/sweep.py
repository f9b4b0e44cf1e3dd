"""Launch tuning on a GPU: each Triton knob's settings timed against each other as CUDA-graph replays
(kernel time) at the U-Net's level-0 shapes, fp16. The fastest setting per shape says which default
to keep.

- group_norm (+SiLU): the forward's statistics programs per SM, statistics tile, pipeline stages of
  the statistics loop, and (at the default) the apply order, the apply pass's evict-first hints,
  apply tile, programmatic dependent launch, channel blocks launched first (channels-last only),
  channels per statistics / apply tile, statistics reduced per tile and merged in the apply pass
  (NCHW only), the Hopper cluster kernels per blocks per cluster (see hbkernels/triton/group_norm.py);
  channels-last shapes set their own tile knobs (*_CHANNELS_LAST). The default setting is also
  profiled: microseconds per call of each of its kernels (statistics, finalize, apply), which says
  which pass to work on next. The backward's partial-sums pass shares the statistics loop's stages:
  the whole backward is timed per stage count, without PDL, one-pass (NCHW only: its tile), per
  channels in its partial-sums and dx tiles (NCHW only), and as the cluster kernel. Rows name the
  knobs they change.
- temporal_attention: warps per program of the forward and of the backward kernel (FWD_WARPS /
  BWD_WARPS in hbkernels/triton/temporal_attention.py: the default rule, or a fixed 1, 2, 4, 8).

    python -m bench.sweep [--quick] [--op group_norm|temporal_attention] [--knob ONE_PASS,APPLY_EVICT_FIRST]
                          [--out bench/results]
"""
import argparse
import itertools
import os
from unittest import mock

import torch

import hbkernels
from bench import common
from bench.ops import eager_group_norm_silu, hb_attention
from bench.unet_step import kernel_breakdown
from hbkernels.triton import group_norm as gn
from hbkernels.triton import temporal_attention as ta

# (label, shape, memory format)
GN_SHAPES = [(f"vc2 L0 B1 T{t}{' CL' if cl else ''}", (1, 320, t, 40, 64),
              torch.channels_last_3d if cl else torch.contiguous_format) for t in (16, 26) for cl in (False, True)]
# The statistics grid. Dropped after the tenth session's H100 run (level 0, T16, NCHW and channels-last):
# 12 programs per SM and 2 stages never won (0.8-6.8 us behind the best, forward and backward), at
# 16-channel NCHW tiles. Since the one-channel tiles (9cf4c6b) the statistics pass still profiles 14.75
# us at T16, where a read pass of one 8 KiB tile per program takes about 8 (bench/memory_floor.py): a
# channel's row now splits into few chunks (4 at 8 per SM), so the grid adds 16 per SM, and one tile
# per program (64 per SM asks for more chunks than a row has tiles), the read floor's shape.
GN_PROGRAMS_PER_SM = (6, 8, 16)
GN_TILES = (1024, 2048)
GN_STAGES = (3, 4, 5)
GN_ONE_TILE_POINTS = [(64, 4096, 1), (64, 4096, 3), (64, 2048, 1)]  # (programs per SM, tile, stages)
GN_APPLY_TILES = (4096, 8192, 16384)  # each layout's default is timed once, in the grid
# Channels per NCHW tile (statistics, apply, pairs of both; the backward's partial sums)
GN_NCHW_CHANNELS = (1, 2, 4, 8, 16)
GN_NCHW_CHANNEL_PAIRS = [(s, a) for s in (1, 2, 16) for a in (1, 2, 16)]
# The cluster forward (CLUSTER_FORWARD: one kernel, x held in shared memory) with its own
# choice of blocks per cluster (None), then forced: level 0 fp16 needs at least 4 at T16, 6 at T26 (a
# forced count that cannot hold a group leaves the Triton passes to run: the row's "cluster" says)
GN_CLUSTER_BLOCKS = (None, 4, 6, 8, 12, 16)
GN_COOPERATIVE_STAGES = (1, 2, 4)  # groups per block of the cooperative forward (level 0 T16: 4, 8, 16 blocks each)
GN_CLUSTER_BACKWARD_BLOCKS = (None, 8, 12, 16)  # dy and x held: level 0 fp16 needs 8 at T16, 12 at T26
GN_ONE_PASS_TILES = (8192,)  # besides the default; level 0 T16: 50 programs per group instead of 100
# (label, tokens N, frames T, heads, head dim): VideoCrafter2 / Hummingbird level 0 at 320x512, batch 1
ATTN_SHAPES = [(f"vc2 L0 B1 T{t}", 40 * 64, t, 5, 64) for t in (16, 26)]
ATTN_WARPS = (None, 1, 2, 4, 8)


def _gn_forward_settings():
    """Knob values per timed forward setting: the statistics grid (other knobs at their defaults), then
    the default with one other knob changed."""
    grid = [dict(STATS_PROGRAMS_PER_SM=p, _STATS_TILE=t, STATS_STAGES=s)
            for p, t, s in [*itertools.product(GN_PROGRAMS_PER_SM, GN_TILES, GN_STAGES), *GN_ONE_TILE_POINTS]]
    return grid + [dict(APPLY_REVERSED=not gn.APPLY_REVERSED), dict(APPLY_EVICT_FIRST=not gn.APPLY_EVICT_FIRST),
                   dict(PDL=not gn.PDL), dict(CHANNEL_BLOCKS_FIRST=not gn.CHANNEL_BLOCKS_FIRST)] + \
        [dict(_APPLY_TILE=t) for t in GN_APPLY_TILES] + \
        [dict(_STATS_CHANNELS_NCHW=c) for c in GN_NCHW_CHANNELS] + \
        [dict(_APPLY_CHANNELS_NCHW=c) for c in GN_NCHW_CHANNELS] + \
        [dict(_STATS_CHANNELS_NCHW=s, _APPLY_CHANNELS_NCHW=a) for s, a in GN_NCHW_CHANNEL_PAIRS] + \
        [dict(CLUSTER_FORWARD=True, CLUSTER_BLOCKS=b) for b in GN_CLUSTER_BLOCKS] + \
        [dict(CLUSTER_FORWARD=True, CLUSTER_COOPERATIVE=True, CLUSTER_BLOCKS=None, CLUSTER_STAGES=s)
         for s in GN_COOPERATIVE_STAGES]  # one grid: its plan's blocks


def _gn_backward_settings():
    """Knob values per timed backward setting: each stage count of the partial-sums loop, PDL switched,
    and the one-pass backward's settings."""
    return [dict(STATS_STAGES=s) for s in GN_STAGES] + [dict(PDL=not gn.PDL), *_one_pass_settings()] + \
        [dict(_BWD_CHANNELS_NCHW=c) for c in GN_NCHW_CHANNELS] + \
        [dict(_BWD_APPLY_CHANNELS_NCHW=c) for c in GN_NCHW_CHANNELS] + \
        [dict(CLUSTER_BACKWARD=True, CLUSTER_BLOCKS=b) for b in GN_CLUSTER_BACKWARD_BLOCKS]


def _one_pass_settings():
    """The one-pass backward switched (at its default tile), and on at each larger tile: fewer programs
    per group, more bytes each."""
    return [dict(ONE_PASS=not gn.ONE_PASS)] + [dict(ONE_PASS=True, _ONE_PASS_MIN_TILE=t) for t in GN_ONE_PASS_TILES]


# Knobs that change nothing on channels-last tensors where set (true)
NCHW_ONLY = ("ONE_PASS", "_STATS_CHANNELS_NCHW", "_APPLY_CHANNELS_NCHW", "_BWD_CHANNELS_NCHW",
             "_BWD_APPLY_CHANNELS_NCHW")
# Knobs that change nothing on NCHW tensors where set (true)
CHANNELS_LAST_ONLY = ("CHANNEL_BLOCKS_FIRST",)


def _gn_settings_for(settings, fmt, only=None):
    """The settings that change what runs on tensors of memory format ``fmt``, under that layout's knob
    names (_for_layout): the one-pass backward and the NCHW tile widths (NCHW_ONLY) change nothing on
    channels-last tensors, the launch order (CHANNELS_LAST_ONLY) nothing on NCHW ones (either would
    time the default under its label), and a one-knob setting equal to the layout's default is left to
    the statistics grid's default point. With ``only`` (knob names), just the settings that set one of
    them, and that default point to compare with; none where no setting sets one."""
    chosen, matched = [], only is None
    for k in settings:
        if any(k.get(name) for name in NCHW_ONLY) and fmt != torch.contiguous_format:
            continue
        if any(k.get(name) for name in CHANNELS_LAST_ONLY) and fmt == torch.contiguous_format:
            continue
        k = _for_layout(k, fmt)
        grid_point = "STATS_STAGES" in k
        if _is_default(gn, k) and not grid_point:
            continue
        hit = only is None or any(name in k for name in only)
        matched |= hit
        if hit or (grid_point and _is_default(gn, k)):
            chosen.append(k)
    return chosen if matched else []


# Knobs with a value of their own for channels-last x: the sweep sets those on channels-last shapes
CHANNELS_LAST_KNOBS = {"_STATS_TILE": "_STATS_TILE_CHANNELS_LAST", "_APPLY_TILE": "_APPLY_TILE_CHANNELS_LAST"}


def _for_layout(knobs, fmt):
    """``knobs`` with the channels-last names of the tiles on channels-last shapes."""
    if fmt == torch.contiguous_format:
        return knobs
    return {CHANNELS_LAST_KNOBS.get(name, name): value for name, value in knobs.items()}


def _for_layout_names(knobs):
    """The knob names a setting sets, under either layout's names."""
    return {*knobs, *(CHANNELS_LAST_KNOBS[name] for name in knobs if name in CHANNELS_LAST_KNOBS)}


def _knobs_label(module, knobs):
    """'name=value ...' of a setting, marked when it is the module's default."""
    label = " ".join(f"{name.strip('_').lower()}={value}" for name, value in knobs.items())
    return label + (" (default)" if _is_default(module, knobs) else "")


def _is_default(module, knobs):
    return all(getattr(module, name) == value for name, value in knobs.items())


def sweep_group_norm(report, dev, min_time, only=None):
    from hbkernels import triton as kernels

    for label, shape, fmt in GN_SHAPES:
        forward = _gn_settings_for(_gn_forward_settings(), fmt, only)
        backward = _gn_settings_for(_gn_backward_settings(), fmt, only)
        if not forward and not backward:
            continue  # the knobs do nothing on this memory format
        x = (torch.randn(shape, device=dev, dtype=torch.float16) + 1).contiguous(memory_format=fmt)
        w, b = (torch.randn(shape[1], device=dev, dtype=torch.float16) for _ in range(2))
        bytes_moved = 2 * x.numel() * 2
        eager = common.median_seconds_graphed(eager_group_norm_silu, min_time, (x, w, b))
        report.add("group_norm_silu", label, "eager", eager, bytes_moved)

        def call(x=x):
            return hbkernels.group_norm(x, 32, w, b, activation="silu")

        for knobs in forward:
            impl, extra = _knobs_label(gn, knobs), {}
            profile = _is_default(gn, knobs) and "STATS_STAGES" in knobs  # the grid's default point
            if knobs.get("CLUSTER_FORWARD"):
                extra["cluster"] = _cluster_plan(x, knobs["CLUSTER_BLOCKS"], knobs.get("CLUSTER_COOPERATIVE"),
                                                 stages=knobs.get("CLUSTER_STAGES", 1))
            with mock.patch.multiple(gn, **knobs):
                if profile:  # over the timing's rotated inputs: x alone would stay in L2 between calls
                    sets = common.input_sets((x,), common.cache_bytes(dev))
                    top = kernel_breakdown(lambda: [call(*s) for s in sets], calls=max(1, 20 // len(sets)))
                    top = top["families"]["hbkernels group_norm"]["top"]
                    extra["kernel_us"] = {name: round(ms * 1e3 / len(sets), 2) for name, ms in top}
                _add(report, "group_norm_silu", label, impl, common.median_seconds_graphed(call, min_time, (x,)),
                     bytes_moved, **extra)

        # the backward's kernels alone (partial sums, finalize, dx): reads dy and x twice, writes dx
        x4, dy4, dx4 = x.flatten(3), torch.randn_like(x).flatten(3), torch.empty_like(x).flatten(3)
        mean, rstd = torch.randn(1, 32, device=dev), torch.rand(1, 32, device=dev) + 0.5
        dw, db = (torch.empty(shape[1], device=dev) for _ in range(2))
        for knobs in backward:
            impl = _knobs_label(gn, knobs)
            extra = {}
            if knobs.get("CLUSTER_BACKWARD"):
                extra["cluster"] = _cluster_plan(x, knobs["CLUSTER_BLOCKS"], backward=True)
            with mock.patch.multiple(gn, **knobs):
                seconds = common.median_seconds_graphed(
                    kernels.gn_bwd, min_time, (dy4, x4, w, b, None, mean, rstd, dx4, dw, db, 32, True))
            _add(report, "group_norm_silu_backward", label, impl, seconds, 3 * x.numel() * 2, **extra)


def _cluster_plan(x, blocks, cooperative=False, backward=False, stages=1):
    """What the cluster forward (backward) runs for x (32 groups) with ``blocks`` per cluster (None: its
    choice), or as one ``cooperative`` grid in ``stages``."""
    from hbkernels.cuda import group_norm as cluster
    from hbkernels.ops.group_norm import video_view

    xv = video_view(x)
    planned = cluster.plan_for(32, blocks, backward, xv, xv, cooperative=bool(cooperative), stages=stages)
    if planned is None:
        return "none: the Triton passes ran"
    p, layout = planned
    if cooperative:
        return f"{layout}, cooperative, {p.stages} stage(s), {p.blocks} blocks per group, {p.smem} B per block, " \
            f"{cluster.resident_blocks(x.device.index, p.smem)} blocks resident"
    return f"{layout}, {p.blocks} blocks of {p.smem} B, {cluster.resident(x.device.index, p.blocks, p.smem)} " \
        "clusters resident"


def sweep_temporal_attention(report, dev, min_time):
    from hbkernels import triton as kernels

    for label, n, t, heads, d in ATTN_SHAPES:
        case = f"{label} N={n} H={heads} D={d}"
        q, k, v = (torch.randn(n, t, heads * d, device=dev, dtype=torch.float16) for _ in range(3))
        for warps in ATTN_WARPS:
            with mock.patch.object(ta, "FWD_WARPS", warps):
                seconds = common.median_seconds_graphed(hb_attention, min_time, (q, k, v, heads))
            _add(report, "temporal_attention", case, _warps_label(warps), seconds, 4 * q.numel() * 2)
        # the backward kernel alone: reads q, k, v, dO (and the row statistics), writes dq, dk, dv
        q, k, v, do = (x.view(n, t, heads, d) for x in (q, k, v, torch.randn_like(q)))
        out, grads = torch.empty_like(q), [torch.empty_like(q) for _ in range(3)]
        stats = torch.empty(n, heads, t, kernels.ATTN_ROW_STATS, device=dev)
        kernels.attn_fwd(q, k, v, out, stats, d ** -0.5, False)
        for warps in ATTN_WARPS:
            with mock.patch.object(ta, "BWD_WARPS", warps):
                seconds = common.median_seconds_graphed(
                    kernels.attn_bwd, min_time, (do, q, k, v, out, stats, *grads, d ** -0.5, False))
            _add(report, "temporal_attention_backward", case, _warps_label(warps), seconds, 7 * q.numel() * 2)


def _warps_label(warps):
    return "warps: default rule" if warps is None else f"warps={warps}"


def _add(report, suite, case, impl, seconds, bytes_moved, **extra):
    report.add(suite, case, impl, seconds, bytes_moved, **extra)
    row = report.rows[-1]
    print(f"{suite} | {case} | {impl} | {seconds * 1e6:.1f} us | {row.gbps:.0f} GB/s ({row.pct_copy_bw:.0f}% of copy)"
          f"{' | ' + str(extra) if extra else ''}", flush=True)


SWEEPS = {"group_norm": sweep_group_norm, "temporal_attention": sweep_temporal_attention}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short timing")
    parser.add_argument("--op", choices=sorted(SWEEPS), action="append", help="sweep only this op (repeatable)")
    parser.add_argument("--knob", help="group_norm: time only the settings that set one of these knobs "
                                       "(comma-separated, e.g. ONE_PASS,APPLY_EVICT_FIRST)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if args.knob and set(args.op or ["group_norm"]) != {"group_norm"}:
        parser.error("--knob filters group_norm's settings: use it with --op group_norm alone")
    if args.knob:
        known = {name for k in _gn_forward_settings() + _gn_backward_settings() for name in _for_layout_names(k)}
        unknown = sorted(set(args.knob.split(",")) - known)
        if unknown:
            parser.error(f"--knob: no group_norm setting sets {', '.join(unknown)}; knobs: {', '.join(sorted(known))}")
    dev, report = common.graph_report(parser, "the sweeps time GPU kernels")
    min_time = 0.05 if args.quick else 0.2
    knobs = {"only": args.knob.split(",")} if args.knob else {}
    for op in args.op or (["group_norm"] if args.knob else list(SWEEPS)):
        SWEEPS[op](report, dev, min_time, **knobs)
    # a filtered run must not overwrite the full one
    ops = [] if args.op is None or set(args.op) == set(SWEEPS) else sorted(set(args.op))
    report.save(args.out, "sweep", "float16", *ops, *([f"knobs-{common.slug(args.knob)}"] if args.knob else []))


if __name__ == "__main__":
    main()
