// Output allocation shared by the native ops.
#pragma once
#include <ATen/ATen.h>

#include <atomic>
#include <limits>

namespace fastdl {

// Test hook: when set (torch.ops.fastdl.set_poison_outputs(True), done by the test
// suite), every output is filled with NaN before a kernel writes it, so an element
// the kernel forgets to write fails the comparison instead of passing by luck.
inline std::atomic<bool>& poison_outputs_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
  if (poison_outputs_flag().load(std::memory_order_relaxed)) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

}  // namespace fastdl
