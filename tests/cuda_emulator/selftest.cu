// Kernels with the mistakes the emulator must catch (tests/test_cuda_emulator.py), and their correct
// twins. Emulator-only: block 1's pause in read_after_exit is a host sleep.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <chrono>
#include <string>
#include <thread>

namespace cg = cooperative_groups;

namespace {

// Each thread stores its index, then reads its neighbour's: wrong without the barrier between
template <bool kSynced>
__global__ void neighbours(float* out) {
  extern __shared__ uint4 smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const int t = threadIdx.x, n = 64;
  s[t] = static_cast<float>(t);
  if (kSynced) __syncthreads();
  out[t] = s[(t + 1) % n];
}

__global__ void divergent_sync(float* out) {
  if (threadIdx.x < 32) __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void partial_shuffle(float* out) { out[threadIdx.x] = __shfl_xor_sync(0xffffu, 1.f, 1); }

__global__ void shared_overrun(float* out) {
  extern __shared__ uint4 smem_raw[];
  reinterpret_cast<float*>(smem_raw)[threadIdx.x + 64] = out[threadIdx.x];  // 64 floats were asked for
}

// Block 1 reads block 0's value after the cluster barrier; with kGuarded, block 0 may not exit before
template <bool kGuarded>
__global__ void read_after_exit(float* out) {
  __shared__ float value;
  cg::cluster_group cluster = cg::this_cluster();
  if (threadIdx.x == 0) value = 10.f + cluster.block_rank();
  cluster.sync();
  if (cluster.block_rank() == 1 && threadIdx.x == 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // block 0 exits meanwhile, unless guarded
    out[0] = *cluster.map_shared_rank(&value, 0);
  }
  if (kGuarded) {
    __cluster_barrier_arrive();
    __cluster_barrier_wait();
  }
}

// Each thread copies out[t] into shared memory asynchronously and writes back what it then reads there:
// after the wait, out[t]; before it (kWaited false), what was there (NaN). kExits: exits without
// waiting; kMisaligned: 8-byte copies, to odd threads' 4-byte-aligned addresses
template <bool kWaited, bool kExits = false, bool kMisaligned = false>
__global__ void copy_async(float* out) {
  extern __shared__ uint4 smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  const int t = threadIdx.x;
  __pipeline_memcpy_async(s + t, out + t, kMisaligned ? 8 : 4);
  __pipeline_commit();
  if (kExits) return;
  if (kWaited) __pipeline_wait_prior(0);
  const float v = s[t];
  if (!kWaited) __pipeline_wait_prior(0);
  out[t] = v;
}

template <typename... Params>
int launch(void (*kernel)(Params...), int blocks, int smem, float* out) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute cluster[1];
  cluster[0].id = cudaLaunchAttributeClusterDimension;
  cluster[0].val.clusterDim.x = blocks;
  cluster[0].val.clusterDim.y = cluster[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks, 1, 1);
  config.blockDim = dim3(64, 1, 1);
  config.dynamicSmemBytes = smem;
  config.attrs = cluster;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, out);
}

}  // namespace

extern "C" {

// Launches the named kernel on one cluster of `blocks` blocks of 64 threads, `smem` bytes each
int hb_selftest(const char* name, int blocks, int smem, float* out) {
  const std::string k = name;
  if (k == "neighbours") return launch(neighbours<false>, blocks, smem, out);
  if (k == "neighbours_synced") return launch(neighbours<true>, blocks, smem, out);
  if (k == "divergent_sync") return launch(divergent_sync, blocks, smem, out);
  if (k == "partial_shuffle") return launch(partial_shuffle, blocks, smem, out);
  if (k == "shared_overrun") return launch(shared_overrun, blocks, smem, out);
  if (k == "read_after_exit") return launch(read_after_exit<false>, blocks, smem, out);
  if (k == "read_after_exit_guarded") return launch(read_after_exit<true>, blocks, smem, out);
  if (k == "copy_async") return launch(copy_async<true>, blocks, smem, out);
  if (k == "copy_async_unwaited_read") return launch(copy_async<false>, blocks, smem, out);
  if (k == "copy_async_unwaited_exit") return launch(copy_async<true, true>, blocks, smem, out);
  if (k == "copy_async_misaligned") return launch(copy_async<true, false, true>, blocks, smem, out);
  return cudaErrorInvalidValue;
}

const char* hb_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

// The stand-in conversions, element by element: float -> fp16 / bf16 bits (kind 0 / 1), fp16 / bf16
// bits -> float (kind 2 / 3)
void hb_convert(int kind, const void* in, void* out, int n) {
  for (int i = 0; i < n; ++i) {
    const float* f = static_cast<const float*>(in);
    const uint16_t* h = static_cast<const uint16_t*>(in);
    if (kind == 0) static_cast<uint16_t*>(out)[i] = __float2half_rn(f[i]).bits;
    if (kind == 1) static_cast<uint16_t*>(out)[i] = __float2bfloat16_rn(f[i]).bits;
    if (kind == 2) static_cast<float*>(out)[i] = __half2float(__half{h[i]});
    if (kind == 3) static_cast<float*>(out)[i] = __bfloat162float(__nv_bfloat16{h[i]});
  }
}

}  // extern "C"
