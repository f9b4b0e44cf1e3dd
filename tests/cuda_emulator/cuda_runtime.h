// The CUDA runtime API the project's .cu files use, on the emulator (emulator.h): one emulated H100
// (device 0), launches run to completion before they return.
#pragma once

#include <barrier>

#include "emulator.h"

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorLaunchFailure = 719,
  cudaErrorCooperativeLaunchTooLarge = 720,
};

typedef struct CUstream_st* cudaStream_t;

enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 11,
};

enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaLaunchAttributeID {
  cudaLaunchAttributeCooperative = 2,
  cudaLaunchAttributeClusterDimension = 4,
};

struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  union {
    struct {
      unsigned x, y, z;
    } clusterDim;
    int cooperative;
  } val;
};

struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes;
  cudaStream_t stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

struct cudaFuncAttributes {
  size_t sharedSizeBytes;
};

namespace {
// Each block's dynamic shared memory (`extern __shared__` arrays become this thread's), with guard bytes
alignas(16) thread_local uint4 smem_raw[(hbemu::kSmemOptin + hbemu::kGuardBytes) / sizeof(uint4)];
}  // namespace

namespace hbemu {
namespace {

// What cudaFuncSetAttribute opted each kernel into
struct KernelAttributes {
  int max_dynamic_smem = 48 * 1024;
  bool non_portable_clusters = false;
};

inline std::mutex attributes_mutex;
inline std::map<const void*, KernelAttributes> kernel_attributes;

inline KernelAttributes attributes_of(const void* kernel) {
  std::lock_guard<std::mutex> lock(attributes_mutex);
  return kernel_attributes[kernel];
}

inline unsigned cluster_size(const cudaLaunchConfig_t& config) {
  for (unsigned k = 0; k < config.numAttrs; ++k) {
    if (config.attrs[k].id == cudaLaunchAttributeClusterDimension) return config.attrs[k].val.clusterDim.x;
  }
  return 1;
}

inline bool cooperative(const cudaLaunchConfig_t& config) {
  for (unsigned k = 0; k < config.numAttrs; ++k) {
    if (config.attrs[k].id == cudaLaunchAttributeCooperative) return config.attrs[k].val.cooperative != 0;
  }
  return false;
}

// Why this configuration cannot launch, or empty
inline std::string refusal(const cudaLaunchConfig_t& config, const void* kernel) {
  const KernelAttributes a = attributes_of(kernel);
  const unsigned cluster = cluster_size(config);
  const size_t threads = size_t{config.blockDim.x} * config.blockDim.y * config.blockDim.z;
  if (config.blockDim.y != 1 || config.blockDim.z != 1 || config.gridDim.z != 1) return "only 1-D blocks and 2-D grids";
  if (threads == 0 || threads > kMaxThreads || threads % 32) return "block of " + std::to_string(threads) + " threads";
  if (config.gridDim.y > 65535) return "grid rows " + std::to_string(config.gridDim.y) + " > 65535";
  if (cluster == 0 || config.gridDim.x % cluster) return "grid columns not a multiple of the cluster size";
  if (cooperative(config) && cluster > 1) return "a cooperative launch of clusters: not emulated";
  if (cluster > (a.non_portable_clusters ? 16u : 8u)) return "cluster of " + std::to_string(cluster) + " blocks";
  if (config.dynamicSmemBytes > static_cast<size_t>(a.max_dynamic_smem)) {
    return std::to_string(config.dynamicSmemBytes) + " bytes of dynamic shared memory, opted into " +
           std::to_string(a.max_dynamic_smem);
  }
  return {};
}

// Runs every cluster of the grid, one after the other; a cluster's blocks run at once on their own
// threads, kept for the whole launch (so static __shared__ variables start with the previous cluster's
// values, as they may on a GPU; dynamic shared memory starts poisoned). A cooperative launch runs as
// one such group of all its blocks, at most one per SM.
inline cudaError_t launch(const cudaLaunchConfig_t& config, const void* kernel, std::function<void()> body) {
  static std::mutex one_at_a_time;  // the fiber stacks and the error message are the emulator's, not a launch's
  std::lock_guard<std::mutex> serialised(one_at_a_time);
  {
    std::lock_guard<std::mutex> lock(errors.mutex);
    errors.message.clear();
  }
  if (std::string why = refusal(config, kernel); !why.empty()) {
    errors.report("launch refused: " + why);
    return cudaErrorInvalidConfiguration;
  }
  const bool together = cooperative(config);
  const int grid_blocks = static_cast<int>(config.gridDim.x * config.gridDim.y);
  if (together && grid_blocks > kSms) {
    errors.report("too many blocks in cooperative launch: " + std::to_string(grid_blocks) + ", " +
                  std::to_string(kSms) + " resident");
    return cudaErrorCooperativeLaunchTooLarge;
  }
  // blocks that run at once: a cluster, or the whole cooperative grid
  const int cluster = together ? grid_blocks : static_cast<int>(cluster_size(config));
  const int threads = static_cast<int>(config.blockDim.x);
  const int columns = together ? 1 : static_cast<int>(config.gridDim.x) / cluster;
  const int rows = together ? 1 : static_cast<int>(config.gridDim.y);
  const char* seed_env = std::getenv("HBEMU_SEED");
  const char* timeout_env = std::getenv("HBEMU_TIMEOUT");
  const double timeout_s = timeout_env ? std::atof(timeout_env) : 30.0;
  std::mt19937 random(seed_env ? static_cast<unsigned>(std::atoll(seed_env)) : std::random_device{}());
  std::atomic<unsigned long long> progress{0};
  std::atomic<bool> abort{false};
  std::vector<Block> blocks(cluster);
  std::vector<int> order(threads);
  for (int t = 0; t < threads; ++t) order[t] = t;
  std::shuffle(order.begin(), order.end(), random);
  std::vector<unsigned> seeds(cluster);
  for (auto& seed : seeds) seed = random();
  Cluster state;
  state.blocks = cluster;
  state.cooperative = together;
  state.threads = cluster * threads;
  state.progress = &progress;
  state.abort = &abort;
  auto next_cluster = [&]() noexcept {
    for (int r = 0; r < cluster; ++r) state.exited[r].store(false);
  };
  next_cluster();
  std::barrier between_clusters(cluster, next_cluster);
  std::vector<std::thread> workers;
  for (int r = 0; r < cluster; ++r) {
    workers.emplace_back([&, r] {
      Block& b = blocks[r];
      b.fibers.resize(threads);
      b.order = order;
      b.random.seed(seeds[r]);
      b.rank = r;
      b.cluster = &state;
      b.body = body;
      gridDim = uint3{config.gridDim.x, config.gridDim.y, 1};
      for (int row = 0; row < rows && !abort.load(); ++row) {
        for (int col = 0; col < columns && !abort.load(); ++col) {
          b.index = together ? uint3{r % config.gridDim.x, r / config.gridDim.x, 0}
                             : uint3{static_cast<unsigned>(col * cluster + r), static_cast<unsigned>(row), 0};
          run_block(b, reinterpret_cast<unsigned char*>(smem_raw), config.dynamicSmemBytes, timeout_s);
          between_clusters.arrive_and_wait();
        }
      }
    });
  }
  for (auto& w : workers) w.join();
  std::lock_guard<std::mutex> lock(errors.mutex);
  return errors.message.empty() ? cudaSuccess : cudaErrorLaunchFailure;
}

}  // namespace
}  // namespace hbemu

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attribute) {
    case cudaDevAttrMultiProcessorCount:
      *value = hbemu::kSms;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:
      *value = 9;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = hbemu::kSmemOptin;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute attribute, int value) {
  std::lock_guard<std::mutex> lock(hbemu::attributes_mutex);
  auto& a = hbemu::kernel_attributes[reinterpret_cast<const void*>(kernel)];
  if (attribute == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > hbemu::kSmemOptin) return cudaErrorInvalidValue;
    a.max_dynamic_smem = value;
  } else if (attribute == cudaFuncAttributeNonPortableClusterSizeAllowed) {
    a.non_portable_clusters = value != 0;
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

// Static shared memory is not known here: reported as none, so the emulated device offers the kernels
// its whole opt-in limit
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void*) {
  attributes->sharedSizeBytes = 0;
  return cudaSuccess;
}

// One block per SM (the kernels' 512 threads at up to 128 registers) wherever the launch could run
template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveClusters(int* clusters, Kernel kernel, const cudaLaunchConfig_t* config) {
  *clusters = hbemu::refusal(*config, reinterpret_cast<const void*>(kernel)).empty()
                  ? hbemu::kSms / static_cast<int>(hbemu::cluster_size(*config))
                  : 0;
  return cudaSuccess;
}

template <typename Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int block_size, size_t smem) {
  *blocks = block_size > 0 && block_size <= hbemu::kMaxThreads && smem <= static_cast<size_t>(hbemu::kSmemOptin);
  return cudaSuccess;
}

template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args... args) {
  return hbemu::launch(*config, reinterpret_cast<const void*>(kernel), [=] { kernel(static_cast<Params>(args)...); });
}

// The emulator's own findings come with their message (the last launch's)
static const char* cudaGetErrorString(cudaError_t err) {
  static thread_local std::string text;
  switch (err) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidDevice:
      return "invalid device ordinal";
    default: {
      std::lock_guard<std::mutex> lock(hbemu::errors.mutex);
      text = "emulator: " + hbemu::errors.message;
      return text.c_str();
    }
  }
}
