"""The cluster GroupNorm forward (``group_norm_cluster.cu``: one thread-block cluster per (sample,
group) holding the group in shared memory, x read from DRAM once): where it applies, and its launch.

:func:`plan` is plain arithmetic on shapes, strides and the device's shared-memory limit (tested on
CPU); :func:`try_gn_fwd` launches when the device and the tensors allow it and otherwise returns False,
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


def plan(x: torch.Tensor, y: torch.Tensor, num_groups: int, smem_limit: int, smem_fraction: float = 1.0) -> Plan | None:
    """Blocks per cluster and each block's share of the group, or None where the kernel does not
    apply (layout, dtype, a group too large for MAX_CLUSTER blocks' shared memory).

    x, y: (N, C, T, S) views. ``smem_limit``: the dynamic shared memory one block may use (bytes);
    blocks take at most ``smem_fraction`` of it. The fewest blocks that hold the group are used: at
    fraction 1 an H100 block holds up to 227 KiB, one block per SM (level 0, T16, fp16: 4 blocks of
    200 KiB per group); at 0.5, two blocks fit an SM, so clusters of twice the blocks."""
    if x.dtype not in _DTYPES or y.dtype != x.dtype or tuple(y.shape) != tuple(x.shape):
        return None
    n, c, t, s = x.shape
    vec = VECTOR_BYTES // x.element_size()
    if (t * s) % vec or n * num_groups > _MAX_GRID_1 or not (_dense_groups(x) and _dense_groups(y)):
        return None
    cpg = c // num_groups
    group_vecs = cpg * t * s // vec
    coef_bytes = 2 * cpg * 4
    budget = int(smem_limit * smem_fraction) - coef_bytes
    if budget < VECTOR_BYTES:
        return None
    blocks = -(-group_vecs * VECTOR_BYTES // budget)
    if blocks > MAX_CLUSTER:
        return None
    per_block = -(-group_vecs // blocks)
    return Plan(blocks, per_block, per_block * VECTOR_BYTES + coef_bytes)


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
def _fits(device_index: int, blocks: int, smem: int) -> bool:
    """Whether a cluster of ``blocks`` blocks with ``smem`` bytes each can be resident on the device."""
    lib = _library()
    clusters = ctypes.c_int()
    err = lib.hb_gn_cluster_capacity(device_index, blocks, smem, ctypes.byref(clusters))
    return err == 0 and clusters.value > 0


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def try_gn_fwd(x, weight, bias, shift, y, mean, rstd, num_groups: int, eps: float, silu: bool,
               smem_fraction: float = 1.0) -> bool:
    """Runs the cluster forward (same contract as hbkernels.triton.group_norm.gn_fwd) and returns True,
    or returns False without touching anything where it does not apply."""
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    limit = smem_limit(index)
    if limit is None:
        return False
    p = plan(x, y, num_groups, limit, smem_fraction)
    if p is None or not _fits(index, p.blocks, p.smem):
        return False
    n, c, t, s = x.shape
    weight, bias = (None if v is None else v.to(torch.float32).contiguous() for v in (weight, bias))
    stat_strides = (ctypes.c_longlong * 4)(*mean.stride(), *rstd.stride())
    lib = _library()
    err = lib.hb_gn_cluster_fwd(
        index, _DTYPES[x.dtype], int(silu), _ptr(x), _ptr(y), _ptr(weight), _ptr(bias), _ptr(shift), _ptr(mean),
        _ptr(rstd), n, c, num_groups, t * s, p.blocks, p.vecs_per_block, x.stride(0), y.stride(0), stat_strides,
        float(eps), torch.cuda.current_stream(x.device).cuda_stream,
    )
    if err:
        raise RuntimeError(f"hbkernels: cluster GroupNorm launch failed ({_error(lib, err)}; plan {p})")
    return True
