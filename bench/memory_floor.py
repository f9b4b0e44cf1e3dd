"""What the memory system allows GroupNorm's forward at the U-Net's level-0 shapes (fp16): synthetic
kernels with GroupNorm's traffic, timed like bench.sweep's rows (CUDA-graph replays, DRAM-cold) and
reported against the same bytes (x read once, y written once), so each forward schedule has a floor:

- copy: x read once, y written once (torch's copy_, and the Triton tiles below with no re-read): the
  floor of any forward, and what 2.5 TB/s (21 us at T16) is held against.
- re-read D MB behind: every tile of x read, then read again about D MB of x later (in launch order)
  while y is written: the floor of a forward whose second read trails its first (a lagged forward,
  one persistent kernel, was timed against these and removed: see group_norm.py). Where the second
  read hits L2 this is the copy; where it misses, DRAM sees x twice.
- the same on persistent programs in rounds (like such a forward's tickets), each re-reading
  tiles it read itself some rounds before: whether a second read from the first read's SM does better;
  and with L2 eviction hints (x's first read kept, its second read and y evicted first).
- two kernels: a read-only pass over x (tile sums, like the statistics) then a copy pass, forward or
  in reverse (APPLY_REVERSED), and reversed with the copy's accesses evict-first (APPLY_EVICT_FIRST:
  y's stores displace less of the x still to be read): the floor of the two-pass forward without its
  finalize.
- read x alone: the read-only pass by itself, the floor of the statistics pass (its row's GB/s count x
  only).

    python -m bench.memory_floor [--quick] [--out bench/results]
"""
import argparse
import os

import torch
import triton
import triton.language as tl

from bench import common
from hbkernels.triton.layout import cdiv, sm_count

SHAPES = [(f"vc2 L0 B1 T{t}", (1, 320, t, 40, 64)) for t in (16, 26)]
REREAD_MB = (1, 2, 4, 8, 16, 32)  # distances within x's size are timed
HINTED_MB = (4, 16)  # also timed with eviction hints
PERSISTENT_PER_SM = 4  # programs per SM of the persistent schedule
REREAD_ROUNDS = (1, 2, 4)  # same-program re-reads: rounds of every persistent program's tiles behind
TILE = 4096  # elements per program: 8 KiB of fp16


@triton.jit
def _reread_kernel(x_ptr, y_ptr, sums_ptr, numel, lag, programs, READ: tl.constexpr, WRITE: tl.constexpr,
                   REVERSE: tl.constexpr, HINTS: tl.constexpr, TILE: tl.constexpr):
    """Steps i = program id + k * programs (one step each where the grid covers them all): READ sums
    tile i of x into sums[i]; WRITE copies tile i - lag (the last tile first where REVERSE) of x to y.
    One launch doing both reads every tile twice, ``lag`` tiles apart; with ``lag`` a multiple of
    ``programs``, both reads of a tile come from the same program. HINTS: L2 eviction hints that keep x
    between its reads (evict-last on the first, evict-first on the second and on y)."""
    offs = tl.arange(0, TILE)
    n_tiles = tl.cdiv(numel, TILE)
    for i in range(tl.program_id(0), n_tiles + lag, programs):
        if READ:
            if i < n_tiles:
                at = tl.cast(i, tl.int64) * TILE + offs  # tl.cast: the interpreter's loop index is an int
                x = tl.load(x_ptr + at, mask=at < numel, other=0.0, eviction_policy="evict_last" if HINTS else "")
                tl.store(sums_ptr + i, tl.sum(x.to(tl.float32), axis=0))
        if WRITE:
            j = n_tiles - 1 - i if REVERSE else i - lag
            if j >= 0:
                at = tl.cast(j, tl.int64) * TILE + offs
                policy: tl.constexpr = "evict_first" if HINTS else ""
                tl.store(y_ptr + at, tl.load(x_ptr + at, mask=at < numel, eviction_policy=policy), mask=at < numel,
                         eviction_policy=policy)


def reread(x, y, sums, lag: int, programs: int = 0, hints: bool = False, tile: int = TILE) -> None:
    """One launch: every tile of flat x summed into ``sums``, and copied to y ``lag`` tiles later; on
    ``programs`` persistent programs (0: one per step); ``hints``: L2 eviction hints."""
    steps = cdiv(x.numel(), tile) + lag
    programs = min(programs or steps, steps)
    _reread_kernel[(programs,)](x, y, sums, x.numel(), lag, programs, READ=True, WRITE=True, REVERSE=False,
                                HINTS=hints, TILE=tile)


