"""The cluster GroupNorm forward and backward (``group_norm_cluster.cu``: one thread-block cluster per
(sample, group) holding the group in shared memory, each input read from DRAM once; the forward also as
one cooperative grid of such blocks): where they apply, and their launches.

:func:`layout` and :func:`plan` are plain arithmetic on strides, shapes and the device's limits (tested
on CPU); :func:`try_gn_fwd` / :func:`try_gn_bwd` launch when the device and the tensors allow it and
otherwise return False, so that the Triton kernels run instead.
"""
import ctypes
import functools
import warnings
from dataclasses import dataclass

import torch

from hbkernels.cuda import build

SOURCE = "group_norm_cluster.cu"
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Bytes a thread moves at once: 16 where a group is one contiguous run (NCHW), 4 where it is pieces of
# channels-last rows (a unit never straddles a position, nor two channels of NCHW)
UNIT_BYTES = {"nchw": 16, "channels_last": 4}
MAX_CLUSTER = 16  # Hopper's largest cluster (non-portable; 8 is the portable limit)
_MAX_GRID_1 = 65535  # N * G clusters on grid axis 1


@dataclass(frozen=True)
class Plan:
    blocks: int  # blocks per cluster, i.e. per (sample, group)
    units_per_block: int  # units of the group (of each tensor) each block holds in shared memory
    smem: int  # dynamic shared memory per block, bytes (the units, then fp32 coefficients per channel)
    cooperative: bool = False  # one cooperative grid (every block resident, partials through global memory)
    stages: int = 1  # groups each block holds a slice of, finished one after another (cooperative only)


def _layout(v: torch.Tensor, cpg: int) -> str | None:
    """How each (sample, group) of the (N, C, T, S) view ``v`` lies, in whole units: "nchw" (one dense
    run of C/G * T * S elements), "channels_last" (T * S positions C apart, each holding the group's
    C/G channels), or None."""
    n, c, t, s = v.shape
    sn, sc, st, ss = v.stride()
    for name, unit in UNIT_BYTES.items():
        per = unit // v.element_size()  # elements per unit
        if name == "nchw":
            dense = (s == 1 or ss == 1) and (t == 1 or st == s) and (c == 1 or sc == t * s) and (t * s) % per == 0
        else:
            dense = sc == 1 and (s == 1 or ss == c) and (t == 1 or st == s * c) and cpg % per == 0
        if dense and (n == 1 or sn % per == 0) and v.data_ptr() % unit == 0:
            return name
    return None


