// The emulator's scheduler and the few CUDA runtime calls the launchers make.
// See cuda_emu.h for what is emulated and how.
#include "cuda_emu.h"

#include <sys/mman.h>
// FASTDL_EMU_UCONTEXT: the portable fiber switch on x86-64 too (test_emulator_self_check runs both)
#if defined(__x86_64__) && !defined(FASTDL_EMU_UCONTEXT)
#define FASTDL_EMU_X86_64_SWITCH 1
#else
#include <ucontext.h>
#endif

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define FASTDL_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FASTDL_EMU_ASAN 1
#endif
#endif
#if FASTDL_EMU_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace fastdl_emu {
namespace {

enum class State { kReady, kAtSync, kAtShuffle, kDone };

#if FASTDL_EMU_X86_64_SWITCH
// A fiber switch without what swapcontext does each time: a system call for the signal mask,
// and under ASan an interceptor that clears the shadow of the whole target stack (together
// three quarters of the emulator's time in a norm backward). fastdl_emu_switch_stacks(&from, to)
// pushes the callee-saved registers of the System V ABI on this stack, stores the stack
// pointer in `from`, loads `to` and pops the registers saved there; its `ret` resumes that
// fiber where it last switched, or enters it. (The MXCSR and x87 control words, callee-saved
// too, are left as they are: nothing here changes them.)
extern "C" void fastdl_emu_switch_stacks(void** from, void* to);
asm(".text\n"
    ".globl fastdl_emu_switch_stacks\n"
    ".type fastdl_emu_switch_stacks, @function\n"
    "fastdl_emu_switch_stacks:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size fastdl_emu_switch_stacks, .-fastdl_emu_switch_stacks\n");

struct Context {
  void* sp = nullptr;
};

// A context whose first switch enters entry() on the stack [stack, stack + bytes): six zeroed
// registers for the pops, entry's address for the `ret`, and a null return address above it,
// so that entry starts with the stack as a call leaves it (rsp + 8 a multiple of 16) and rbp 0
// (where ASan's frame-pointer unwinder stops).
void make_context(Context& context, void* stack, size_t bytes, void (*entry)()) {
  auto* top = reinterpret_cast<uintptr_t*>((reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15});
  std::memset(top - 8, 0, 8 * sizeof(uintptr_t));
  top[-2] = reinterpret_cast<uintptr_t>(entry);
  context.sp = top - 8;
}

void switch_context(Context& from, const Context& to) { fastdl_emu_switch_stacks(&from.sp, to.sp); }
#else
// Elsewhere the portable (and slower) ucontext calls.
struct Context {
  ucontext_t context;
};

void make_context(Context& context, void* stack, size_t bytes, void (*entry)()) {
  getcontext(&context.context);
  context.context.uc_stack.ss_sp = stack;
  context.context.uc_stack.ss_size = bytes;
  context.context.uc_link = nullptr;  // entry never returns: it switches away for the last time
  makecontext(&context.context, entry, 0);
}

void switch_context(Context& from, const Context& to) { swapcontext(&from.context, &to.context); }
#endif

// ASan checks each access against the bounds of the stack the thread runs on: it is told of
// every switch (its fiber interface), before it (the stack switched to) and after it.
void start_switch(void** fake_stack_save, const void* bottom, size_t bytes) {
#if FASTDL_EMU_ASAN
  __sanitizer_start_switch_fiber(fake_stack_save, bottom, bytes);
#else
  (void)fake_stack_save, (void)bottom, (void)bytes;
#endif
}

void finish_switch(void* fake_stack_save, const void** bottom_old, size_t* bytes_old) {
#if FASTDL_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack_save, bottom_old, bytes_old);
#else
  (void)fake_stack_save, (void)bottom_old, (void)bytes_old;
#endif
}

constexpr size_t kStackBytes = 256 * 1024;  // mapped lazily; sanitizer frames are larger
constexpr int kWarp = 32;

struct Fiber {
  Context context;
  void* stack = nullptr;
  void* fake_stack = nullptr;  // ASan's, while the fiber is switched away
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
  Context scheduler;
  // the scheduler's stack (the thread's own), as ASan gives it at the fibers' first switch
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_bytes = 0;
  void* scheduler_fake_stack = nullptr;
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

// Where each fiber starts: it runs the kernel's body, then switches back to the scheduler for
// the last time (nullptr: ASan may free its fake stack).
void run_fiber() {
  Emulator& e = emu();
  finish_switch(nullptr, &e.scheduler_stack, &e.scheduler_stack_bytes);
  (*e.body)();
  Fiber& f = e.fibers[e.current];
  f.state = State::kDone;
  start_switch(nullptr, e.scheduler_stack, e.scheduler_stack_bytes);
  switch_context(f.context, e.scheduler);
  std::abort();  // a finished fiber is never resumed
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
  start_switch(&f.fake_stack, e.scheduler_stack, e.scheduler_stack_bytes);
  switch_context(f.context, e.scheduler);
  finish_switch(f.fake_stack, nullptr, nullptr);
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
    make_context(f.context, f.stack, kStackBytes, run_fiber);
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
      start_switch(&e.scheduler_fake_stack, e.fibers[i].stack, kStackBytes);
      switch_context(e.scheduler, e.fibers[i].context);
      finish_switch(e.scheduler_fake_stack, nullptr, nullptr);
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
