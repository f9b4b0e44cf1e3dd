// GroupNorm (+ SiLU) forward and backward for Hopper (sm_90+) that read each input from DRAM once.
//
// The Triton forward reads x twice (statistics pass, then apply pass): on an H100 its floor is two
// launches' worth of reads (25.2 us at (1, 320, 16, 40, 64) fp16, bench/results), above the 21 us a
// 2.5 TB/s GroupNorm needs. Here one thread-block cluster owns one (sample, group): each of its R
// blocks loads a contiguous 1/R of the group into shared memory (the whole group lives on-chip: at
// level 0, T16, 4 blocks of 200 KiB), accumulates (mean, M2) while loading, the blocks exchange their
// partials through distributed shared memory (one cluster barrier), and each writes its slice of y
// from shared memory. DRAM traffic: x read once, y written once (a copy's), against x twice for the
// two-pass kernels. The backward does the same with dy and x (both held: twice the blocks), exchanging
// per-channel sums of dz and dz * xhat: dy and x read once, dx written once, where the Triton backward
// reads both twice. Triton's language cannot hold a tile in shared memory across a cluster barrier,
// hence CUDA C++; ROCm and pre-Hopper GPUs keep the Triton kernels.
//
// The forward also runs as one cooperative grid (kCooperative): the same blocks, partials exchanged
// through global memory across a grid barrier, every block resident at once. Clusters must fit inside
// GPCs: an H200 held 30 of level 0's 32 four-block clusters at once, so T16 took two waves (41 us,
// run 6 in bench/results); the cooperative grid's 128 blocks take one. In stages, each of its blocks
// holds slices of several groups and finishes them in turn, so reads of the later ones overlap the
// earlier ones' barrier and writes.
//
// Inputs reach shared memory by cp.async: a copy in flight holds no register, so a thread keeps several
// batches of units in flight. With loads through registers, one batch per thread, run 6 measured 7-20
// GB/s per SM (x in and y out) against the 31.5 per SM of the H200's copy bandwidth.
//
// Layouts (see Layout below): NCHW, where every (sample, group) is one contiguous run of cpg * S
// elements (S = T * H * W, a multiple of the 16-byte unit), and channels-last, where it is S pieces of
// cpg channels C apart (cpg a multiple of the 4-byte unit). hbkernels/cuda/group_norm.py
// checks all of that before launching.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cuda/std/chrono>
#include <type_traits>

namespace cg = cooperative_groups;

namespace {

constexpr int kThreads = 512;  // one block per SM (shared memory decides); up to 128 registers per thread

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

// `Unit` (the bytes one thread moves at once) seen as elements of T
template <typename T, typename Unit = uint4>
union Packed {
  static constexpr int kSize = sizeof(Unit) / sizeof(T);
  Unit raw;
  T e[kSize];
};

// Where a (sample, group)'s elements lie, numbered e = 0 .. cpg * S - 1 in the order blocks hold them.
// NCHW: one contiguous run (channel e / S), moved in 16-byte units. Channels-last: S positions of cpg
// channels, C apart (channel e % cpg), moved in 4-byte units, which never straddle a position (cpg is a
// multiple of a unit's elements): pieces of rows that the clusters of neighbouring groups read at about
// the same time, so a 32-byte sector comes from DRAM once and from L2 for the others.
template <typename T, bool kChannelsLast>
struct Layout {
  using Unit = std::conditional_t<kChannelsLast, unsigned int, uint4>;
  static constexpr int kU = sizeof(Unit) / sizeof(T);
  int S, C, cpg;

  // A thread's walk over its units e0, e0 + step, e0 + 2 step, ... (in elements): the current unit's
  // offset in the group's memory, its first element's channel, and (NCHW) its place in that channel's
  // plane. It advances by additions: a division per unit would cost more than the load it addresses.
  struct Walk {
    long long off;
    int ch, rem;
  };

  __host__ __device__ long long group_start(int c0) const {
    return kChannelsLast ? c0 : static_cast<long long>(c0) * S;
  }
  __host__ __device__ Walk start(int e) const {
    if constexpr (kChannelsLast) return {static_cast<long long>(e / cpg) * C + e % cpg, e % cpg, 0};
    else return {e, e / S, e % S};
  }
  __host__ __device__ Walk step(int elements) const { return start(elements); }  // what one advance adds
  __host__ __device__ void advance(Walk& w, const Walk& by) const {
    w.off += by.off;
    w.ch += by.ch;
    if constexpr (kChannelsLast) {
      if (w.ch >= cpg) {  // into the next position
        w.ch -= cpg;
        w.off += C - cpg;
      }
    } else {
      w.rem += by.rem;
      if (w.rem >= S) {  // into the next channel's plane
        w.rem -= S;
        ++w.ch;
      }
    }
  }
  // channel of element j of a unit whose first element is in channel c
  __host__ __device__ static int channel_of(int c, int j) { return kChannelsLast ? c + j : c; }
  __device__ static void store(Unit* p, Unit v) {
    if constexpr (kChannelsLast) *p = v;  // kept in L2 until the neighbouring groups fill the rest of the sector
    else __stcs(p, v);                    // streamed: y is not read again by this kernel
  }
};

// One block's part of (sample, group) `row` (n * groups + g; grid (blocks, rows), a cluster (blocks, 1,
// 1) per row, or the forward's cooperative grid): the block holds units u0 .. u0 + nu - 1 of the group's
// cpg * S / kU (the last blocks may hold fewer, or none; none of a row past the last group, `rows`).
struct Part {
  int n, g, cpg, c0, u0, nu;

