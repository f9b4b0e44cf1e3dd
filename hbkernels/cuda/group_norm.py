"""The cluster GroupNorm forward (``group_norm_cluster.cu``: one thread-block cluster per (sample,
group) holding the group in shared memory, x read from DRAM once): where it applies, and its launch.

:func:`applies` and :func:`plan` are plain arithmetic on strides, shapes and the device's limits (tested
on CPU); :func:`try_gn_fwd` launches when the device and the tensors allow it and otherwise returns False,
so that the Triton kernels run instead.
"""
import ctypes
import functools
import warnings
from dataclasses import dataclass

import torch

from hbkernels.cuda import build

SOURCE = "group_norm_cluster.cu"
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
VECTOR_BYTES = 16  # each thread moves 16-byte vectors; a vector never straddles two channels
MAX_CLUSTER = 16  # Hopper's largest cluster (non-portable; 8 is the portable limit)
_MAX_GRID_1 = 65535  # N * G clusters on grid axis 1


@dataclass(frozen=True)
class Plan:
    blocks: int  # blocks per cluster, i.e. per (sample, group)
    vecs_per_block: int  # 16-byte vectors of the group each block holds in shared memory
    smem: int  # dynamic shared memory per block, bytes (the vectors, then 2 coefficients per channel)


def _dense_groups(v: torch.Tensor) -> bool:
    """Whether each sample's (C, T, S) block of the (N, C, T, S) view ``v`` is dense in C, T, S order
    (so every group is one contiguous run), with the view and its samples starting on 16-byte vectors."""
    n, c, t, s = v.shape
    sn, sc, st, ss = v.stride()
    vec = VECTOR_BYTES // v.element_size()
    return ((s == 1 or ss == 1) and (t == 1 or st == s) and (c == 1 or sc == t * s)
            and (n == 1 or sn % vec == 0) and v.data_ptr() % VECTOR_BYTES == 0)


