// A CPU emulator for the CUDA C++ kernels in kernels/, so that machines without a GPU
// run them (tests/test_cuda_kernels_emulated.py). Force-included (g++ -include) ahead
// of a kernels/*.cu file that tests/emulated_cuda.py has rewritten: its
// `kernel<<<grid, block, smem, stream>>>(args)` launches as fastdl_emu::launch(...) calls,
// with a check_launch_bounds() call in each __launch_bounds__ kernel and a
// shared_memory() call after each __shared__ declaration (only in kernels/*.cu: a
// __shared__ variable in a header would not be poisoned).
//
// Every GPU thread is a fiber (a stack of its own) and runs until it reaches a barrier:
// __syncthreads for its block, a warp shuffle for its warp. When every fiber is waiting,
// the barrier whose threads have all arrived opens. Between barriers the fibers run in a
// random order (seeded), so a missing barrier shows as a wrong result; a barrier that
// cannot open (a thread that skipped it, a shuffle whose lanes exited) stops the run with
// an error naming the kernel and block. Each thread runs independently, as Volta's
// independent thread scheduling allows: no lock-step warps assumed.
//
// Real NVIDIA headers give the types (dim3, __half, __nv_bfloat16, cudaError_t) and
// their host-side conversions; this file gives what device code needs on the host.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

// Device code is host code here. __shared__ variables are static: the blocks of a launch
// run one after another on one OS thread, so one copy is exactly the block's own. The
// rewrite (tests/emulated_cuda.py) declares each to shared_memory(), which poisons it as
// each block starts; it also makes each __launch_bounds__ kernel call check_launch_bounds.
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static

// The running thread's coordinates (set by the scheduler on each switch).
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

namespace fastdl_emu {

// Stops the run: prints "cuda_emu error: <what>" with the kernel and block, exits 3.
[[noreturn]] void fail(const char* what);

// FASTDL_CHECK_ALIGNED (kernels/common/types.cuh): stops the run at a vector access whose
// address is not a multiple of its size, as a GPU faults. (UBSan sees a misaligned
// reinterpret_cast access only where it can tell the type's alignment is asked for; the
// kernels' 16-bit vectors escaped it.)
inline void check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) fail("misaligned vector access");
}

void syncthreads();
// A __shared__ variable, declared by each thread as it passes the declaration: the first
// thread of each block to pass it fills it with 0xff bytes (NaN in every float type), so
// a read of shared memory no thread of this block wrote gives NaN, not the last block's value.
void shared_memory(void* data, size_t bytes);
// The block's dynamic shared memory (`extern __shared__ T name[];`, rewritten to a call
// of this): the launch's shared_bytes, poisoned as static __shared__ variables are (null when it has none).
void* dynamic_shared_memory();
// Called on entry of a kernel declared __launch_bounds__(max_threads): a GPU refuses to
// launch it with a larger block, so a launcher that asks for one is an error here.
void check_launch_bounds(const char* kernel, unsigned max_threads);
// Publishes this lane's bytes, waits for the whole warp, returns the bytes of lane
// (this lane ^ lane_mask).
void shuffle_xor(const void* value, size_t bytes, int lane_mask, unsigned mask, void* result);

struct LaunchConfig {
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
};
inline LaunchConfig config(dim3 grid, dim3 block, size_t shared_bytes = 0, cudaStream_t stream = nullptr) {
  return {grid, block, shared_bytes, stream};
}

// Runs `body` once per thread of every block of the grid (blocks in order, threads as
// fibers); an invalid configuration sets the launch error, as the runtime does (dynamic
// shared memory past 48 KiB needs the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize).
void run_grid(const char* kernel_name, const void* kernel, const LaunchConfig& config,
              const std::function<void()>& body);

template <typename... Params, typename... Args>
void launch(const char* kernel_name, void (*kernel)(Params...), const LaunchConfig& config, Args&&... args) {
  // kernel parameters are passed by value, converted as at a call
  std::function<void()> body = [&] { kernel(args...); };
  run_grid(kernel_name, reinterpret_cast<const void*>(kernel), config, body);
}

// Every launch so far: "<kernel as written> grid=(x,y,z) block=(x,y,z)[ shared=N][ invalid]"
// (shared: its dynamic shared memory, when it has some).
const std::vector<std::string>& launches();

// cudaOccupancyMaxActiveBlocksPerMultiprocessor calls so far.
int occupancy_queries();

}  // namespace fastdl_emu

#define FASTDL_CHECK_ALIGNED(p, bytes) ::fastdl_emu::check_aligned((p), (bytes))

inline void __syncthreads() { fastdl_emu::syncthreads(); }

// The fast single-precision divide (the GPU's is within 2 ulp): here an exact one.
inline float __fdividef(float a, float b) { return a / b; }

template <typename T> T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move up to 8 bytes");
  if (width != 32) fastdl_emu::fail("__shfl_xor_sync: only width 32 is emulated");
  T result;
  fastdl_emu::shuffle_xor(&value, sizeof(T), lane_mask, mask, &result);
  return result;
}
