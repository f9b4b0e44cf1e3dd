// A CPU emulator for this project's CUDA kernels, so their logic runs in CI, which has no GPU (as the
// Triton kernels do under TRITON_INTERPRET=1). The .cu file is compiled unchanged by g++ with this folder
// first on the include path: these headers stand in for cuda_runtime.h, cuda_fp16.h, cuda_bf16.h,
// cuda_pipeline.h (cp.async) and cooperative_groups.h.
//
// Model: each block of a cluster (or of a cooperative launch: the whole grid, one block per SM) runs on
// its own OS thread, and each of the block's CUDA threads is a fiber (ucontext) on it. `__shared__`
// becomes `thread_local`, which makes shared memory per block and lets the blocks of one cluster
// address each other's (map_shared_rank offsets an address from one thread's TLS block into
// another's). Fibers switch only at __syncthreads, shuffles, cluster and grid barriers and cp.async
// waits. The scheduler runs the fibers in a shuffled order, holds back a random quarter of them each
// round, and runs a random eighth of them ("slow") one at a time and only when no other can run, so
// those fall as far behind the rest as the barriers allow: a missing __syncthreads (a read before the
// write it needs, or a write over data another thread has yet to read) gives wrong results, different
// per seed (HBEMU_SEED; by default a fresh one per launch).
//
// Asynchronous copies (cp.async) land in shared memory only at the wait that covers them.
//
// What it checks, each reported by the launch's error string:
// - deadlock: a barrier that not every thread reaches (divergent __syncthreads, partial-warp shuffles,
//   a cluster barrier some block skips), found by a watchdog;
// - a block reading another block's shared memory after that block exited (the cluster exit rule);
// - writes to dynamic shared memory beyond the launch's size, and the launch's limits (block size,
//   cluster size, shared memory opt-in, grid rows);
// - asynchronous copies of a size other than 4, 8, 16 bytes, misaligned, or never waited for.
// Dynamic shared memory starts as 0xff bytes (NaN as floats), so reading what no thread wrote shows. It
// must be declared as CUDA's `extern __shared__ uint4 smem_raw[]` (cuda_runtime.h defines that array).
// What it cannot see: races within a warp-synchronous step, memory-model subtleties, performance.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct uint4 {
  unsigned x, y, z, w;
};

using std::max;
using std::min;

// Internal linkage throughout: two emulated libraries in one process (the kernels and the self-tests)
// must not share the emulator's state, as g++'s unique symbols for inline variables would make them.
namespace hbemu {
namespace {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 128 * 1024;
// An emulated H100: 132 SMs, 227 KiB of opt-in shared memory per block, compute capability 9.0
constexpr int kSms = 132;
constexpr int kSmemOptin = 232448;
constexpr int kGuardBytes = 4096;  // poisoned bytes past the launch's dynamic shared memory, checked after
constexpr int kMaxTogether = kSms;  // blocks running at once: a cluster (up to 16), or a cooperative grid

struct Fiber {
  ucontext_t context;
  uint3 thread;
  bool done = false;
  bool slow = false;  // run only when no other fiber of the block can
  bool cluster_arrived = false;  // arrived at the cluster barrier, not yet waited
  int cluster_phase = 0;         // the cluster barrier's phase it arrived in
  // what it waits for: the phase of a barrier (local: its block's; shared: its cluster's) to move on
  // from wait_phase; the scheduler resumes it only then
  const char* waiting_at = nullptr;
  const int* wait_local = nullptr;
  const std::atomic<int>* wait_shared = nullptr;
  int wait_phase = 0;
  unsigned shuffles = 0;  // shuffles done: their parity picks the exchange slots
  // asynchronous copies (cp.async) issued and not yet committed, then the committed groups, oldest
  // first: each lands in shared memory only when a wait covers its group
  struct Copy {
    void* to;
    const void* from;
    size_t bytes;
  };
  std::vector<Copy> open;
  std::vector<std::vector<Copy>> committed;
};

struct Cluster;

// A generation barrier among fibers of one block (one OS thread: no atomics needed)
struct LocalBarrier {
  int arrived = 0, phase = 0;
};

// One block: its fibers and its barriers, on the OS thread that runs it
struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<int> order;  // the order fibers run in between barriers
  std::mt19937 random;      // which fibers are slow, and which sit out a round
  Fiber* current = nullptr;
  uint3 index;
  unsigned rank = 0;
  Cluster* cluster = nullptr;
  std::function<void()> body;
  LocalBarrier block_barrier;
  LocalBarrier warp_barriers[kMaxThreads / 32];
  unsigned long long exchange[kMaxThreads / 32][2][32];