def applies(x: torch.Tensor, y: torch.Tensor, num_groups: int) -> bool:
    """Whether the kernel can address x and y, (N, C, T, S) views: NCHW groups on whole 16-byte
    vectors (a vector never straddles two channels), fp32 / fp16 / bf16, N * G clusters on one grid axis."""
    if x.dtype not in _DTYPES or y.dtype != x.dtype or tuple(y.shape) != tuple(x.shape):
        return False
    n, c, t, s = x.shape
    return ((t * s) % (VECTOR_BYTES // x.element_size()) == 0 and n * num_groups <= _MAX_GRID_1
            and _dense_groups(x) and _dense_groups(y))


def plan(clusters: int, group_numel: int, cpg: int, element_size: int, smem_limit: int, sms: int, resident,
         blocks: int | None = None) -> Plan | None:
    """Blocks per cluster for ``clusters`` (N * G) groups of ``group_numel`` elements (``cpg`` channels),
    or None where no cluster of at most MAX_CLUSTER blocks holds a group.

    ``smem_limit``: dynamic shared memory one block may use (bytes); ``sms``: the device's SMs;
    ``resident(blocks, smem)``: how many such clusters the device holds at once (0: none), which is
    where its GPCs' sizes show (a cluster's blocks share one GPC). The clusters run in waves of that
    many; in each wave an SM moves the bytes of the blocks it holds, so the estimated time is the sum over
    waves of (blocks per SM) x (bytes per block). Fewer blocks win ties (fewer partials, smaller
    barriers). Level 0 fp16, T16, on a device holding 32 four-block clusters of 200 KiB blocks: 4 blocks,
    one wave; level 2 (200 KiB groups): 4 blocks, not 1 (32 blocks would leave 100 SMs idle).
    ``blocks``: force that many (None where they cannot hold a group)."""
    vecs = group_numel * element_size // VECTOR_BYTES
    coef_bytes = 2 * cpg * 4
    best, best_cost = None, None
    for r in ([blocks] if blocks else range(1, MAX_CLUSTER + 1)):
        per_block = -(-vecs // r)
        smem = per_block * VECTOR_BYTES + coef_bytes
        if r > MAX_CLUSTER or smem > smem_limit:
            continue
        k = resident(r, smem)
        if k <= 0:
            continue
        full, rest = divmod(clusters, k)
        cost = (full * -(-k * r // sms) + -(-rest * r // sms)) * per_block
        if best_cost is None or cost < best_cost:
            best, best_cost = Plan(r, per_block, smem), cost
    return best


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    lib = build.load(SOURCE)
    p, i, ll, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float
    lib.hb_gn_cluster_fwd.argtypes = [i, i, i, p, p, p, p, p, p, p, i, i, i, i, i, i, ll, ll, p, f, p]
    lib.hb_gn_cluster_capacity.argtypes = [i, i, i, ctypes.POINTER(i)]
    lib.hb_device_limits.argtypes = [i, ctypes.POINTER(i), ctypes.POINTER(i), ctypes.POINTER(i)]
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
            limit, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
            err = lib.hb_device_limits(device_index, ctypes.byref(limit), ctypes.byref(major), ctypes.byref(minor))
            if err:
                reason = f"CUDA: {_error(lib, err)}"
            else:
                return limit.value
        except (build.BuildError, OSError) as err:
            reason = str(err)
    warnings.warn(f"hbkernels: cluster GroupNorm forward unavailable on cuda:{device_index} ({reason}); "
                  "using the Triton kernels", RuntimeWarning, stacklevel=2)
    return None


@functools.lru_cache(maxsize=None)
def resident(device_index: int, blocks: int, smem: int) -> int:
    """Clusters of ``blocks`` blocks with ``smem`` bytes each that the device holds at once (0: none)."""
    lib = _library()
    clusters = ctypes.c_int()
    err = lib.hb_gn_cluster_capacity(device_index, blocks, smem, ctypes.byref(clusters))
    return clusters.value if err == 0 else 0


@functools.lru_cache(maxsize=4096)
def device_plan(device_index: int, clusters: int, group_numel: int, cpg: int, element_size: int,
                blocks: int | None) -> Plan | None:
    """:func:`plan` on this device (cached per shape: it queries the device up to MAX_CLUSTER times)."""
    limit = smem_limit(device_index)
    if limit is None:
        return None
    sms = torch.cuda.get_device_properties(device_index).multi_processor_count
    return plan(clusters, group_numel, cpg, element_size, limit, sms, functools.partial(resident, device_index), blocks)


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def try_gn_fwd(x, weight, bias, shift, y, mean, rstd, num_groups: int, eps: float, silu: bool,
               blocks: int | None = None) -> bool:
    """Runs the cluster forward (same contract as hbkernels.triton.group_norm.gn_fwd) and returns True,
    or returns False without touching anything where it does not apply. ``blocks``: per cluster
    (None: :func:`plan`'s choice)."""
    if not applies(x, y, num_groups):
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    n, c, t, s = x.shape
    p = device_plan(index, n * num_groups, c // num_groups * t * s, c // num_groups, x.element_size(), blocks)
    if p is None:
        return False
    launch(p, index, torch.cuda.current_stream(x.device).cuda_stream, x, weight, bias, shift, y, mean, rstd,
           num_groups, eps, silu)
    return True


def launch(p: Plan, device_index: int, stream: int, x, weight, bias, shift, y, mean, rstd, num_groups: int,
           eps: float, silu: bool) -> None:
    """Launches the kernel on ``stream`` (a cudaStream_t as an int) as planned; raises RuntimeError with
    CUDA's message where the launch fails."""
    n, c, t, s = x.shape
    weight, bias = (None if v is None else v.to(torch.float32).contiguous() for v in (weight, bias))
    stat_strides = (ctypes.c_longlong * 4)(*mean.stride(), *rstd.stride())
    lib = _library()
    err = lib.hb_gn_cluster_fwd(
        device_index, _DTYPES[x.dtype], int(silu), _ptr(x), _ptr(y), _ptr(weight), _ptr(bias), _ptr(shift),
        _ptr(mean), _ptr(rstd), n, c, num_groups, t * s, p.blocks, p.vecs_per_block, x.stride(0), y.stride(0),
        stat_strides, float(eps), stream,
    )
    if err:
        raise RuntimeError(f"hbkernels: cluster GroupNorm launch failed ({_error(lib, err)}; {p})")