def layout(num_groups: int, x: torch.Tensor, *others: torch.Tensor) -> str | None:
    """The layout (:data:`UNIT_BYTES`' names) that x and ``others`` (y; or dy and dx), (N, C, T, S) views,
    share where the kernels can address them, else None: fp32 / fp16 / bf16 alike, N * G clusters on
    one grid axis."""
    if x.dtype not in _DTYPES or any(t.dtype != x.dtype or t.shape != x.shape for t in others):
        return None
    n, c = x.shape[:2]
    if n * num_groups > _MAX_GRID_1:
        return None
    found = {_layout(v, c // num_groups) for v in (x, *others)}
    return found.pop() if len(found) == 1 else None


# Per-channel fp32 values each kernel keeps in shared memory beside its slices (group_norm_cluster.cu):
# the forward's scale, offset and shift; the backward's weight, offset, bias and two sums of each
# (channels-last: also 32 per channel of per-warp column sums)
FORWARD_COEFFICIENTS = 3
BACKWARD_COEFFICIENTS = {"nchw": 7, "channels_last": 7 + 32}
# What a wave of forward clusters costs beyond its bytes, in bytes held per block: an H200 (run 6,
# bench/results) took 12 us per wave plus 0.037 us per KB each block held, at 4 to 16 blocks per
# cluster of level 0. The backward's waves fit bytes alone (21.7 us at 205 KB, 10.8 at 102).
FORWARD_WAVE_BYTES = 320 * 1024


def plan(clusters: int, group_numel: int, cpg: int, element_size: int, smem_limit: int, sms: int, resident,
         blocks: int | None = None, tensors: int = 1, coefficients: int = FORWARD_COEFFICIENTS,
         unit_bytes: int = 16, align: int = 1, cooperative: bool = False, wave_bytes: int = 0,
         stages: int = 1) -> Plan | None:
    """Blocks per cluster for ``clusters`` (N * G) groups of ``group_numel`` elements (``cpg`` channels),
    or None where no cluster of at most MAX_CLUSTER blocks holds a group.

    ``smem_limit``: dynamic shared memory one block may use (bytes); ``sms``: the device's SMs;
    ``resident(blocks, smem)``: how many such clusters the device holds at once (0: none), which is
    where its GPCs' sizes show (a cluster's blocks share one GPC). The clusters run in waves of that
    many; in each wave an SM moves the bytes of the blocks it holds (one, in practice: a 512-thread
    block at 59-128 registers takes more than half an SM's registers), so the estimated time is the sum
    over waves of ``wave_bytes`` (a wave's fixed cost) + (blocks per SM) x (bytes per block). Fewer
    blocks win ties (fewer partials, smaller barriers). Level 0 fp16, T16, on a device holding 32
    four-block clusters of 200 KiB blocks: 4 blocks, one wave; level 2 (200 KiB groups): 4 blocks, not 1
    (32 blocks would leave 100 SMs idle).

    ``blocks``: force that many (None where they cannot hold a group). ``tensors``: slices held per
    block (the backward's dy and x: 2); ``coefficients``: fp32 values kept per channel; ``unit_bytes``:
    bytes per unit (:data:`UNIT_BYTES`); ``align``: units per block a multiple of this (the
    channels-last backward's blocks start on a position); ``cooperative``: the forward as one
    cooperative grid, which must be resident at once (one wave): ``resident(blocks, smem)`` then counts
    blocks the device holds, of which each group takes ``blocks``. ``stages``: each block of the
    cooperative grid holds a slice of that many groups (at most ``clusters``), finishing one before the
    next (whose x is still arriving meanwhile), so a group takes ``blocks`` smaller slices."""
    if stages < 1 or (stages > 1 and not cooperative):
        raise ValueError(f"stages: 1, or more with a cooperative grid; got {stages} (cooperative={cooperative})")
    stages = min(stages, clusters)  # more would hold only empty slices
    units = group_numel * element_size // unit_bytes
    coef_bytes = coefficients * cpg * 4
    best, best_cost = None, None
    for r in ([blocks] if blocks else range(1, MAX_CLUSTER + 1)):
        per_block = -(-units // r // align) * align
        smem = stages * (tensors * per_block * unit_bytes + coef_bytes)
        if r > MAX_CLUSTER or smem > smem_limit:
            continue
        k = resident(r, smem) // r * stages if cooperative else resident(r, smem)  # groups (clusters) at once
        if k <= 0 or (cooperative and k < clusters):
            continue
        full, rest = divmod(clusters, k)
        held = stages * tensors * per_block * unit_bytes
        # a wave's cost: its fixed part, then as many blocks' bytes as an SM holds of its grid rows (r each)
        rows, last_rows = -(-k // stages), -(-rest // stages)
        cost = full * (wave_bytes + -(-rows * r // sms) * held) + \
            (rest > 0) * (wave_bytes + -(-last_rows * r // sms) * held)
        if best_cost is None or cost < best_cost:
            best, best_cost = Plan(r, per_block, smem, cooperative, stages), cost
    return best


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    return declare(build.load(SOURCE))


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Gives ``lib``'s C entry points their argument types (a wrong count or type then raises
    ctypes.ArgumentError instead of reaching the kernel): the nvcc-built library, or the tests' CPU
    emulation of it."""
    p, i, ll, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float
    lib.hb_gn_cluster_fwd.argtypes = [i, i, i, i, p, p, p, p, i, p, p, p, p, p, i, i, i, i, i, i, i, i, ll, ll, p, f, p]
    lib.hb_gn_cluster_bwd.argtypes = [i, i, i, i, p, p, p, p, p, i, p, p, p, p, p, i, i, i, i, i, i, i, p, p, p]
    lib.hb_gn_cluster_capacity.argtypes = [i, i, i, ctypes.POINTER(i)]
    lib.hb_gn_cooperative_capacity.argtypes = [i, i, ctypes.POINTER(i)]
    lib.hb_device_limits.argtypes = [i, ctypes.POINTER(i)]
    lib.hb_layout_walk.argtypes = [i, i, i, i, i, i, i, ctypes.POINTER(ll), ctypes.POINTER(i)]
    lib.hb_error_string.restype = ctypes.c_char_p
    return lib


def _error(lib, err: int) -> str:
    return lib.hb_error_string(err).decode()


@functools.lru_cache(maxsize=None)
def smem_limit(device_index: int) -> int | None:
    """Dynamic shared memory per block (bytes) where the cluster kernel can run on this CUDA device,
    else None, warning once with the reason (the caller opted in: it should hear why it is off)."""
    reason = None
    if torch.version.hip is not None:
        reason = "ROCm has no thread-block clusters"
    elif torch.cuda.get_device_capability(device_index)[0] < 9:
        reason = "thread-block clusters need compute capability 9.0 (Hopper) or newer"
    else:
        try:
            lib = _library()
            limit = ctypes.c_int()
            err = lib.hb_device_limits(device_index, ctypes.byref(limit))
            if err:
                reason = f"CUDA: {_error(lib, err)}"
            else:
                return limit.value
        except (build.BuildError, OSError) as err:
            reason = str(err)
    warnings.warn(f"hbkernels: cluster GroupNorm kernels unavailable on cuda:{device_index} ({reason}); "
                  "using the Triton kernels", RuntimeWarning, stacklevel=2)
    return None


@functools.lru_cache(maxsize=None)
def resident(device_index: int, blocks: int, smem: int) -> int:
    """Clusters of ``blocks`` blocks with ``smem`` bytes each that the device holds at once (0: none)."""
    lib = _library()
    clusters = ctypes.c_int()
    err = lib.hb_gn_cluster_capacity(device_index, blocks, smem, ctypes.byref(clusters))
    return clusters.value if err == 0 else 0


@functools.lru_cache(maxsize=None)
def resident_blocks(device_index: int, smem: int) -> int:
    """Forward blocks with ``smem`` bytes each that the device holds at once (a cooperative launch's most)."""
    lib = _library()
    blocks = ctypes.c_int()
    err = lib.hb_gn_cooperative_capacity(device_index, smem, ctypes.byref(blocks))
    return blocks.value if err == 0 else 0


@functools.lru_cache(maxsize=4096)
def device_plan(device_index: int, clusters: int, group_numel: int, cpg: int, element_size: int,
                blocks: int | None, backward: bool = False, layout_name: str = "nchw",
                cooperative: bool = False, stages: int = 1) -> Plan | None:
    """:func:`plan` on this device for the forward (clusters, or ``cooperative`` in ``stages``) or the
    backward (cached per shape: it queries the device up to MAX_CLUSTER times)."""
    limit = smem_limit(device_index)
    if limit is None or (cooperative and backward):
        return None
    sms = torch.cuda.get_device_properties(device_index).multi_processor_count
    if cooperative:
        def held(r, smem):
            return resident_blocks(device_index, smem)
    else:
        held = functools.partial(resident, device_index)
    return plan(clusters, group_numel, cpg, element_size, limit, sms, held, blocks,
                cooperative=cooperative, stages=stages, **holdings(backward, layout_name, cpg, element_size))


def holdings(backward: bool, layout_name: str, cpg: int, element_size: int) -> dict:
    """:func:`plan`'s keyword arguments for the forward or the backward kernel in this layout."""
    unit_bytes = UNIT_BYTES[layout_name]
    if not backward:
        return dict(unit_bytes=unit_bytes, wave_bytes=FORWARD_WAVE_BYTES)
    held = dict(unit_bytes=unit_bytes, tensors=2, coefficients=BACKWARD_COEFFICIENTS[layout_name])
    if layout_name == "channels_last":
        held["align"] = cpg * element_size // unit_bytes  # units per position
    return held


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def plan_for(num_groups, blocks, backward, x, *others, cooperative=False, stages=1) -> tuple[Plan, str] | None:
    """The plan and layout for these tensors (x's device, a CUDA one), or None where the kernels do not
    apply."""
    name = layout(num_groups, x, *others)
    if name is None:
        return None
    n, c, t, s = x.shape
    p = device_plan(x.device.index, n * num_groups, c // num_groups * t * s, c // num_groups, x.element_size(),
                    blocks, backward, name, cooperative, stages)
    return None if p is None else (p, name)


def _stream(x) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream


def _params(x, weight, bias):
    """weight and bias as the kernels read them (contiguous; fp32 or x's dtype, as the ops hand them
    over: read as given, no cast launched per call), and the bitmask of the fp32 ones."""
    out, fp32 = [], 0
    for bit, v in ((1, weight), (2, bias)):
        if v is not None and v.dtype not in (torch.float32, x.dtype):
            v = v.to(torch.float32)
        if v is not None and v.dtype == torch.float32:
            fp32 |= bit
        out.append(None if v is None else v.contiguous())
    return *out, fp32


def try_gn_fwd(x, weight, bias, shift, y, mean, rstd, num_groups: int, eps: float, silu: bool,
               blocks: int | None = None, cooperative: bool = False, stages: int = 1) -> bool:
    """Runs the cluster forward (same contract as hbkernels.triton.group_norm.gn_fwd) and returns True,
    or returns False without touching anything where it does not apply. ``blocks``: per cluster
    (None: :func:`plan`'s choice); ``cooperative``: as one cooperative grid, where all of it fits on the
    device at once, each block holding slices of ``stages`` groups."""
    planned = plan_for(num_groups, blocks, False, x, y, cooperative=cooperative, stages=stages)
    if planned is None:
        return False
    launch_fwd(*planned, x.device.index, _stream(x), x, weight, bias, shift, y, mean, rstd, num_groups, eps, silu)
    return True


def launch_fwd(p: Plan, layout_name: str, device_index: int, stream: int, x, weight, bias, shift, y, mean, rstd,
               num_groups: int, eps: float, silu: bool, clocks: torch.Tensor | None = None) -> None:
    """Launches the forward on ``stream`` (a cudaStream_t as an int) as planned; raises RuntimeError with
    CUDA's message where the launch fails. ``clocks``: None, or a contiguous int64 (N * G, blocks, 4)
    tensor that receives each block's phase record per group it holds, global-timer nanoseconds at its
    start (with ``stages``: that group's), its x loaded with the statistics, the group's statistics known
    and its y stored (bench/gn_phases.py)."""
    n, c, t, s = x.shape
    if clocks is not None and (clocks.dtype != torch.int64 or not clocks.is_contiguous()
                               or tuple(clocks.shape) != (n * num_groups, p.blocks, 4)):
        raise ValueError(f"clocks: a contiguous int64 tensor of shape {(n * num_groups, p.blocks, 4)} expected, "
                         f"got {clocks.dtype} {tuple(clocks.shape)}")
    weight, bias, params_fp32 = _params(x, weight, bias)
    stat_strides = (ctypes.c_longlong * 4)(*mean.stride(), *rstd.stride())
    # the cooperative grid's (count, mean, M2) per block
    partials = torch.empty(n * num_groups * p.blocks * 3, dtype=torch.float32, device=x.device) if p.cooperative \
        else None
    lib = _library()
    err = lib.hb_gn_cluster_fwd(
        device_index, _DTYPES[x.dtype], int(silu), int(layout_name == "channels_last"), _ptr(x), _ptr(y), _ptr(weight),
        _ptr(bias), params_fp32, _ptr(shift), _ptr(mean), _ptr(rstd), _ptr(partials), _ptr(clocks), n, c, num_groups,
        t * s, p.blocks, p.units_per_block, p.stages, p.smem, x.stride(0), y.stride(0), stat_strides, float(eps),
        stream,
    )
    _raise_on(lib, err, p)


def try_gn_bwd(dy, x, weight, bias, shift, mean, rstd, dx, dweight, dbias, num_groups: int, silu: bool,
               blocks: int | None = None) -> bool:
    """Runs the cluster backward (same contract as hbkernels.triton.group_norm.gn_bwd) and returns True,
    or returns False without touching anything where it does not apply."""
    planned = plan_for(num_groups, blocks, True, x, dy, dx)
    if planned is None:
        return False
    launch_bwd(*planned, x.device.index, _stream(x), dy, x, weight, bias, shift, mean, rstd, dx, dweight, dbias,
               num_groups, silu)
    return True


def launch_bwd(p: Plan, layout_name: str, device_index: int, stream: int, dy, x, weight, bias, shift, mean, rstd, dx,
               dweight, dbias, num_groups: int, silu: bool) -> None:
    """Launches the backward as planned. The kernel writes per-sample channel sums (N, C): with one
    sample straight into dweight / dbias (contiguous fp32), else into buffers summed over N here."""
    n, c, t, s = x.shape
    weight, bias, params_fp32 = _params(x, weight, bias)
    direct = [v is not None and n == 1 and v.is_contiguous() and v.dtype == torch.float32 for v in (dweight, dbias)]
    per_sample = [v if d or v is None else torch.empty(n, c, dtype=torch.float32, device=v.device)
                  for v, d in zip((dweight, dbias), direct)]
    sample_strides = (ctypes.c_longlong * 3)(dy.stride(0), x.stride(0), dx.stride(0))
    stat_strides = (ctypes.c_longlong * 4)(*mean.stride(), *rstd.stride())
    lib = _library()
    err = lib.hb_gn_cluster_bwd(
        device_index, _DTYPES[x.dtype], int(silu), int(layout_name == "channels_last"), _ptr(dy), _ptr(x), _ptr(dx),
        _ptr(weight), _ptr(bias), params_fp32, _ptr(shift), _ptr(mean), _ptr(rstd), _ptr(per_sample[0]),
        _ptr(per_sample[1]), n, c, num_groups, t * s, p.blocks, p.units_per_block, p.smem, sample_strides, stat_strides,
        stream,
    )
    _raise_on(lib, err, p)
    for total, parts, d in zip((dweight, dbias), per_sample, direct):
        if total is not None and not d:
            torch.sum(parts, dim=0, out=total)


def _raise_on(lib, err: int, p: Plan) -> None:
    if err:
        raise RuntimeError(f"hbkernels: cluster GroupNorm launch failed ({_error(lib, err)}; {p})")