  __device__ Part(int channels, int groups, int S, int units_per_block, int kU, int row, int rows) {
    const bool valid = row < rows;
    n = valid ? row / groups : 0;
    g = valid ? row % groups : 0;
    cpg = channels / groups;
    c0 = g * cpg;
    u0 = static_cast<int>(blockIdx.x) * units_per_block;
    nu = valid ? max(0, min(units_per_block, cpg * S / kU - u0)) : 0;
  }
};

// A per-channel weight or bias as the ops hand it over: fp32 (master weights) or x's dtype, read as
// given (a cast would be a kernel launch of its own on every call); `fallback` where there is none.
template <typename T>
__device__ __forceinline__ float param(const void* p, bool fp32, int c, float fallback) {
  if (p == nullptr) return fallback;
  return fp32 ? static_cast<const float*>(p)[c] : to_float(static_cast<const T*>(p)[c]);
}

// 2^u, a result under 2^-126 flushed to zero: one MUFU.EX2. __expf / exp2f without -ftz (a flag that would
// flush x's own subnormals too) add three instructions per element to rescale such results, which the
// sigmoid's 1 + 2^u cannot tell from zero: its results are the same bits either way.
__device__ __forceinline__ float exp2_ftz(float u) {
#ifdef __CUDA_ARCH__
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(u));
  return r;
#else
  return exp2f(u);
#endif
}

template <bool kPrecise>
__device__ __forceinline__ float sigmoid(float z) {
  return kPrecise ? 1.f / (1.f + expf(-z)) : __fdividef(1.f, 1.f + exp2_ftz(z * -1.44269504f));  // -log2(e)
}

// The GPU's global timer in nanoseconds (comparable across SMs), for the forward's optional phase record
__device__ __forceinline__ long long now_ns() {
  namespace chrono = cuda::std::chrono;
  return chrono::duration_cast<chrono::nanoseconds>(chrono::system_clock::now().time_since_epoch()).count();
}

// Sum of a value over the block; the result in thread 0. `scratch`: kThreads / 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? scratch[threadIdx.x] : 0.f;
  if (threadIdx.x < 32) {
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  }
  __syncthreads();  // scratch free for the next call
  return v;
}

