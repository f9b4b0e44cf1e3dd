// GroupNorm (+ SiLU) forward for Hopper (sm_90+) that reads x from DRAM once.
//
// The Triton forward reads x twice (statistics pass, then apply pass): on an H100 its floor is two
// launches' worth of reads (25.2 us at (1, 320, 16, 40, 64) fp16, bench/results), above the 21 us a
// 2.5 TB/s GroupNorm needs. Here one thread-block cluster owns one (sample, group): each of its R
// blocks loads a contiguous 1/R of the group into shared memory (the whole group lives on-chip: at
// level 0, T16, 4 blocks of 200 KiB), accumulates (mean, M2) while loading, the blocks exchange their
// partials through distributed shared memory (one cluster barrier), and each writes its slice of y
// from shared memory. DRAM traffic: x read once, y written once (a copy's), against x twice for the
// two-pass kernels. Triton's language cannot hold a tile in shared memory across a cluster barrier,
// hence CUDA C++; ROCm and pre-Hopper GPUs keep the Triton kernels.
//
// Layout: every (n, group) is one contiguous run of cpg * S elements in x and in y (NCHW with the
// (C, T, H, W) of each sample dense; S = T * H * W), S a multiple of the 16-byte vector, so no vector
// straddles two channels. hbkernels/cuda/group_norm.py checks all of that before launching.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace cg = cooperative_groups;

namespace {

constexpr int kThreads = 1024;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread: 64 KiB per SM, enough to cover DRAM latency

struct Stats {
  float n, mean, m2;
};

// Chan et al.'s merge of two (count, mean, M2) states; an empty side leaves the other unchanged.
__device__ __forceinline__ Stats merge(Stats a, Stats b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float d = b.mean - a.mean;
  const float fb = b.n / n;
  return {n, a.mean + d * fb, a.m2 + b.m2 + d * d * a.n * fb};
}

__device__ __forceinline__ Stats shuffle_merge(Stats s, int lane_mask) {
  Stats o;
  o.n = __shfl_xor_sync(0xffffffffu, s.n, lane_mask);
  o.mean = __shfl_xor_sync(0xffffffffu, s.mean, lane_mask);
  o.m2 = __shfl_xor_sync(0xffffffffu, s.m2, lane_mask);
  return merge(s, o);
}

__device__ __forceinline__ Stats warp_merge(Stats s) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) s = shuffle_merge(s, m);
  return s;  // lane 0 holds the warp's state
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
union Vec {
  static constexpr int kSize = 16 / sizeof(T);
  uint4 raw;
  T e[kSize];
};

