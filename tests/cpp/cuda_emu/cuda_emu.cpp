// The emulator's scheduler and the few CUDA runtime calls the launchers make.
// See cuda_emu.h for what is emulated and how.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace fastdl_emu {
namespace {

enum class State { kReady, kAtSync, kAtShuffle, kDone };

constexpr size_t kStackBytes = 256 * 1024;  // mapped lazily; sanitizer frames are larger
constexpr int kWarp = 32;

struct Fiber {
  ucontext_t context;
  void* stack = nullptr;
  State state = State::kDone;
  uint3 index;
  // the shuffle this lane waits in
  unsigned char value[8], result[8];
  size_t bytes = 0;
  int lane_mask = 0;
  unsigned mask = 0;
};

struct SharedVariable {
  void* data;
  size_t bytes;
  uint64_t poisoned_in;  // the block (blocks_run) it was last poisoned in
};

struct Emulator {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;  // one per thread of the block running; stacks kept for the next
  int current = -1;
  const std::function<void()>* body = nullptr;
  const char* kernel = "";
  std::mt19937_64 rng{std::strtoull(std::getenv("FASTDL_EMU_SEED") ? std::getenv("FASTDL_EMU_SEED") : "1", nullptr, 10)};
  cudaError_t last_error = cudaSuccess;
  std::vector<std::string> launches;
  std::vector<SharedVariable> shared;
  uint64_t blocks_run = 0;  // this block's number, counted over every launch
  // the running launch's dynamic shared memory (exactly its size, so that ASan sees past it)
  std::unique_ptr<unsigned char[]> dynamic_shared;
  size_t dynamic_shared_bytes = 0;
  uint64_t dynamic_poisoned_in = 0;
  // cudaFuncAttributeMaxDynamicSharedMemorySize set for each kernel
  std::map<const void*, int> max_dynamic_shared;
  int occupancy_queries = 0;
};

// Shared memory a block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin): sm_90's
// 227 KiB unless FASTDL_EMU_SMEM_OPTIN says otherwise (sm_80: 166912).
int shared_optin_bytes() {
  const char* set = std::getenv("FASTDL_EMU_SMEM_OPTIN");
  return set != nullptr ? std::atoi(set) : 232448;
}

Emulator& emu() {
  static Emulator instance;
  return instance;
}

void run_fiber() {
  Emulator& e = emu();
  (*e.body)();
  e.fibers[e.current].state = State::kDone;
  // returning resumes uc_link: the scheduler
}

Fiber& current_fiber(const char* what) {
  Emulator& e = emu();
  if (e.current < 0) {
    std::fprintf(stderr, "cuda_emu error: %s called outside a kernel\n", what);
    std::_Exit(3);
  }
  return e.fibers[e.current];
}

void wait(State state) {
  Emulator& e = emu();
  Fiber& f = e.fibers[e.current];
  f.state = state;
  swapcontext(&f.context, &e.scheduler);
}

// Opens the barriers every one of whose threads waits in it; false when none can open.
bool open_barriers(int threads) {
  Emulator& e = emu();
  int live = 0, at_sync = 0;
  for (int i = 0; i < threads; ++i) {
    live += e.fibers[i].state != State::kDone;
    at_sync += e.fibers[i].state == State::kAtSync;
  }
  bool opened = false;
  if (at_sync > 0 && at_sync == live) {
    if (live != threads) {
      char what[160];
      std::snprintf(what, sizeof what, "__syncthreads reached by %d threads after %d of the block's %d exited", live,
                    threads - live, threads);
      fail(what);
    }
    for (int i = 0; i < threads; ++i) e.fibers[i].state = State::kReady;
    opened = true;
  }
  for (int base = 0; base < threads; base += kWarp) {
    const int lanes = std::min(kWarp, threads - base);
    int waiting = 0;
    for (int l = 0; l < lanes; ++l) waiting += e.fibers[base + l].state == State::kAtShuffle;
    if (waiting < kWarp) continue;  // a partial warp waits for ever: reported below
    for (int l = 0; l < kWarp; ++l) {
      const Fiber& f = e.fibers[base + l];
      if (f.mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask (not emulated)");
      if (f.bytes != e.fibers[base].bytes) fail("__shfl_xor_sync: lanes of one warp shuffle different types");
      if (f.lane_mask < 0 || f.lane_mask >= kWarp) fail("__shfl_xor_sync: lane mask past the warp");
    }
    for (int l = 0; l < kWarp; ++l) {
      Fiber& f = e.fibers[base + l];
      std::memcpy(f.result, e.fibers[base + (l ^ f.lane_mask)].value, f.bytes);
      f.state = State::kReady;
    }
    opened = true;
  }
  return opened;
}

[[noreturn]] void deadlock(int threads) {
  Emulator& e = emu();
  int at_sync = 0, at_shuffle = 0, done = 0;
  for (int i = 0; i < threads; ++i) {
    at_sync += e.fibers[i].state == State::kAtSync;
    at_shuffle += e.fibers[i].state == State::kAtShuffle;
    done += e.fibers[i].state == State::kDone;
  }
  char what[200];
  std::snprintf(what, sizeof what,
                "deadlock: %d threads wait at __syncthreads, %d at a warp shuffle whose warp never completes, "
                "%d exited",
                at_sync, at_shuffle, done);
  e.current = -1;
  fail(what);
}

void run_block(int threads) {
  Emulator& e = emu();
  ++e.blocks_run;
  if (static_cast<int>(e.fibers.size()) < threads) e.fibers.resize(threads);
  for (int i = 0; i < threads; ++i) {
    Fiber& f = e.fibers[i];
    if (f.stack == nullptr) {
      f.stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (f.stack == MAP_FAILED) fail("cannot map a fiber stack");
    }
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &e.scheduler;
    makecontext(&f.context, run_fiber, 0);
    f.state = State::kReady;
    f.index = uint3{i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
  }
  std::vector<int> order;
  for (;;) {
    order.clear();
    for (int i = 0; i < threads; ++i)
      if (e.fibers[i].state == State::kReady) order.push_back(i);
    std::shuffle(order.begin(), order.end(), e.rng);
    for (int i : order) {
      e.current = i;
      threadIdx = e.fibers[i].index;
      swapcontext(&e.scheduler, &e.fibers[i].context);
    }
    e.current = -1;
    bool all_done = true;
    for (int i = 0; i < threads; ++i) all_done = all_done && e.fibers[i].state == State::kDone;
    if (all_done) return;
    if (!open_barriers(threads)) deadlock(threads);
  }
}

}  // namespace

[[noreturn]] void fail(const char* what) {
  Emulator& e = emu();
  if (e.current >= 0)
    std::fprintf(stderr, "cuda_emu error: %s\n  in %s, block (%u, %u, %u), thread (%u, %u, %u)\n", what, e.kernel,
                 blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  else
    std::fprintf(stderr, "cuda_emu error: %s\n  in %s, block (%u, %u, %u)\n", what, e.kernel, blockIdx.x, blockIdx.y,
                 blockIdx.z);
  std::fflush(stderr);
  std::_Exit(3);
}

void syncthreads() {
  current_fiber("__syncthreads");
  wait(State::kAtSync);
}

void shared_memory(void* data, size_t bytes) {
  Emulator& e = emu();
  current_fiber("a __shared__ declaration");
  auto it = std::find_if(e.shared.begin(), e.shared.end(), [&](const SharedVariable& v) { return v.data == data; });
  if (it == e.shared.end()) it = e.shared.insert(e.shared.end(), SharedVariable{data, bytes, 0});
  if (it->poisoned_in != e.blocks_run) {
    std::memset(data, 0xff, bytes);
    it->poisoned_in = e.blocks_run;
  }
}

void* dynamic_shared_memory() {
  Emulator& e = emu();
  current_fiber("an extern __shared__ declaration");
  if (e.dynamic_shared_bytes == 0) return nullptr;  // a launch without any: a read of it faults
  if (e.dynamic_poisoned_in != e.blocks_run) {
    std::memset(e.dynamic_shared.get(), 0xff, e.dynamic_shared_bytes);
    e.dynamic_poisoned_in = e.blocks_run;
  }
  return e.dynamic_shared.get();
}

void check_launch_bounds(const char* kernel, unsigned max_threads) {
  current_fiber("check_launch_bounds");
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  if (threads > max_threads) {
    char what[300];
    std::snprintf(what, sizeof what, "%s launched with %u threads a block, above its __launch_bounds__ of %u", kernel,
                  threads, max_threads);
    fail(what);
  }
}

void shuffle_xor(const void* value, size_t bytes, int lane_mask, unsigned mask, void* result) {
  Fiber& f = current_fiber("__shfl_xor_sync");
  std::memcpy(f.value, value, bytes);
  f.bytes = bytes;
  f.lane_mask = lane_mask;
  f.mask = mask;
  wait(State::kAtShuffle);
  std::memcpy(result, f.result, bytes);
}

void run_grid(const char* kernel_name, const void* kernel, const LaunchConfig& config,
              const std::function<void()>& body) {
  Emulator& e = emu();
  const dim3 g = config.grid, b = config.block;
  const uint64_t threads = static_cast<uint64_t>(b.x) * b.y * b.z;
  // the runtime's limits (compute capability 8.x / 9.x); past 48 KiB of dynamic shared
  // memory, the kernel must have opted in to at least that much
  const auto opted = e.max_dynamic_shared.find(kernel);
  const size_t shared_limit = opted != e.max_dynamic_shared.end() ? std::max(opted->second, 48 * 1024) : 48 * 1024;
  const bool valid = threads >= 1 && threads <= 1024 && b.z <= 64 && g.x >= 1 && g.x <= 2147483647u && g.y >= 1 &&
                     g.y <= 65535 && g.z >= 1 && g.z <= 65535 && config.shared_bytes <= shared_limit;
  char line[400], shared[40] = "";
  if (config.shared_bytes > 0) std::snprintf(shared, sizeof shared, " shared=%zu", config.shared_bytes);
  std::snprintf(line, sizeof line, "%s grid=(%u,%u,%u) block=(%u,%u,%u)%s%s", kernel_name, g.x, g.y, g.z, b.x, b.y,
                b.z, shared, valid ? "" : " invalid");
  e.launches.emplace_back(line);
  if (!valid) {
    if (e.last_error == cudaSuccess) e.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  e.kernel = kernel_name;
  e.body = &body;
  e.dynamic_shared.reset(config.shared_bytes > 0 ? new unsigned char[config.shared_bytes] : nullptr);
  e.dynamic_shared_bytes = config.shared_bytes;
  e.dynamic_poisoned_in = 0;
  gridDim = g;
  blockDim = b;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) {
        blockIdx = uint3{x, y, z};
        run_block(static_cast<int>(threads));
      }
  e.body = nullptr;
  e.dynamic_shared.reset();
  e.dynamic_shared_bytes = 0;
}

const std::vector<std::string>& launches() { return emu().launches; }

int occupancy_queries() { return emu().occupancy_queries; }

}  // namespace fastdl_emu

// ---------------------------------------------------------------------------------
// The runtime calls the launchers make. The emulated device: FASTDL_EMU_SMS SMs (4 unless
// set: few, so that small tests reach the paths a full H100 reaches with large ones).
// ---------------------------------------------------------------------------------
extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t err = fastdl_emu::emu().last_error;
  fastdl_emu::emu().last_error = cudaSuccess;
  return err;
}

cudaError_t cudaPeekAtLastError(void) { return fastdl_emu::emu().last_error; }

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    default: return "cudaError (not named by the emulator)";
  }
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) {
    *value = fastdl_emu::shared_optin_bytes();
    return cudaSuccess;
  }
  if (attr != cudaDevAttrMultiProcessorCount) fastdl_emu::fail("cudaDeviceGetAttribute: attribute not emulated");
  const char* sms = std::getenv("FASTDL_EMU_SMS");
  *value = sms != nullptr ? std::atoi(sms) : 4;
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) fastdl_emu::fail("cudaFuncSetAttribute: not emulated");
  if (value < 0 || value > fastdl_emu::shared_optin_bytes()) return cudaErrorInvalidValue;
  fastdl_emu::emu().max_dynamic_shared[func] = value;
  return cudaSuccess;
}