  int threads() const { return static_cast<int>(fibers.size()); }
};

// State the blocks of one cluster share (each on its own OS thread)
struct Cluster {
  int blocks = 0, threads = 0;
  bool cooperative = false;  // a cooperative launch's whole grid (no clusters)
  std::atomic<int> arrived{0}, phase{0};
  std::atomic<char*> anchors[kMaxTogether];  // each block's address of `anchor` (below)
  std::atomic<bool> exited[kMaxTogether];
  std::atomic<unsigned long long>* progress = nullptr;
  std::atomic<bool>* abort = nullptr;
};

inline thread_local Block* tl_block = nullptr;
// An address in every block's TLS at the same offset from each block's shared memory
inline thread_local char anchor = 0;

// The launch's first error (emulator findings carry their own message)
struct Errors {
  std::mutex mutex;
  std::string message;
  void report(const std::string& what) {
    std::lock_guard<std::mutex> lock(mutex);
    if (message.empty()) message = what;
  }
};
inline Errors errors;

inline Block& block() { return *tl_block; }

inline void yield() { swapcontext(&block().current->context, &block().scheduler); }

inline bool ready(const Fiber& f) {
  if (f.wait_local != nullptr) return *f.wait_local != f.wait_phase;
  if (f.wait_shared != nullptr) return f.wait_shared->load() != f.wait_phase;
  return true;
}

inline void wait_for_phase(const char* where, const int* local, const std::atomic<int>* shared, int phase) {
  Fiber& f = *block().current;
  f.waiting_at = where;
  f.wait_local = local;
  f.wait_shared = shared;
  f.wait_phase = phase;
  do yield();  // even past a barrier it released: the scheduler picks who goes on
  while (!ready(f));
  f.waiting_at = nullptr;
  f.wait_local = nullptr;
  f.wait_shared = nullptr;
}

inline void count_progress() { block().cluster->progress->fetch_add(1, std::memory_order_relaxed); }

inline void arrive_and_wait(LocalBarrier& barrier, int expected, const char* where) {
  count_progress();
  const int phase = barrier.phase;
  if (++barrier.arrived == expected) {
    barrier.arrived = 0;
    ++barrier.phase;
  }
  wait_for_phase(where, &barrier.phase, nullptr, phase);
}

inline void syncthreads() { arrive_and_wait(block().block_barrier, block().threads(), "__syncthreads"); }

// A full-warp shuffle: every lane publishes its value, then reads its source lane's. Two slot sets
// alternate, so one barrier per shuffle suffices: a lane can only overwrite a set after every lane
// passed the next shuffle's barrier, i.e. finished reading it.
template <typename T, typename Source>
T shuffle(unsigned mask, T value, Source source, const char* name) {
  static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffles move up to 8 bytes");
  Block& b = block();
  if (mask != 0xffffffffu) {
    errors.report(std::string(name) + " with a partial mask: not emulated");
  }
  Fiber& f = *b.current;
  const int lane = f.thread.x % 32, warp = f.thread.x / 32, set = f.shuffles++ % 2;
  std::memcpy(&b.exchange[warp][set][lane], &value, sizeof(T));
  arrive_and_wait(b.warp_barriers[warp], 32, name);
  const int from = source(lane);
  T out = value;
  if (from >= 0 && from < 32) std::memcpy(&out, &b.exchange[warp][set][from], sizeof(T));
  return out;
}

inline void cluster_arrive() {
  Fiber& f = *block().current;
  Cluster& c = *block().cluster;
  if (f.cluster_arrived) errors.report("a thread arrived at the cluster barrier twice without waiting");
  f.cluster_arrived = true;
  f.cluster_phase = c.phase.load();
  count_progress();
  if (c.arrived.fetch_add(1) + 1 == c.threads) {
    c.arrived.store(0);
    c.phase.fetch_add(1);
  }
}

inline void cluster_wait() {
  Fiber& f = *block().current;
  Cluster& c = *block().cluster;
  if (!f.cluster_arrived) errors.report("a thread waited at the cluster barrier without arriving");
  f.cluster_arrived = false;
  const int phase = f.cluster_phase;
  wait_for_phase("the cluster barrier", nullptr, &c.phase, phase);
}

// The current block, where its launch has clusters (reported otherwise)
inline Block& in_cluster() {
  if (block().cluster->cooperative) errors.report("cluster_group in a cooperative launch: not emulated");
  return block();
}

inline void grid_sync() {
  if (!block().cluster->cooperative) {
    errors.report("grid.sync() outside a cooperative launch");
    return;
  }
  cluster_arrive();
  cluster_wait();
}

template <typename T>
T* map_shared_rank(T* address, unsigned rank) {
  Block& b = block();
  Cluster& c = *b.cluster;
  if (rank >= static_cast<unsigned>(c.blocks)) {
    errors.report("map_shared_rank: rank " + std::to_string(rank) + " outside the cluster");
    return address;
  }
  if (c.exited[rank].load()) {
    errors.report("block " + std::to_string(b.rank) + " read the shared memory of block " + std::to_string(rank) +
                  " of its cluster after that block exited");
  }
  const auto offset = reinterpret_cast<char*>(address) - &anchor;
  return reinterpret_cast<T*>(c.anchors[rank].load() + offset);
}

// cp.async: copies queue per thread and land when __pipeline_wait_prior covers their group, so a read
// of shared memory before that wait sees what was there (poison, at first)
inline void copy_async(void* to, const void* from, size_t bytes) {
  if (bytes != 4 && bytes != 8 && bytes != 16) {
    errors.report("__pipeline_memcpy_async of " + std::to_string(bytes) + " bytes (4, 8 or 16 only)");
  } else if (reinterpret_cast<uintptr_t>(to) % bytes != 0 || reinterpret_cast<uintptr_t>(from) % bytes != 0) {
    errors.report("__pipeline_memcpy_async of " + std::to_string(bytes) + " bytes from or to a misaligned address");
  } else {
    block().current->open.push_back({to, from, bytes});
  }
}

inline void commit_copies() {
  Fiber& f = *block().current;
  f.committed.push_back(std::move(f.open));
  f.open.clear();
}

inline void wait_copies(size_t prior) {
  Fiber& f = *block().current;
  while (f.committed.size() > prior) {
    for (const Fiber::Copy& c : f.committed.front()) std::memcpy(c.to, c.from, c.bytes);
    f.committed.erase(f.committed.begin());
  }
  yield();  // the others may run meanwhile
}

// The fibers' entry: runs the kernel body as the current fiber's thread
inline void fiber_entry() {
  Block& b = block();
  b.body();
  if (!b.current->open.empty() || !b.current->committed.empty()) {
    errors.report("a thread exited with asynchronous copies it never waited for");
  }
  count_progress();
  b.current->done = true;
}  // returns to the scheduler (uc_link)

// A fiber's stack, kept across launches: one mapping per block slot, kMaxThreads stacks in it (a
// guard page per stack would split it into a mapping per fiber, and a cooperative grid's 65,536 fibers
// would pass Linux's default limit on a process's mappings). Overflow shows at exit: kCanaryBytes at
// each stack's low end must keep their pattern.
constexpr size_t kCanaryBytes = 256;
constexpr unsigned char kCanary = 0xa5;

inline char* stack_for(int block_slot, int thread) {
  static char* pools[kMaxTogether] = {};
  if (pools[block_slot] == nullptr) {
    void* p = mmap(nullptr, kStackBytes * kMaxThreads, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) std::abort();
    pools[block_slot] = static_cast<char*>(p);
  }
  return pools[block_slot] + kStackBytes * thread;
}

inline bool overflowed(const char* stack) {
  return std::any_of(stack, stack + kCanaryBytes, [](char c) { return static_cast<unsigned char>(c) != kCanary; });
}

inline std::string describe_waits(const Block& b) {
  std::map<std::string, int> waiting;
  int done = 0;
  for (const Fiber& f : b.fibers) {
    if (f.done) ++done;
    else waiting[f.waiting_at ? f.waiting_at : "running"]++;
  }
  std::string out = "block (" + std::to_string(b.index.x) + ", " + std::to_string(b.index.y) + "): " +
                    std::to_string(done) + " threads exited";
  for (const auto& [where, count] : waiting) out += ", " + std::to_string(count) + " waiting at " + where;
  return out;
}

// Runs one block to completion (all its fibers exited) or until the launch aborts. Shared memory:
// `smem` / `smem_bytes` is this OS thread's dynamic shared memory, poisoned before and after.
inline void run_block(Block& b, unsigned char* smem, size_t smem_bytes, double timeout_s) {
  tl_block = &b;
  std::memset(smem, 0xff, smem_bytes + kGuardBytes);
  b.cluster->anchors[b.rank].store(&anchor);
  for (int t = 0; t < b.threads(); ++t) {
    Fiber& f = b.fibers[t];
    f = Fiber{};
    f.thread = uint3{static_cast<unsigned>(t), 0, 0};
    f.slow = b.random() % 8 == 0;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stack_for(b.rank, t);
    std::memset(f.context.uc_stack.ss_sp, kCanary, kCanaryBytes);
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &b.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  b.block_barrier = LocalBarrier{};
  for (auto& w : b.warp_barriers) w = LocalBarrier{};
  int alive = b.threads();
  auto last = b.cluster->progress->load();
  auto since = std::chrono::steady_clock::now();
  while (alive > 0 && !b.cluster->abort->load()) {
    bool ran = false;
    for (bool slow : {false, true}) {
      for (int t : b.order) {
        Fiber& f = b.fibers[t];
        if (f.done || f.slow != slow || !ready(f) || (!slow && b.random() % 4 == 0)) continue;
        b.current = &f;
        swapcontext(&b.scheduler, &f.context);
        ran = true;
        if (f.done) --alive;
        if (slow) break;  // one slow fiber at a time: the others go as far as they can in between
      }
      if (ran) break;
    }
    const auto now_progress = b.cluster->progress->load();
    const auto now = std::chrono::steady_clock::now();
    if (now_progress != last) {
      last = now_progress;
      since = now;
    } else if (std::chrono::duration<double>(now - since).count() > timeout_s) {
      char seconds[32];
      std::snprintf(seconds, sizeof seconds, "%g", timeout_s);
      errors.report(std::string("deadlock: no thread of the cluster moved for ") + seconds + " s; " +
                    describe_waits(b));
      b.cluster->abort->store(true);
    } else {
      std::this_thread::yield();  // every fiber here waits on another block
    }
  }
  b.cluster->exited[b.rank].store(true);
  for (int t = 0; t < b.threads(); ++t) {
    if (overflowed(stack_for(b.rank, t))) {
      errors.report("a thread of block (" + std::to_string(b.index.x) + ", " + std::to_string(b.index.y) +
                    ") overflowed its " + std::to_string(kStackBytes / 1024) + " KiB stack");
      break;
    }
  }
  for (size_t k = smem_bytes; k < smem_bytes + kGuardBytes; ++k) {
    if (smem[k] != 0xff) {
      errors.report("block (" + std::to_string(b.index.x) + ", " + std::to_string(b.index.y) +
                    ") wrote dynamic shared memory past the launch's " + std::to_string(smem_bytes) + " bytes");
      break;
    }
  }
  std::memset(smem, 0xff, smem_bytes);  // what another block reads after this one exited is NaN
  tl_block = nullptr;
}

}  // namespace
}  // namespace hbemu

// CUDA's built-in variables, per fiber and per block (blockDim: unused by the kernels)
#define threadIdx (::hbemu::block().current->thread)
#define blockIdx (::hbemu::block().index)
namespace {
thread_local uint3 gridDim;  // a variable, not a macro: launch configurations have members of that name
}  // namespace

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ thread_local

inline void __syncthreads() { hbemu::syncthreads(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  return hbemu::shuffle(mask, value, [&](int lane) { return lane ^ lane_mask; }, "__shfl_xor_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  return hbemu::shuffle(mask, value, [&](int lane) { return lane + static_cast<int>(delta); }, "__shfl_down_sync");
}

inline void __cluster_barrier_arrive() { hbemu::cluster_arrive(); }
inline void __cluster_barrier_arrive_relaxed() { hbemu::cluster_arrive(); }
inline void __cluster_barrier_wait() { hbemu::cluster_wait(); }

// Cache-hinted store: a plain one here
template <typename T>
void __stcs(T* p, T v) { *p = v; }

inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { volatile float p = a * b; return p; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