// kCooperative: the blocks of a (sample, group) exchange their states through `partials` in global
// memory ((N * G, blocks) states) across a grid barrier, the whole grid resident at once (a cooperative
// launch), instead of through a cluster's distributed shared memory: no cluster shape to fit into the
// GPCs (an H200 holds 30 four-block clusters of 200 KiB blocks, so level 0's 32 groups at T16 take two
// waves; cooperatively its 128 blocks take one).
//
// `stages` (cooperative only; clusters: 1): each block holds a slice of `stages` groups, rows
// blockIdx.y, blockIdx.y + gridDim.y, ..., and finishes them one after another, a grid barrier each. All
// of its copies are issued up front, so while the GPU waits at one stage's barrier and writes that
// stage's y, the next stages' x is still arriving: DRAM reads overlap the writes and the barrier, where
// with one stage the whole GPU loads, waits, then stores.
template <typename T, bool kSilu, bool kChannelsLast, bool kCooperative>
__global__ void __launch_bounds__(kThreads, 1)
gn_cluster_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, const void* __restrict__ weight,
                      const void* __restrict__ bias, int params_fp32, const float* __restrict__ shift,
                      float* __restrict__ mean_out, float* __restrict__ rstd_out, Stats* __restrict__ partials,
                      long long* __restrict__ clocks, int channels, int groups, int S, int units_per_block, int rows,
                      int stages, long long x_sample_stride, long long y_sample_stride, long long mean_stride_n,
                      long long mean_stride_g, long long rstd_stride_n, long long rstd_stride_g, float eps) {
  using L = Layout<T, kChannelsLast>;
  using Unit = typename L::Unit;
  using P = Packed<T, Unit>;
  constexpr int kU = L::kU;
  // Units per batch (read into registers together for the statistics: 96 bytes NCHW, 64 channels-last,
  // more spill at 128 registers) and batches in flight per thread: 768 or 512 bytes, 384 or 256 KiB per
  // SM, more than a block holds, so every copy of a block is issued up front at level 0 however the
  // stages split it (a stage's last batch is mostly partial: 4 stages of 3200 units take 2 batches each)
  constexpr int kUnroll = kChannelsLast ? 16 : 6;
  constexpr int kDepth = 8;
  constexpr int kBatch = kThreads * kUnroll;
  // per stage: this block's units of its group; then per stage 3 * cpg per-channel coefficients
  extern __shared__ uint4 smem_raw[];
  __shared__ Stats warp_stats[kThreads / 32];
  __shared__ Stats block_stats;  // read by the cluster's other blocks
  __shared__ float group_mean, group_rstd;

  const int tid = threadIdx.x, cpg = channels / groups;
  const L layout{S, channels, cpg};
  auto row_of = [&](int stage) { return static_cast<int>(blockIdx.y + stage * gridDim.y); };  // its group
  auto part = [&](int stage) { return Part(channels, groups, S, units_per_block, kU, row_of(stage), rows); };
  auto held_by = [&](int stage) { return reinterpret_cast<Unit*>(smem_raw) + stage * units_per_block; };
  auto coef_by = [&](int stage) {
    return reinterpret_cast<float*>(reinterpret_cast<Unit*>(smem_raw) + stages * units_per_block) + stage * 3 * cpg;
  };
  // Optional phase record (bench/gn_phases.py), 4 global-timer stamps per block and stage (its group's
  // row): started (the stage's statistics begin), its x loaded with the statistics, the group's
  // statistics known, its y stored
  auto stamps_of = [&](int stage) -> long long* {
    const int row = row_of(stage);
    return clocks != nullptr && row < rows ? clocks + 4 * (static_cast<long long>(row) * gridDim.x + blockIdx.x)
                                           : nullptr;
  };
  if (long long* first = stamps_of(0); first != nullptr && tid == 0) first[0] = now_ns();

  // 1. x -> shared memory by asynchronous copies (cp.async: a copy in flight holds no register, so
  // kDepth batches of a thread's units are in flight at once, where loads through registers allowed
  // one), then (count, mean, M2) of x + shift per thread from shared memory, batch by batch as they
  // land: each batch's own mean and M2 (exact two-pass over its elements in registers), Chan-merged into
  // the thread's state. A thread reads only the units it copied (the one barrier before the statistics
  // is for the staged shift). Instantiated per (whole batch or the ragged last one) x (shift or not): the hot loop
  // carries neither per-unit bounds checks nor a channel walk it does not need.
  // Batches k = 0, 1, ... run through the stages in order, batches_per_stage each (a stage's last ones
  // may be empty).
  const int batches_per_stage = (units_per_block + kBatch - 1) / kBatch, batches = stages * batches_per_stage;
  const typename L::Walk stride = layout.step(kThreads * kU);
  typename L::Walk copying{};
  const T* copy_from = nullptr;
  int copy_nu = 0;
  auto issue = [&](int k) {  // one commit group per batch (empty past the last: the groups stay one per batch)
    if (k < batches) {
      const int stage = k / batches_per_stage, base = (k - stage * batches_per_stage) * kBatch;
      if (base == 0) {  // into the next stage's group
        const Part p = part(stage);
        copying = layout.start((p.u0 + tid) * kU);
        copy_from = x + p.n * x_sample_stride + layout.group_start(p.c0);
        copy_nu = p.nu;
      }
      Unit* to = held_by(stage);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kThreads + tid;
        if (i < copy_nu) __pipeline_memcpy_async(to + i, copy_from + copying.off, sizeof(Unit));
        layout.advance(copying, stride);
      }
    }
    __pipeline_commit();
  };
  Unit* held = nullptr;
  const float* shift_c = nullptr;  // the stage's group's shift per channel (staged below)
  int nu = 0;
  typename L::Walk walk{};
  Stats st{0.f, 0.f, 0.f};
  auto batch = [&](int base, auto whole, auto shifted) {
    constexpr bool kWhole = decltype(whole)::value, kShift = decltype(shifted)::value;
    P r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (kWhole || base + u * kThreads + tid < nu) r[u].raw = held[base + u * kThreads + tid];
    }
    // element j of unit u, shift added (the channel walked where there is a shift)
    auto value = [&](int u, int j, const typename L::Walk& at) {
      return to_float(r[u].e[j]) + (kShift ? shift_c[L::channel_of(at.ch, j)] : 0.f);
    };
    float sum = 0.f;
    int count = 0;
    typename L::Walk at = walk;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (kWhole || base + u * kThreads + tid < nu) {
        count += kU;
#pragma unroll
        for (int j = 0; j < kU; ++j) sum += value(u, j, at);
      }
      if (kShift) layout.advance(at, stride);
    }
    if (count == 0) return;
    const float m = sum / count;
    float dev = 0.f, m2 = 0.f;
    at = walk;
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (kWhole || base + u * kThreads + tid < nu) {
#pragma unroll
        for (int j = 0; j < kU; ++j) {
          const float d = value(u, j, at) - m;
          dev += d;
          m2 += d * d;
        }
      }
      if (kShift) layout.advance(at, stride);
    }
    if (kShift) walk = at;
    // the mean's own rounding taken out (corrected two-pass): equal values give their value and M2 = 0
    // exactly, so a constant group normalises to the bias, not to that rounding times 1/sqrt(eps)
    const float corr = dev / count;
    st = merge(st, Stats{static_cast<float>(count), m + corr, fmaxf(m2 - dev * corr, 0.f)});
  };
  using Yes = std::true_type;
  using No = std::false_type;