template <typename T, bool kSilu>
__global__ void __launch_bounds__(kThreads, 1)
gn_cluster_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ weight,
                      const float* __restrict__ bias, const float* __restrict__ shift, float* __restrict__ mean_out,
                      float* __restrict__ rstd_out, int channels, int groups, int S, int vecs_per_block,
                      long long x_sample_stride, long long y_sample_stride, long long mean_stride_n,
                      long long mean_stride_g, long long rstd_stride_n, long long rstd_stride_g, float eps) {
  using V = Vec<T>;
  constexpr int kV = V::kSize;
  extern __shared__ uint4 smem[];  // this block's slice of the group, then 2 * cpg per-channel coefficients
  __shared__ Stats warp_stats[kThreads / 32];
  __shared__ Stats block_stats;  // read by the cluster's other blocks
  __shared__ float group_mean, group_rstd;

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int blocks = static_cast<int>(cluster.num_blocks());
  const int n = blockIdx.y / groups;
  const int g = blockIdx.y % groups;
  const int cpg = channels / groups;
  const int tid = threadIdx.x;
  const int group_vecs = cpg * S / kV;
  const int v0 = rank * vecs_per_block;
  const int nv = max(0, min(vecs_per_block, group_vecs - v0));
  const long long group_offset = static_cast<long long>(g) * cpg * S;
  const uint4* src = reinterpret_cast<const uint4*>(x + n * x_sample_stride + group_offset) + v0;
  uint4* dst = reinterpret_cast<uint4*>(y + n * y_sample_stride + group_offset) + v0;
  const int c0 = g * cpg;
  const float* shift_n = shift != nullptr ? shift + static_cast<long long>(n) * channels + c0 : nullptr;
  float* coef = reinterpret_cast<float*>(smem + vecs_per_block);

  // 1. x -> shared memory, (count, mean, M2) of x + shift per thread: each vector's own mean and M2
  // (exact two-pass over 4-8 registers), Chan-merged into the thread's running state
  Stats st{0.f, 0.f, 0.f};
  for (int base = 0; base < nv; base += kThreads * kUnroll) {
    V r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads + tid;
      if (i < nv) r[u].raw = __ldcs(src + i);  // streamed: x is not read again from DRAM
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * kThreads + tid;
      if (i < nv) {
        smem[i] = r[u].raw;
        const float sh = shift_n != nullptr ? shift_n[(v0 + i) * kV / S] : 0.f;
        float f[kV], sum = 0.f;
#pragma unroll
        for (int j = 0; j < kV; ++j) {
          f[j] = to_float(r[u].e[j]) + sh;
          sum += f[j];
        }
        const float m = sum * (1.f / kV);
        float m2 = 0.f;
#pragma unroll
        for (int j = 0; j < kV; ++j) m2 += (f[j] - m) * (f[j] - m);
        st = merge(st, Stats{static_cast<float>(kV), m, m2});
      }
    }
  }

  // 2. the block's state, then the group's: the cluster's blocks read each other's block_stats
  st = warp_merge(st);
  if ((tid & 31) == 0) warp_stats[tid >> 5] = st;
  __syncthreads();
  if (tid < 32) {
    st = warp_merge(warp_stats[tid]);
    if (tid == 0) block_stats = st;
  }
  cluster.sync();  // every block's block_stats written and visible cluster-wide
  if (tid == 0) {
    Stats total{0.f, 0.f, 0.f};
    for (int r = 0; r < blocks; ++r) total = merge(total, *cluster.map_shared_rank(&block_stats, r));
    group_mean = total.mean;
    group_rstd = rsqrtf(total.m2 / total.n + eps);
    if (rank == 0) {
      mean_out[n * mean_stride_n + g * mean_stride_g] = group_mean;
      rstd_out[n * rstd_stride_n + g * rstd_stride_g] = group_rstd;
    }
  }
  // Done reading the other blocks' shared memory; each block waits for this before it exits (below), so
  // no block leaves while another may still read its block_stats. Relaxed (no fence): thread 0 used the
  // values it read before arriving, so its reads are complete.
  __cluster_barrier_arrive_relaxed();
  __syncthreads();

  // 3. per-channel y = x * a + b: a = rstd * w, b = bias + (shift - mean) * a
  for (int c = tid; c < cpg; c += kThreads) {
    const float a = group_rstd * (weight != nullptr ? weight[c0 + c] : 1.f);
    const float sh = shift_n != nullptr ? shift_n[c] : 0.f;
    coef[c] = a;
    coef[cpg + c] = (bias != nullptr ? bias[c0 + c] : 0.f) + (sh - group_mean) * a;
  }
  __syncthreads();

  // 4. y from shared memory, streamed out (evict-first: y is not read again by this kernel)
  for (int i = tid; i < nv; i += kThreads) {
    V v;
    v.raw = smem[i];
    const int c = (v0 + i) * kV / S;
    const float a = coef[c], b = coef[cpg + c];
    V out;
#pragma unroll
    for (int j = 0; j < kV; ++j) {
      float z = to_float(v.e[j]) * a + b;
      if constexpr (kSilu) z = sizeof(T) == 4 ? z / (1.f + expf(-z)) : z / (1.f + __expf(-z));
      out.e[j] = from_float<T>(z);
    }
    __stcs(dst + i, out.raw);
  }
  __cluster_barrier_wait();
}

// Opts `kernel` into `smem` bytes of dynamic shared memory per block and, past 8 blocks, into
// non-portable cluster sizes (up to 16 on Hopper).
template <typename Kernel>
cudaError_t configure(Kernel kernel, int blocks, int smem) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err == cudaSuccess && blocks > 8) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  }
  return err;
}

// Launch configuration of `rows` clusters of `blocks` blocks (grid (blocks, rows), cluster (blocks, 1, 1)).
// Used in place: `config.attrs` points into the object.
struct ClusterLaunch {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attribute[1];
  ClusterLaunch(int blocks, int rows, int smem, cudaStream_t stream) {
    config.gridDim = dim3(blocks, rows, 1);
    config.blockDim = dim3(kThreads, 1, 1);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = blocks;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
  }
};

template <typename T, bool kSilu>
int launch(const void* x, void* y, const float* weight, const float* bias, const float* shift, float* mean,
           float* rstd, int batch, int channels, int groups, int S, int blocks, int vecs_per_block,
           long long x_sample_stride, long long y_sample_stride, const long long* stat_strides, float eps,
           cudaStream_t stream) {
  auto kernel = gn_cluster_fwd_kernel<T, kSilu>;
  const int smem = vecs_per_block * 16 + 2 * (channels / groups) * static_cast<int>(sizeof(float));
  cudaError_t err = configure(kernel, blocks, smem);
  if (err != cudaSuccess) return static_cast<int>(err);
  ClusterLaunch grid(blocks, batch * groups, smem, stream);
  err = cudaLaunchKernelEx(&grid.config, kernel, static_cast<const T*>(x), static_cast<T*>(y), weight, bias, shift,
                           mean, rstd, channels, groups, S, vecs_per_block, x_sample_stride, y_sample_stride,
                           stat_strides[0], stat_strides[1], stat_strides[2], stat_strides[3], eps);
  return static_cast<int>(err);
}