def read_only(x, y, sums, tile: int = TILE) -> None:
    """The tile sums of flat x alone, one tile per program: the floor of a statistics pass."""
    n_tiles = cdiv(x.numel(), tile)
    _reread_kernel[(n_tiles,)](x, y, sums, x.numel(), 0, n_tiles, READ=True, WRITE=False, REVERSE=False,
                               HINTS=False, TILE=tile)


def two_kernels(x, y, sums, reverse: bool, hints: bool = False, tile: int = TILE) -> None:
    """The tile sums of flat x, then (a second launch) the copy of x to y, the last tile first where
    ``reverse``; ``hints``: the copy's accesses evict-first (as APPLY_EVICT_FIRST)."""
    n_tiles = cdiv(x.numel(), tile)
    for read in (True, False):
        _reread_kernel[(n_tiles,)](x, y, sums, x.numel(), 0, n_tiles, READ=read, WRITE=not read,
                                   REVERSE=reverse and not read, HINTS=hints and not read, TILE=tile)


def cases(x, programs: int):
    """(label, fn(x, y, sums), passes) of every floor timed on flat fp16 ``x``; ``programs``: the
    persistent schedule's grid. ``passes``: the passes over x's bytes its GB/s counts: GroupNorm's own
    two (x read, y written), or one for the read pass alone."""
    nbytes = x.numel() * x.element_size()
    tile_bytes = TILE * x.element_size()
    yield "torch copy_", lambda x, y, sums: y.copy_(x), 2
    yield "copy (one read)", lambda x, y, sums: reread(x, y, sums, 0), 2
    for mb in REREAD_MB:
        if mb * 2**20 < nbytes:
            lag = int(mb * 2**20) // tile_bytes
            yield f"re-read {mb} MB behind", lambda x, y, sums, lag=lag: reread(x, y, sums, lag), 2
            if mb in HINTED_MB:
                yield f"re-read {mb} MB behind, eviction hints", \
                    lambda x, y, sums, lag=lag: reread(x, y, sums, lag, hints=True), 2
    # persistent programs (tiles in rounds), the second read from the program, so the SM, that made the first
    yield f"copy, {programs} persistent programs", lambda x, y, sums: reread(x, y, sums, 0, programs), 2
    for rounds in REREAD_ROUNDS:
        if rounds * programs * tile_bytes < nbytes:
            yield (f"re-read {rounds * programs * tile_bytes / 2**20:.1f} MB behind, same program",
                   lambda x, y, sums, lag=rounds * programs: reread(x, y, sums, lag, programs), 2)
    for reverse, hints in ((False, False), (True, False), (True, True)):
        yield f"two kernels{', copy reversed' if reverse else ''}{', copy evict-first' if hints else ''}", \
            lambda x, y, sums, reverse=reverse, hints=hints: two_kernels(x, y, sums, reverse, hints), 2
    yield READ_ONLY, read_only, 1


READ_ONLY = "read x alone (GB/s of x)"


def run(report, dev, min_time):
    for label, shape in SHAPES:
        x = torch.randn(shape, device=dev, dtype=torch.float16).flatten()
        y = torch.empty_like(x)
        sums = torch.empty(cdiv(x.numel(), TILE), device=dev)
        for impl, fn, passes in cases(x, PERSISTENT_PER_SM * sm_count(dev)):
            seconds = common.median_seconds_graphed(fn, min_time, (x, y, sums))
            report.add("memory_floor", label, impl, seconds, passes * x.numel() * x.element_size())
            row = report.rows[-1]
            print(f"{label} | {impl} | {seconds * 1e6:.1f} us | {row.gbps:.0f} GB/s ({row.pct_copy_bw:.0f}% of copy)",
                  flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.memory_floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short timing")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    dev, report = common.graph_report(parser, "the floors are GPU memory-system timings")
    run(report, dev, 0.05 if args.quick else 0.2)
    report.save(args.out, "memory_floor", "float16")


if __name__ == "__main__":
    main()
