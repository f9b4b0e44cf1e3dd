"""Benchmark plumbing shared by the suites: timing, device facts, and result files."""
import contextlib
import datetime
import glob
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
from dataclasses import asdict, dataclass, field

import torch
from torch.utils import benchmark

from hummingbird.cuda_graph import capture


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def git_commit() -> str:
    """The checked-out commit (-dirty with local changes), or HBKERNELS_COMMIT where that is set: a lent
    GPU's copy of the working tree can carry a stale .git, which reported an older HEAD plus "-dirty"."""
    if os.environ.get("HBKERNELS_COMMIT"):
        return os.environ["HBKERNELS_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# blocked_autorange stops once min_run_time is spent: a call (or graph replay) longer than that, or a
# --quick run's 0.05 s, leaves ONE block, whose "median" is then a single sample, outliers included.
MIN_SAMPLES = 5


def median_seconds(fn, min_run_time: float = 0.3, args: tuple = ()) -> float:
    """Median wall time of ``fn(*args)`` via torch.utils.benchmark (synchronises CUDA, uses every CPU
    thread torch uses), over at least MIN_SAMPLES blocks. The calls go round copies of ``args``
    (input_sets over the last-level cache of their device), so no call finds its inputs still cached."""
    tensors = [a for a in args if torch.is_tensor(a)]
    sets = input_sets(args, cache_bytes(tensors[0].device)) if tensors else [args]
    next_args = itertools.cycle(sets).__next__
    fn(*args)  # warm-up: compiles Triton kernels / torch.compile graphs outside the measurement
    timer = benchmark.Timer(stmt="fn(*next_args())", globals={"fn": fn, "next_args": next_args},
                            num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(measurement.times)  # seconds per call, one per block
    while len(times) < MIN_SAMPLES:
        times += timer.timeit(measurement.number_per_run).times
    return statistics.median(times)


# Timing reads each input set again only after touching this many last-level caches' worth of other
# sets, so inputs come from DRAM as in the copy that defines 100% (and as after a model's other layers),
# not from the cache the previous call left them in. At most _MAX_INPUT_SETS copies: inputs under 1/20
# of the cache (small shapes, latency-bound anyway) stay partly resident.
COLD_CACHE_FACTOR = 3
_MAX_INPUT_SETS = 64


# AMD Instinct GPUs whose last-level cache is the Infinity Cache (MALL) behind the L2 the driver reports
# (MI300 / MI325: gfx940-942, MI350: gfx950): 256 MB
_AMD_INFINITY_CACHE = {arch: 256 * 2**20 for arch in ("gfx940", "gfx941", "gfx942", "gfx950")}


def cache_bytes(dev: torch.device) -> int:
    """The device's last-level cache: a GPU's L2 (AMD Instinct: its Infinity Cache where it has one),
    a CPU's highest cache level, all its instances together (0 where unknown: no rotation)."""
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        arch = getattr(props, "gcnArchName", "").split(":")[0] if torch.version.hip else ""
        return max(props.L2_cache_size, _AMD_INFINITY_CACHE.get(arch, 0))
    return cpu_cache_bytes()


def _size(text: str) -> int:
    """A sysfs cache size in bytes: binary units ("48K", "2048K", "32M")."""
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def _cpu_list(text: str) -> set:
    """A sysfs CPU list ("0-3,8,10-11") as a set of CPU numbers."""
    cpus = set()
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def cpu_cache_bytes(root: str = "/sys/devices/system/cpu", cpus=None) -> int:
    """The highest cache level's instances summed (one per chiplet or socket on many-core CPUs, each
    named by the CPUs that share it), those shared with ``cpus`` (default: the CPUs this process may
    run on; a container's few CPUs on a many-chiplet host reach only their own caches)."""
    if cpus is None and hasattr(os, "sched_getaffinity"):
        cpus = os.sched_getaffinity(0)
    cpus = None if cpus is None else set(cpus)
    caches = {}
    for index in glob.glob(os.path.join(root, "cpu[0-9]*", "cache", "index[0-9]*")):
        try:
            fields = {}
            for name in ("level", "type", "size", "shared_cpu_list"):
                with open(os.path.join(index, name)) as f:
                    fields[name] = f.read().strip()
            if cpus is not None and not _cpu_list(fields["shared_cpu_list"]) & cpus:
                continue
            caches[(int(fields["level"]), fields["type"], fields["shared_cpu_list"])] = _size(fields["size"])
        except (OSError, ValueError):
            continue
    if not caches:
        return 0
    top = max(level for level, _, _ in caches)
    return sum(size for (level, _, _), size in caches.items() if level == top)


def input_sets(args: tuple, cache: int) -> list:
    """``args`` and copies of it (other values shared): enough sets that going through them touches
    COLD_CACHE_FACTOR x ``cache`` bytes, at most _MAX_INPUT_SETS. Each copy keeps the tensors' layout,
    offsets and strides included, and which of them view one storage (e.g. q, k, v of one projection)."""
    storages = {a.untyped_storage().data_ptr(): a.untyped_storage() for a in args if torch.is_tensor(a)}
    nbytes = max(1, sum(st.nbytes() for st in storages.values()))
    count = min(_MAX_INPUT_SETS, max(1, math.ceil(COLD_CACHE_FACTOR * cache / nbytes)))
    sets = [args]
    for _ in range(count - 1):
        copies = {}
        for key, st in storages.items():
            copies[key] = torch.empty(st.nbytes(), dtype=torch.uint8, device=st.device).untyped_storage()
            copies[key].copy_(st)
        sets.append(tuple(a.new_empty(0).set_(copies[a.untyped_storage().data_ptr()], a.storage_offset(), a.shape,
                                              a.stride()) if torch.is_tensor(a) else a for a in args))
    return sets


def median_seconds_graphed(fn, min_run_time: float = 0.3, args: tuple = (), calls: int = 10) -> float:
    """Median GPU time of one ``fn(*args)``: at least ``calls`` calls captured in one CUDA graph and
    replayed, so the host-side launch cost (Python, the dispatcher, Triton's launcher) drops out and
    what is left is the kernels' own time, the figure to hold against memory bandwidth. The calls go
    round copies of ``args`` (input_sets) and keep their outputs, so neither inputs nor outputs are
    still in L2 from the call before."""
    sets = input_sets(args, cache_bytes(torch.device("cuda", torch.cuda.current_device())))
    # whole rounds of the sets: a partial round would end on a set the next replay starts with
    calls = math.ceil(max(calls, len(sets)) / len(sets)) * len(sets)

    def repeated():
        return [fn(*sets[i % len(sets)]) for i in range(calls)]

    graph, _outputs = capture(repeated)
    return median_seconds(graph.replay, min_run_time) / calls


def copy_bandwidth(dev: torch.device) -> float:
    """Measured device copy bandwidth in bytes/s (read + write), the 100% mark for memory-bound ops."""
    numel = (256 if dev.type == "cuda" else 32) * 2**20 // 4
    src = torch.randn(numel, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / median_seconds(torch.Tensor.copy_, args=(dst, src))


WALL_TIMING = (f"wall time per call (launch overhead included), inputs rotating through >= {COLD_CACHE_FACTOR}x "
               "the last-level cache")
MODEL_TIMING = "wall time per call (launch overhead included), the same inputs each call (the weights exceed any cache)"
GRAPH_TIMING = f"CUDA-graph replays, inputs rotating through >= {COLD_CACHE_FACTOR}x L2 (kernel time, DRAM-cold)"


@dataclass
class Row:
    suite: str
    case: str
    impl: str
    median_ms: float
    bytes_moved: int = 0  # minimum traffic of the op (inputs read once, outputs written once)
    gbps: float = 0.0
    pct_copy_bw: float = 0.0
    speedup_vs_eager: float = 0.0
    speedup_vs_best_other: float = 0.0  # hbkernels rows: against the fastest row of the case that is not hbkernels
    extra: dict = field(default_factory=dict)


@dataclass
class Report:
    device: str
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    commit: str = field(default_factory=git_commit)
    torch: str = torch.__version__
    copy_gbps: float = 0.0
    timing: str = ""  # how the medians were taken (WALL_TIMING, GRAPH_TIMING)
    rows: list = field(default_factory=list)

    def add(self, suite, case, impl, seconds, bytes_moved=0, **extra):
        gbps = bytes_moved / seconds / 1e9 if bytes_moved else 0.0
        self.rows.append(Row(suite, case, impl, seconds * 1e3, bytes_moved, gbps,
                             100 * gbps / self.copy_gbps if self.copy_gbps and gbps else 0.0, extra=extra))

    def finish(self):
        """Fill each row's % of copy bandwidth (against the final ``copy_gbps``: a run may measure it
        again at its end) and its speedup against the eager row of the same case (``eager``, else the
        first ``eager, <model state>`` row: a run filtered to one state)."""
        for r in self.rows:
            r.pct_copy_bw = 100 * r.gbps / self.copy_gbps if self.copy_gbps and r.gbps else 0.0
        timed = [r for r in self.rows if not math.isnan(r.median_ms)]  # failed rows are NaN: no speedups
        eager = {(r.suite, r.case): r.median_ms for r in timed if r.impl == "eager"}
        for r in timed:
            if r.impl.startswith("eager, "):
                eager.setdefault((r.suite, r.case), r.median_ms)
        best = {}  # the fastest of what users run instead (eager, SDPA, xformers, torch.compile, ...)
        for r in timed:
            if not r.impl.startswith("hbkernels"):
                best[(r.suite, r.case)] = min(best.get((r.suite, r.case), math.inf), r.median_ms)
        for r in timed:
            if (r.suite, r.case) in eager:
                r.speedup_vs_eager = eager[(r.suite, r.case)] / r.median_ms
            if r.impl.startswith("hbkernels") and (r.suite, r.case) in best:
                r.speedup_vs_best_other = best[(r.suite, r.case)] / r.median_ms

    def write(self, out_dir: str, stem: str) -> list:
        self.finish()
        os.makedirs(out_dir, exist_ok=True)
        base = os.path.join(out_dir, stem)
        # strict JSON: a failed row's NaN time is written as null
        atomic_write(base + ".json", json.dumps(_nan_to_none(asdict(self)), indent=1, allow_nan=False))
        atomic_write(base + ".md", self.markdown())
        paths = [base + ".json", base + ".md"]
        if self.plot(base + ".png"):
            paths.append(base + ".png")
        elif importlib.util.find_spec("matplotlib") is None:
            print("no speedup plot: pip install matplotlib")
        return paths

    def save(self, out_dir: str, *name_parts: str) -> list:
        """Write the report as ``<part>-<device>-<part>...`` files, print it, and return the paths."""
        stem = "-".join([name_parts[0], slug(self.device), *name_parts[1:]])
        paths = self.write(out_dir, stem)
        print(self.markdown())
        print("wrote " + ", ".join(paths))
        return paths

    def markdown(self) -> str:
        copy = f", copy bandwidth {self.copy_gbps:.1f} GB/s" if self.copy_gbps else ""
        has_notes = any(_notes(r) for r in self.rows)
        lines = [f"# hbkernels benchmark — {self.device}", "",
                 f"date {self.date}, commit {self.commit}, torch {self.torch}{copy}", "",
                 *([f"timing: {self.timing}", ""] if self.timing else []),
                 "| suite | case | impl | median ms | GB/s | % copy BW | speedup vs eager | vs best other |"
                 + (" notes |" if has_notes else ""),
                 "|---|---|---|---:|---:|---:|---:|---:|" + ("---|" if has_notes else "")]
        for r in self.rows:
            best = f"{r.speedup_vs_best_other:.2f}x" if r.speedup_vs_best_other else ""
            vs_eager = f"{r.speedup_vs_eager:.2f}x" if r.speedup_vs_eager else ""  # no eager row in the case
            notes = f" {_notes(r)} |" if has_notes else ""
            gbps, pct = (f"{r.gbps:.1f}", f"{r.pct_copy_bw:.0f}") if r.bytes_moved else ("", "")  # no byte count
            lines.append(f"| {r.suite} | {r.case} | {r.impl} | {r.median_ms:.3f} | {gbps} | {pct} | {vs_eager} | "
                         f"{best} |{notes}")
        return "\n".join(lines) + "\n"

    def plot(self, path: str) -> bool:
        """Speedup of every non-eager implementation per case (skipped without matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        rows = [r for r in self.rows if r.impl != "eager" and r.speedup_vs_eager]
        if not rows:
            return False
        cases = list(dict.fromkeys(f"{r.suite}: {r.case}" for r in rows))
        impls = list(dict.fromkeys(r.impl for r in rows))
        fig, ax = plt.subplots(figsize=(10, 0.35 * len(cases) * len(impls) + 1.5))
        height = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            vals = {f"{r.suite}: {r.case}": r.speedup_vs_eager for r in rows if r.impl == impl}
            ys = [j + i * height for j, c in enumerate(cases) if c in vals]
            ax.barh(ys, [vals[c] for c in cases if c in vals], height=height, label=impl)
        ax.set_yticks([j + 0.4 - height / 2 for j in range(len(cases))], cases, fontsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("speedup vs PyTorch eager (higher is better)")
        ax.set_title(f"{self.device} — {self.commit}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        try:
            _replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")  # savefig reads it
        finally:
            plt.close(fig)
        return True


def _notes(row: Row) -> str:
    """A row's text notes for the table (an error, what a knob's setting actually ran): without them a
    row whose setting fell back to the default reads as a tie with it."""
    return "; ".join(f"{k}: {v}" for k, v in row.extra.items() if isinstance(v, str)).replace("|", "/")


def _nan_to_none(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def graph_report(parser, what: str):
    """(device, Report) of a GPU-only run timed as CUDA-graph replays, its copy bandwidth measured and
    printed; without a CUDA GPU, the parser's error saying that ``what`` needs one."""
    dev = device()
    if dev.type != "cuda":
        parser.error(f"{what}: they need a CUDA GPU")
    report = Report(device=device_name(dev), timing=GRAPH_TIMING)
    report.copy_gbps = copy_bandwidth(dev) / 1e9
    print(f"{report.device}: copy bandwidth {report.copy_gbps:.1f} GB/s, commit {report.commit}")
    return dev, report


def slug(text: str) -> str:
    """``text`` as a file-name part: alphanumerics kept, the rest dashes, lower case."""
    return "".join(ch if ch.isalnum() else "-" for ch in text).strip("-").lower()


def _replace_atomically(path: str, write, suffix: str = "") -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then renamed over it. If that fails (a full
    disk, an interrupt), the old file stays and no temporary one is left."""
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _replace_atomically(path, write)