template <typename T>
int launch_dtype(bool silu, const void* x, void* y, const float* weight, const float* bias, const float* shift,
                 float* mean, float* rstd, int batch, int channels, int groups, int S, int blocks,
                 int vecs_per_block, long long xs, long long ys, const long long* stat_strides, float eps,
                 cudaStream_t stream) {
  return silu ? launch<T, true>(x, y, weight, bias, shift, mean, rstd, batch, channels, groups, S, blocks,
                                vecs_per_block, xs, ys, stat_strides, eps, stream)
              : launch<T, false>(x, y, weight, bias, shift, mean, rstd, batch, channels, groups, S, blocks,
                                 vecs_per_block, xs, ys, stat_strides, eps, stream);
}

// Makes `device` current for one call, restoring the caller's afterwards.
struct DeviceGuard {
  int previous = -1;
  cudaError_t err = cudaSuccess;
  explicit DeviceGuard(int device) {
    err = cudaGetDevice(&previous);
    if (err == cudaSuccess && previous != device) err = cudaSetDevice(device);
    else previous = -1;
  }
  ~DeviceGuard() {
    if (previous >= 0) cudaSetDevice(previous);
  }
};

}  // namespace

// C entry points (loaded with ctypes by hbkernels/cuda/group_norm.py). Each returns a cudaError_t.
extern "C" {

// dtype: 0 float32, 1 float16, 2 bfloat16. stat_strides: mean's (n, g) strides, then rstd's.
int hb_gn_cluster_fwd(int device, int dtype, int silu, const void* x, void* y, const float* weight, const float* bias,
                      const float* shift, float* mean, float* rstd, int batch, int channels, int groups, int S,
                      int blocks, int vecs_per_block, long long x_sample_stride, long long y_sample_stride,
                      const long long* stat_strides, float eps, void* stream) {
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return static_cast<int>(guard.err);
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0:
      return launch_dtype<float>(silu, x, y, weight, bias, shift, mean, rstd, batch, channels, groups, S, blocks,
                                 vecs_per_block, x_sample_stride, y_sample_stride, stat_strides, eps, s);
    case 1:
      return launch_dtype<__half>(silu, x, y, weight, bias, shift, mean, rstd, batch, channels, groups, S, blocks,
                                  vecs_per_block, x_sample_stride, y_sample_stride, stat_strides, eps, s);
    case 2:
      return launch_dtype<__nv_bfloat16>(silu, x, y, weight, bias, shift, mean, rstd, batch, channels, groups, S,
                                         blocks, vecs_per_block, x_sample_stride, y_sample_stride, stat_strides, eps,
                                         s);
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
}

// Clusters of `blocks` blocks with `smem` bytes of dynamic shared memory each that the device can hold
// at once (0: such a cluster cannot run there), for the fp16 SiLU kernel (all variants use the same
// resources: one block of kThreads per SM, shared memory decides).
int hb_gn_cluster_capacity(int device, int blocks, int smem, int* clusters) {
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return static_cast<int>(guard.err);
  auto kernel = gn_cluster_fwd_kernel<__half, true>;
  const cudaError_t err = configure(kernel, blocks, smem);
  if (err != cudaSuccess) return static_cast<int>(err);
  ClusterLaunch grid(blocks, 1, smem, nullptr);
  return static_cast<int>(cudaOccupancyMaxActiveClusters(clusters, kernel, &grid.config));
}

// The dynamic shared memory one block of the kernel may opt into (the device's per-block limit less
// the kernel's static shared memory, in bytes), and the device's compute capability.
int hb_device_limits(int device, int* dynamic_smem, int* major, int* minor) {
  int optin = 0;
  *dynamic_smem = 0;
  cudaFuncAttributes attributes;
  cudaError_t err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err == cudaSuccess && *major >= 9) {
    DeviceGuard guard(device);
    err = guard.err != cudaSuccess ? guard.err
                                   : cudaFuncGetAttributes(&attributes, gn_cluster_fwd_kernel<__half, true>);
    *dynamic_smem = optin - static_cast<int>(attributes.sharedSizeBytes);
  }
  return static_cast<int>(err);
}

const char* hb_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // extern "C"
