// A kernel's shared memory opt-in and its resident blocks, each asked of the runtime once
// per (kernel, device, ...) and remembered; the grid of the kernels that walk rows. Host code
// only; no torch here.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include "env.h"

namespace fastdl::kernels {

// Dynamic shared memory any kernel may take; more needs the kernel's opt-in
// (cudaFuncAttributeMaxDynamicSharedMemorySize), up to the device's opt-in limit.
constexpr size_t kDefaultDynamicShared = 48 * 1024;

// Lets `kernel` take `bytes` of dynamic shared memory on the current device. Called again
// only for more than it was given before: cudaFuncSetAttribute waits on the runtime's
// copies in flight (oneapi-src/unified-runtime#2678 measured that), so not at every launch.
// (bytes plus the kernel's static shared memory must stay within the device's opt-in limit.)
inline cudaError_t opt_in_shared_memory(const void* kernel, size_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, size_t> given;  // (kernel, device) -> bytes
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const std::lock_guard<std::mutex> lock(mutex);
  size_t& allowed = given[{kernel, device}];
  if (bytes <= allowed) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) allowed = bytes;
  return err;
}

// Blocks of `kernel` an SM holds at once with `threads` threads and `shared_bytes` of
// dynamic shared memory, on the current device. The kernel is opted in to shared_bytes
// first, as its launch would be: the runtime answers 0 for a kernel that has not opted in
// to what it asks, so without this the answer would depend on which kernels earlier calls
// happened to launch (and a size derived from it, such as the order of a sum, would change
// within a process). Asked once per (kernel, device, threads, shared_bytes): the answer
// holds for the process, and the query costs host time on every call otherwise.
inline cudaError_t resident_blocks(const void* kernel, int threads, size_t shared_bytes, int* blocks) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int, size_t>, int> known;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const auto key = std::make_tuple(kernel, device, threads, shared_bytes);
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto found = known.find(key);
    if (found != known.end()) {
      *blocks = found->second;
      return cudaSuccess;
    }
  }
  if (shared_bytes > kDefaultDynamicShared) err = opt_in_shared_memory(kernel, shared_bytes);
  int answer = 0;
  if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&answer, kernel, threads, shared_bytes);
  if (err != cudaSuccess) return err;
  const std::lock_guard<std::mutex> lock(mutex);
  known[key] = answer;
  *blocks = answer;
  return cudaSuccess;
}

// Blocks of a kernel that walks rows blockIdx.x, + gridDim.x, ... (softmax's block kernels, the
// norm forward's loop kernel): a block a row, or with FASTDL_CUDA_LOOP_BLOCKS_PER_SM=K (unset or
// 0: a block a row) at most K an SM. These kernels read a row twice;
// with a block a row every row is in flight at once and the second read comes from
// DRAM (softmax fp32 4096 x 65536 on the H200: ~4.1 TB/s counting 3 moves of a row, the copy's
// rate); K blocks an SM keep ~132 K rows in flight, for L2 to hold. Yet a block a row ran best or
// level (H200 tuner, 2b1309b, softmax fp32 4096 x 65536: forward 0.776 ms, 1 / 2 / 4 an SM 1.188 /
// 0.906 / 0.796; backward 1.337, against 1.476 / 1.331 / 1.443).
inline unsigned loop_grid(int64_t rows) {
  int64_t per_sm = 0;
  env_knob("FASTDL_CUDA_LOOP_BLOCKS_PER_SM", 0, 1 << 16, &per_sm);
  int device = 0, sms = 0;
  if (per_sm > 0 && cudaGetDevice(&device) == cudaSuccess &&
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess && sms > 0)
    return static_cast<unsigned>(std::min<int64_t>(rows, per_sm * sms));
  return static_cast<unsigned>(rows);
}

}  // namespace fastdl::kernels