#pragma unroll
  for (int d = 0; d < kDepth; ++d) issue(d);
  // While the first copies fly: each group's weight, bias and shift per channel into shared memory, so
  // that nothing after the exchange waits on a global load (each thread stages, and later finishes, its
  // own channels c = tid, tid + kThreads, ...)
  for (int stage = 0; stage < stages; ++stage) {
    const Part p = part(stage);
    float* coef = coef_by(stage);
    for (int c = tid; c < cpg; c += kThreads) {
      coef[c] = param<T>(weight, params_fp32 & 1, p.c0 + c, 1.f);
      coef[cpg + c] = param<T>(bias, params_fp32 & 2, p.c0 + c, 0.f);
      coef[2 * cpg + c] = shift != nullptr ? shift[static_cast<long long>(p.n) * channels + p.c0 + c] : 0.f;
    }
  }
  __syncthreads();  // the statistics read every channel's shift

  for (int stage = 0; stage < stages; ++stage) {
    const Part p = part(stage);
    const int n = p.n, g = p.g, row = row_of(stage);
    long long* stamps = stamps_of(stage);
    if (stage > 0 && stamps != nullptr && tid == 0) stamps[0] = now_ns();
    float* coef = coef_by(stage);
    held = held_by(stage);
    shift_c = coef + 2 * cpg;
    nu = p.nu;
    walk = layout.start((p.u0 + tid) * kU);
    st = Stats{0.f, 0.f, 0.f};
    for (int b = 0; b < batches_per_stage; ++b) {
      const int base = b * kBatch;
      __pipeline_wait_prior(kDepth - 1);  // this batch landed (the kDepth - 1 after it may not have)
      if (base + kBatch <= nu) shift != nullptr ? batch(base, Yes{}, Yes{}) : batch(base, Yes{}, No{});
      else if (base < nu) shift != nullptr ? batch(base, No{}, Yes{}) : batch(base, No{}, No{});
      issue(stage * batches_per_stage + b + kDepth);
    }
    if (stage == stages - 1) __pipeline_wait_prior(0);  // the empty groups past the last batch

    // 2. the block's state, then the group's: the blocks read each other's (block_stats through the
    // cluster, or partials)
    st = warp_merge(st);
    if ((tid & 31) == 0) warp_stats[tid >> 5] = st;
    __syncthreads();
    if (stamps != nullptr && tid == 0) stamps[1] = now_ns();
    if (tid < 32) {
      st = warp_merge(tid < kThreads / 32 ? warp_stats[tid] : Stats{0.f, 0.f, 0.f});
      if (tid == 0 && !kCooperative) block_stats = st;
    }
    const int blocks = static_cast<int>(gridDim.x);
    if constexpr (kCooperative) {
      if (tid == 0 && row < rows) partials[static_cast<long long>(row) * blocks + blockIdx.x] = st;
      cg::this_grid().sync();  // every block's state written and visible grid-wide
    } else {
      cg::this_cluster().sync();  // every block's block_stats written and visible cluster-wide
    }
    if (tid < 32) {  // lane r reads block r's state (one round trip, not one per block), then a warp merge
      Stats mine{0.f, 0.f, 0.f};
      for (int r = tid; r < blocks && row < rows; r += 32) {
        if constexpr (kCooperative) mine = merge(mine, partials[static_cast<long long>(row) * blocks + r]);
        else mine = merge(mine, *cg::this_cluster().map_shared_rank(&block_stats, r));
      }
      const Stats total = warp_merge(mine);
      if (tid == 0) {
        group_mean = total.mean;
        group_rstd = rsqrtf(total.m2 / total.n + eps);
        if (stamps != nullptr) stamps[2] = now_ns();
        if (blockIdx.x == 0 && row < rows) {
          mean_out[n * mean_stride_n + g * mean_stride_g] = group_mean;
          rstd_out[n * rstd_stride_n + g * rstd_stride_g] = group_rstd;
        }
      }
    }
    // Cluster: done reading the other blocks' shared memory; each block waits for this before it exits
    // (below), so no block leaves while another may still read its block_stats. Relaxed (no fence): the
    // lanes that read merged the values before arriving, so their reads are complete.
    if constexpr (!kCooperative) __cluster_barrier_arrive_relaxed();
    __syncthreads();

    // 3. per-channel y = (x - o) * a + b: o = mean - shift, a = rstd * w (w and bias as staged). Not
    // x * a + (b - o * a), one instruction less: where |mean| * rstd is large that sum rounds at the
    // magnitude of o * a (an output 0.04 off the bias for a group of 3333.33s)
    for (int c = tid; c < cpg; c += kThreads) {
      coef[c] *= group_rstd;
      coef[2 * cpg + c] = group_mean - shift_c[c];
    }
    __syncthreads();

    // 4. y from shared memory
    T* y_group = y + n * y_sample_stride + layout.group_start(p.c0);
    walk = layout.start((p.u0 + tid) * kU);
    for (int i = tid; i < nu; i += kThreads, layout.advance(walk, stride)) {
      P v, out;
      v.raw = held[i];
#pragma unroll
      for (int j = 0; j < kU; ++j) {
        const int c = L::channel_of(walk.ch, j);
        float z = (to_float(v.e[j]) - coef[2 * cpg + c]) * coef[c] + coef[cpg + c];
        if constexpr (kSilu) z *= sigmoid<sizeof(T) == 4>(z);
        out.e[j] = from_float<T>(z);
      }
      L::store(reinterpret_cast<Unit*>(y_group + walk.off), out.raw);
    }
    if (stamps != nullptr) {
      __syncthreads();
      if (tid == 0) stamps[3] = now_ns();
    }
  }
  if constexpr (!kCooperative) __cluster_barrier_wait();
}