// Blocks an SM holds by thread count (2048 threads, 32 blocks an SM on sm_80/sm_90) and
// by dynamic shared memory (an SM's is the block opt-in limit + 1 KiB, a block's its
// shared_bytes + 1 KiB the runtime reserves, as on sm_80 / sm_90). None for more dynamic
// shared memory than the kernel may take (48 KiB until it opts in to more), as the driver
// answers: it reads the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize.
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void* func, int block_threads,
                                                                   size_t shared_bytes, unsigned int) {
  ++fastdl_emu::emu().occupancy_queries;
  if (block_threads < 1 || block_threads > 1024) return cudaErrorInvalidValue;
  const auto& opted = fastdl_emu::emu().max_dynamic_shared;
  const auto given = opted.find(func);
  if (shared_bytes > std::max<size_t>(given != opted.end() ? given->second : 0, 48 * 1024)) {
    *blocks = 0;
    return cudaSuccess;
  }
  *blocks = std::min(32, 2048 / block_threads);
  const size_t per_sm = static_cast<size_t>(fastdl_emu::shared_optin_bytes()) + 1024;
  if (shared_bytes > 0) *blocks = std::min<int>(*blocks, static_cast<int>(per_sm / (shared_bytes + 1024)));
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* func, int block_threads,
                                                          size_t shared_bytes) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(blocks, func, block_threads, shared_bytes, 0);
}

}  // extern "C"
