// Output allocation shared by the native ops.
#pragma once
#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <limits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastdl {

// Test hook: when set (torch.ops.fastdl.set_poison_outputs(True), done by the test
// suite), every output is filled with NaN before a kernel writes it, so an element
// the kernel forgets to write fails the comparison instead of passing by luck.
inline std::atomic<bool>& poison_outputs_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

// A fresh CPU output is faulted in page by page on its first write; for a large one
// on a small VM that costs more than the kernel (4096x4096 fp32 softmax: ~25 of 40 ms).
// Asking for transparent huge pages on the 2 MiB-aligned interior of the untouched
// buffer makes that 512x fewer faults. It is only advice: where THP is off it does
// nothing. (torch does the same for all its allocations under THP_MEM_ALLOC_ENABLE=1.)
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t aligned_begin = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t aligned_end = end & ~(kHugePage - 1);
  if (aligned_end > aligned_begin)
    madvise(reinterpret_cast<void*>(aligned_begin), aligned_end - aligned_begin, MADV_HUGEPAGE);
#endif
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
  if (out.device().is_cpu() && out.nbytes() >= (size_t(4) << 20)) advise_huge_pages(out);
  if (poison_outputs_flag().load(std::memory_order_relaxed)) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

}  // namespace fastdl
