// The emulator's own check (tests/test_cuda_kernels_emulated.py::test_emulator_self_check):
// a fiber keeps its registers and stack across its switches, and what the kernels' tests
// rely on it to catch, it catches: a missing __syncthreads (the threads' random order), a
// thread that skips one (a deadlock), a write past a local array on a fiber's stack (ASan).
// Compiled into the runner as kernels/*.cu are (tests/emulated_cuda.py rewrites it alike).
#include <cuda_runtime.h>

namespace {

constexpr int kThreads = 64;  // two warps
enum Case { kSwitches = 0, kMissingBarrier = 1, kDeadlock = 2, kStackOverflow = 3 };

__global__ void __launch_bounds__(kThreads) self_check_kernel(float* out, int what) {
  __shared__ float slots[kThreads];
  const int t = threadIdx.x;
  const int row = blockIdx.x * kThreads + t;
  // values on the fiber's stack across every switch below
  int kept[4];
  for (int i = 0; i < 4; ++i) kept[i] = row * 4 + i;
  if (what == kStackOverflow) {
    float local[2] = {0.0f, 0.0f};
    float* volatile at = local;  // through a pointer: past UBSan's bounds check, ASan's redzone must catch it
    at[t % 3] = 1.0f;
    out[row] = local[0];
  }
  slots[t] = static_cast<float>(t);
  if (what != kMissingBarrier && !(what == kDeadlock && t == 0)) __syncthreads();
  const float neighbour = slots[(t + 1) % kThreads];  // NaN (the poison) where it was not written yet
  float warp_total = static_cast<float>(t);
  for (int offset = 16; offset > 0; offset >>= 1) warp_total += __shfl_xor_sync(0xffffffffu, warp_total, offset);
  bool kept_all = true;
  for (int i = 0; i < 4; ++i) kept_all = kept_all && kept[i] == row * 4 + i;
  out[row] = kept_all ? neighbour + 1000.0f * warp_total : -1.0f;
}

}  // namespace

// out: 2 blocks x kThreads floats; after kSwitches each holds (t + 1) % 64 + 1000 * (the sum of
// the thread indices of its warp)
cudaError_t emulator_self_check(int what, float* out) {
  self_check_kernel<<<2, kThreads>>>(out, what);
  return cudaGetLastError();
}
