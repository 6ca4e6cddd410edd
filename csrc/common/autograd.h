// Shared by the C++ autograd functions (csrc/autograd): calling fastdl's own ops
// through the dispatcher, and the layout the row kernels take.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "csrc/common/checks.h"

namespace fastdl {

// The typed handle of op `name` ("fastdl::softmax_rows_forward"), looked up once by the
// caller (a function-local static): calls then go to the kernel of the tensors' device.
template <typename Signature> c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// t as the row kernels take it: its last dim contiguous. A gradient need not be (the
// gradient of y.sum() is one value expanded, stride 0); a copy then, else t itself.
inline at::Tensor contiguous_rows(const at::Tensor& t) {
  return t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

}  // namespace fastdl