// Backward of y = GroupNorm(x + shift) (then SiLU), per (sample, group), with xhat = (x + shift - mean) *
// rstd, z = xhat * w + b, dz = dy (or dy * silu'(z)): per channel S1 = sum dz, S2 = sum dz * xhat; per
// group c1 = sum_c w_c S1_c / E, c2 = sum_c w_c S2_c / E (E elements); dx = rstd * (w dz - c1 - xhat c2),
// dweight[n, c] = S2_c, dbias[n, c] = S1_c (per sample: the caller sums over N where N > 1).
template <typename T, bool kSilu, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads, 1)
gn_cluster_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                      const void* __restrict__ weight, const void* __restrict__ bias, int params_fp32,
                      const float* __restrict__ shift, const float* __restrict__ mean, const float* __restrict__ rstd,
                      float* __restrict__ dweight, float* __restrict__ dbias, int channels, int groups, int S,
                      int units_per_block, long long dy_sample_stride, long long x_sample_stride,
                      long long dx_sample_stride, long long mean_stride_n, long long mean_stride_g,
                      long long rstd_stride_n, long long rstd_stride_g) {
  using L = Layout<T, kChannelsLast>;
  using Unit = typename L::Unit;
  using P = Packed<T, Unit>;
  constexpr int kU = L::kU;
  // x's units, dy's units, then per channel: w, o = mean - shift, b, this block's S1 and S2 (read
  // by the cluster's other blocks), the group's S1 and S2; channels-last: then 32 per channel of
  // per-warp partial sums
  extern __shared__ uint4 smem_raw[];
  __shared__ float scratch[kThreads / 32];
  __shared__ float c1, c2;

  cg::cluster_group cluster = cg::this_cluster();
  const Part part(channels, groups, S, units_per_block, kU, blockIdx.y, gridDim.y);
  const int tid = threadIdx.x, n = part.n, g = part.g, cpg = part.cpg, c0 = part.c0, u0 = part.u0, nu = part.nu;
  const L layout{S, channels, cpg};
  Unit* xs = reinterpret_cast<Unit*>(smem_raw);
  Unit* dys = xs + units_per_block;
  float* w = reinterpret_cast<float*>(dys + units_per_block);
  float* o = w + cpg;
  float* b = o + cpg;
  float* sums = b + cpg;  // [2 * cpg]: S1 then S2 of this block's units
  float* totals = sums + 2 * cpg;
  float* warp_sums = totals + 2 * cpg;  // channels-last: [warps][cpg / kU columns][2 * kU]
  // 1. dy and x -> shared memory, every unit's copy in flight at once (cp.async); the per-channel
  // values are staged while they fly; then wait for all: the sums below read units other threads copied
  const T* x_group = x + n * x_sample_stride + layout.group_start(c0);
  const T* dy_group = dy + n * dy_sample_stride + layout.group_start(c0);
  const typename L::Walk stride = layout.step(kThreads * kU);
  typename L::Walk walk = layout.start((u0 + tid) * kU);
  for (int i = tid; i < nu; i += kThreads, layout.advance(walk, stride)) {
    __pipeline_memcpy_async(xs + i, x_group + walk.off, sizeof(Unit));
    __pipeline_memcpy_async(dys + i, dy_group + walk.off, sizeof(Unit));
  }
  __pipeline_commit();
  const float r = rstd[n * rstd_stride_n + g * rstd_stride_g];
  const float m = mean[n * mean_stride_n + g * mean_stride_g];
  for (int c = tid; c < cpg; c += kThreads) {
    w[c] = param<T>(weight, params_fp32 & 1, c0 + c, 1.f);
    o[c] = m - (shift != nullptr ? shift[static_cast<long long>(n) * channels + c0 + c] : 0.f);
    b[c] = param<T>(bias, params_fp32 & 2, c0 + c, 0.f);
    sums[c] = sums[cpg + c] = 0.f;
  }
  if constexpr (kChannelsLast) {
    for (int k = tid; k < 32 * cpg; k += kThreads) warp_sums[k] = 0.f;  // (warp, column) slots no lane fills
  }
  __pipeline_wait_prior(0);
  __syncthreads();

  // dz and xhat of unit i, whose first element is in channel c
  auto dz_xhat = [&](int i, int c, float* dz, float* xh) {
    P xv, dv;
    xv.raw = xs[i];
    dv.raw = dys[i];
#pragma unroll
    for (int j = 0; j < kU; ++j) {
      const int cj = L::channel_of(c, j);
      xh[j] = (to_float(xv.e[j]) - o[cj]) * r;  // not x * r - o * r: see the forward's step 3
      dz[j] = to_float(dv.e[j]);
      if constexpr (kSilu) {
        const float z = xh[j] * w[cj] + b[cj];
        const float sg = sigmoid<sizeof(T) == 4>(z);
        dz[j] *= sg * (1.f + z * (1.f - sg));
      }
    }
  };

  // channels-last: unit i (its first channel c) added to per-element sums s1 += dz, s2 += dz * xhat
  auto add_unit = [&](int i, int c, float* s1, float* s2) {
    float dz[kU], xh[kU];
    dz_xhat(i, c, dz, xh);
#pragma unroll
    for (int j = 0; j < kU; ++j) {
      s1[j] += dz[j];
      s2[j] += dz[j] * xh[j];
    }
  };

  // 2. this block's S1, S2 per channel
  if constexpr (!kChannelsLast) {
    // one block-wide sum per channel the block's units touch (a unit lies within one channel)
    if (nu > 0) {
      const int units_per_channel = S / kU;
      const int first = u0 / units_per_channel, last = (u0 + nu - 1) / units_per_channel;
      for (int c = first; c <= last; ++c) {
        const int lo = max(0, c * units_per_channel - u0), hi = min(nu, (c + 1) * units_per_channel - u0);
        float s1 = 0.f, s2 = 0.f;
        for (int i = lo + tid; i < hi; i += kThreads) {
          float dz[kU], xh[kU];
          dz_xhat(i, c, dz, xh);
#pragma unroll
          for (int j = 0; j < kU; ++j) {
            s1 += dz[j];
            s2 += dz[j] * xh[j];
          }
        }
        s1 = block_sum(s1, scratch);
        s2 = block_sum(s2, scratch);
        if (tid == 0) {
          sums[c] = s1;
          sums[cpg + c] = s2;
        }
      }
    }
  } else if (cpg / kU > kThreads) {
    // More columns (units per position) than threads, e.g. one group of 640 fp32 channels: the scheme
    // below would leave no thread active. Each thread sums whole columns over the block's positions,
    // alone, so its sums go straight to shared memory.
    const int columns = cpg / kU;
    for (int col = tid; col < columns; col += kThreads) {
      float s1[kU] = {}, s2[kU] = {};
      for (int i = col; i < nu; i += columns) add_unit(i, col * kU, s1, s2);
#pragma unroll
      for (int j = 0; j < kU; ++j) {
        sums[col * kU + j] = s1[j];
        sums[cpg + col * kU + j] = s2[j];
      }
    }
  } else {
    // Every position holds the group's cpg / kU units (columns); the block starts on a position (the
    // plan aligns it) and its `active` threads step over whole positions, so each thread keeps to one
    // column and sums its kU channels. Within a warp, lanes of one column are `columns` apart: a
    // shuffle tree leaves each column's warp sum in one of the lanes 0 .. columns - 1; thread per
    // channel then adds the warps' sums in warp order (deterministic).
    const int columns = cpg / kU, active = kThreads / columns * columns, lane = tid & 31, warp = tid >> 5;
    float s1[kU] = {}, s2[kU] = {};
    if (tid < active) {
      for (int i = tid; i < nu; i += active) add_unit(i, tid % columns * kU, s1, s2);
    }
    for (int off = columns; off < 32; off *= 2) {
#pragma unroll
      for (int j = 0; j < kU; ++j) {
        const float a = __shfl_down_sync(0xffffffffu, s1[j], off), c = __shfl_down_sync(0xffffffffu, s2[j], off);
        if (lane + off < 32) {
          s1[j] += a;
          s2[j] += c;
        }
      }
    }
    if (lane < columns) {
      float* mine = warp_sums + (warp * columns + tid % columns) * 2 * kU;
#pragma unroll
      for (int j = 0; j < kU; ++j) {
        mine[2 * j] = s1[j];
        mine[2 * j + 1] = s2[j];
      }
    }
    __syncthreads();
    for (int c = tid; c < cpg; c += kThreads) {
      float a = 0.f, d = 0.f;
      for (int k = 0; k < kThreads / 32; ++k) {
        const float* theirs = warp_sums + (k * columns + c / kU) * 2 * kU + 2 * (c % kU);
        a += theirs[0];
        d += theirs[1];
      }
      sums[c] = a;
      sums[cpg + c] = d;
    }
  }
  cluster.sync();  // every block's sums written and visible cluster-wide

  // 3. the group's S1, S2 per channel, summed over the cluster's blocks in rank order (deterministic)
  for (int c = tid; c < cpg; c += kThreads) {
    float s1 = 0.f, s2 = 0.f;
    for (int k = 0; k < static_cast<int>(cluster.num_blocks()); ++k) {
      const float* remote = cluster.map_shared_rank(sums, k);
      s1 += remote[c];
      s2 += remote[cpg + c];
    }
    totals[c] = s1;
    totals[cpg + c] = s2;
    if (cluster.block_rank() == 0) {
      if (dbias != nullptr) dbias[static_cast<long long>(n) * channels + c0 + c] = s1;
      if (dweight != nullptr) dweight[static_cast<long long>(n) * channels + c0 + c] = s2;
    }
  }
  __cluster_barrier_arrive_relaxed();  // as in the forward: reads done (values used), exit guarded below
  __syncthreads();
  if (tid == 0) {
    float a1 = 0.f, a2 = 0.f;
    for (int c = 0; c < cpg; ++c) {
      a1 += w[c] * totals[c];
      a2 += w[c] * totals[cpg + c];
    }
    const float inv = 1.f / (static_cast<float>(cpg) * static_cast<float>(S));
    c1 = a1 * inv;
    c2 = a2 * inv;
  }
  __syncthreads();

  // 4. dx from shared memory
  T* dx_group = dx + n * dx_sample_stride + layout.group_start(c0);
  walk = layout.start((u0 + tid) * kU);
  for (int i = tid; i < nu; i += kThreads, layout.advance(walk, stride)) {
    float dz[kU], xh[kU];
    dz_xhat(i, walk.ch, dz, xh);
    P out;
#pragma unroll
    for (int j = 0; j < kU; ++j) {
      // __fmul_rn: w dz rounded as c1 summed it (ptxas contracts a plain w * dz - c1 into an FMA, whose
      // dx of a one-element group is that product's rounding error times 1/sqrt(eps), not 0)
      out.e[j] = from_float<T>(r * (__fmul_rn(w[L::channel_of(walk.ch, j)], dz[j]) - c1 - xh[j] * c2));
    }
    L::store(reinterpret_cast<Unit*>(dx_group + walk.off), out.raw);
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

// Launch configuration of `rows` rows of `blocks` blocks (grid (blocks, rows)): clusters (blocks, 1, 1),
// or one cooperative grid (every block resident at once). Used in place: `config.attrs` points into the
// object.
struct ClusterLaunch {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attribute[1];
  ClusterLaunch(int blocks, int rows, int smem, cudaStream_t stream, bool cooperative = false) {
    config.gridDim = dim3(blocks, rows, 1);
    config.blockDim = dim3(kThreads, 1, 1);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    if (cooperative) {
      attribute[0].id = cudaLaunchAttributeCooperative;
      attribute[0].val.cooperative = 1;
    } else {
      attribute[0].id = cudaLaunchAttributeClusterDimension;
      attribute[0].val.clusterDim.x = blocks;
      attribute[0].val.clusterDim.y = 1;
      attribute[0].val.clusterDim.z = 1;
    }
    config.attrs = attribute;
    config.numAttrs = 1;
  }
};

template <typename... Params, typename... Args>
int launch(void (*kernel)(Params...), int blocks, int rows, int smem, cudaStream_t stream, bool cooperative,
           Args... args) {
  cudaError_t err = configure(kernel, cooperative ? 1 : blocks, smem);
  if (err != cudaSuccess) return static_cast<int>(err);
  ClusterLaunch grid(blocks, rows, smem, stream, cooperative);
  return static_cast<int>(cudaLaunchKernelEx(&grid.config, kernel, args...));
}

// f(T{}, silu, channels_last), the flags as std::integral_constant<bool, ...>, for the run-time dtype (0
// float32, 1 float16, 2 bfloat16) and flags: the kernel's template arguments.
template <typename F>
int dispatch(int dtype, int silu, int channels_last, F f) {
  auto flags = [&](auto t) {
    using On = std::true_type;
    using Off = std::false_type;
    if (silu) return channels_last ? f(t, On{}, On{}) : f(t, On{}, Off{});
    return channels_last ? f(t, Off{}, On{}) : f(t, Off{}, Off{});
  };
  switch (dtype) {
    case 0:
      return flags(float{});
    case 1:
      return flags(__half{});
    case 2:
      return flags(__nv_bfloat16{});
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
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

// dtype: 0 float32, 1 float16, 2 bfloat16. channels_last: x and y channels-last (4-byte units), else NCHW
// (16-byte units). weight / bias: contiguous, fp32 where params_fp32 has bit 0 / bit 1 set, else x's
// dtype, or null. partials: null (clusters of `blocks`), or 3 fp32 per block and group (batch * groups
// * blocks of them) for a cooperative launch. stages: groups per block (cooperative only, else 1): the
// grid has ceil(batch * groups / stages) rows. clocks: null, or 4 per block and group, the phase record.
// smem: dynamic shared memory per block, as the planner sized it (per stage the units, then per stage 3
// fp32 per channel). stat_strides: mean's (n, g) strides, then rstd's.
int hb_gn_cluster_fwd(int device, int dtype, int silu, int channels_last, const void* x, void* y, const void* weight,
                      const void* bias, int params_fp32, const float* shift, float* mean, float* rstd, float* partials,
                      long long* clocks, int batch, int channels, int groups, int S, int blocks, int units_per_block,
                      int stages, int smem, long long x_sample_stride, long long y_sample_stride,
                      const long long* stat_strides, float eps, void* stream) {
  if (stages < 1 || (stages > 1 && partials == nullptr)) return static_cast<int>(cudaErrorInvalidValue);
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return static_cast<int>(guard.err);
  const int rows = batch * groups;
  return dispatch(dtype, silu, channels_last, [&](auto t, auto s, auto cl) {
    using T = decltype(t);
    auto run = [&](auto kernel) {
      return launch(kernel, blocks, (rows + stages - 1) / stages, smem, static_cast<cudaStream_t>(stream),
                    partials != nullptr, static_cast<const T*>(x), static_cast<T*>(y), weight, bias, params_fp32,
                    shift, mean, rstd, reinterpret_cast<Stats*>(partials), clocks, channels, groups, S,
                    units_per_block, rows, stages, x_sample_stride, y_sample_stride, stat_strides[0],
                    stat_strides[1], stat_strides[2], stat_strides[3], eps);
    };
    constexpr bool kSilu = decltype(s)::value, kChannelsLast = decltype(cl)::value;
    return partials != nullptr ? run(gn_cluster_fwd_kernel<T, kSilu, kChannelsLast, true>)
                               : run(gn_cluster_fwd_kernel<T, kSilu, kChannelsLast, false>);
  });
}

// dweight / dbias: (N, C) float32 per-sample sums, or null. channels_last: as for the forward (each
// block's units must then start on a position). smem: as planned (dy's and x's units, then 7 fp32 per
// channel, channels-last 7 + 32). sample_strides: dy's, x's, dx's.
int hb_gn_cluster_bwd(int device, int dtype, int silu, int channels_last, const void* dy, const void* x, void* dx,
                      const void* weight, const void* bias, int params_fp32, const float* shift, const float* mean,
                      const float* rstd, float* dweight, float* dbias, int batch, int channels, int groups, int S,
                      int blocks, int units_per_block, int smem, const long long* sample_strides,
                      const long long* stat_strides, void* stream) {
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return static_cast<int>(guard.err);
  return dispatch(dtype, silu, channels_last, [&](auto t, auto s, auto cl) {
    using T = decltype(t);
    return launch(gn_cluster_bwd_kernel<T, decltype(s)::value, decltype(cl)::value>, blocks, batch * groups, smem,
                  static_cast<cudaStream_t>(stream), false, static_cast<const T*>(dy), static_cast<const T*>(x),
                  static_cast<T*>(dx), weight, bias, params_fp32, shift, mean, rstd, dweight, dbias, channels, groups,
                  S, units_per_block, sample_strides[0], sample_strides[1], sample_strides[2], stat_strides[0],
                  stat_strides[1], stat_strides[2], stat_strides[3]);
  });
}

// Clusters of `blocks` blocks with `smem` bytes of dynamic shared memory each that the device can hold
// at once (0: such a cluster cannot run there). Every kernel here takes one block of kThreads per SM at
// most; shared memory decides the rest.
int hb_gn_cluster_capacity(int device, int blocks, int smem, int* clusters) {
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return static_cast<int>(guard.err);
  auto kernel = gn_cluster_fwd_kernel<__half, true, false, false>;
  const cudaError_t err = configure(kernel, blocks, smem);
  if (err != cudaSuccess) return static_cast<int>(err);
  ClusterLaunch grid(blocks, 1, smem, nullptr);
  return static_cast<int>(cudaOccupancyMaxActiveClusters(clusters, kernel, &grid.config));
}

// Blocks with `smem` bytes of dynamic shared memory each that the device holds at once: the most a
// cooperative forward may launch.
int hb_gn_cooperative_capacity(int device, int smem, int* blocks) {
  DeviceGuard guard(device);
  if (guard.err != cudaSuccess) return static_cast<int>(guard.err);
  auto kernel = gn_cluster_fwd_kernel<__half, true, false, true>;
  int per_sm = 0, sms = 0;
  cudaError_t err = configure(kernel, 1, smem);
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  *blocks = per_sm * sms;
  return static_cast<int>(err);
}

// The dynamic shared memory one block may opt into on `device` (its per-block limit less the largest
// static shared memory of the kernels, in bytes); 0 below compute capability 9.0, which has no clusters
// (and no code in this library).
int hb_device_limits(int device, int* dynamic_smem) {
  int optin = 0, major = 0;
  *dynamic_smem = 0;
  cudaFuncAttributes attributes;
  cudaError_t err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess && major >= 9) {
    DeviceGuard guard(device);
    err = guard.err;
    int largest_static = 0;
    for (const void* kernel : {reinterpret_cast<const void*>(gn_cluster_fwd_kernel<__half, true, false, false>),
                               reinterpret_cast<const void*>(gn_cluster_fwd_kernel<__half, true, true, false>),
                               reinterpret_cast<const void*>(gn_cluster_fwd_kernel<__half, true, false, true>),
                               reinterpret_cast<const void*>(gn_cluster_bwd_kernel<__half, true, false>),
                               reinterpret_cast<const void*>(gn_cluster_bwd_kernel<__half, true, true>)}) {
      if (err == cudaSuccess) err = cudaFuncGetAttributes(&attributes, kernel);
      if (err == cudaSuccess) largest_static = max(largest_static, static_cast<int>(attributes.sharedSizeBytes));
    }
    if (err == cudaSuccess) *dynamic_smem = optin - largest_static;
  }
  return static_cast<int>(err);
}

// The walk a thread takes over a group's units (run on the host: the same Layout code the kernels
// run), for tests: offsets and channels of elements e0, e0 + step, ..., `count` of them.
int hb_layout_walk(int channels_last, int S, int C, int cpg, int e0, int step, int count, long long* offsets,
                   int* channels) {
  auto walk = [&](auto layout) {
    auto w = layout.start(e0);
    const auto by = layout.step(step);
    for (int k = 0; k < count; ++k, layout.advance(w, by)) {
      offsets[k] = w.off;
      channels[k] = w.ch;
    }
    return 0;
  };
  return channels_last ? walk(Layout<__half, true>{S, C, cpg}) : walk(Layout<__half, false>{S, C, cpg});
}

const char* hb_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // extern "C"
