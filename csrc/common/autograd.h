// Shared by the C++ autograd nodes (csrc/autograd): calling fastdl's own ops through the
// dispatcher, making a node, and the layout the row kernels take.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <memory>
#include <type_traits>

#include "csrc/common/checks.h"

namespace fastdl {

// One of fastdl's row ops (softmax_rows_forward ...), called from C++ below autograd, as torch's
// generated autograd kernels call theirs: the row ops have no autograd kernel, so a call above it
// goes through torch's boxed not-implemented fallback (VariableFallbackKernel.cpp), which boxes
// the arguments into a stack and unboxes them again. The callers record their own autograd node.
template <typename Signature> struct RowOp;
template <typename Return, typename... Args> struct RowOp<Return(Args...)> {
  c10::TypedOperatorHandle<Return(Args...)> handle;
  Return call(Args... args) const {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return handle.call(args...);
  }
};

// Row op `name` ("fastdl::softmax_rows_forward"), looked up once by the caller (a
// function-local static): calls then go to the kernel of the tensors' device.
template <typename Signature> RowOp<Signature> typed_op(const char* name) {
  return {c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>()};
}

// fastdl's backward nodes are torch::autograd::Node subclasses written as torch's generated
// ones are (torch/csrc/autograd/generated/Functions.h), not torch::autograd::Function: that
// one's generic machinery (a map of named values, the inputs' and outputs' metadata kept
// for the backward, its forward above autograd) cost ~3 us a call on the CPU here, against
// ~1 us for torch's own nodes.
//
// torch holds nodes in a c10::intrusive_ptr since pytorch/pytorch#181782 (April 2026: the
// 2.13 / 2.14 of the CPU machines) and in a std::shared_ptr freed through
// torch::autograd::deleteNode before (most likely the H200 image's 2.11). NodePtr is this
// torch's; make_node / node_ptr make one and get one for `this`. The other way's code is
// never instantiated (it depends on T), so its names need not exist in this torch.
using NodePtr = decltype(torch::autograd::Edge::function);
inline constexpr bool kSharedNodes = std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>;

template <class T> auto make_node() {
  if constexpr (kSharedNodes) {
    return std::shared_ptr<T>(new T(), [](T* node) { deleteNode(node); });  // torch::autograd's, found by ADL
  } else {
    return c10::make_intrusive<T>();
  }
}

template <class T> NodePtr node_ptr(T* node) {
  if constexpr (kSharedNodes) {
    return node->shared_from_this();
  } else {
    return node->getptr();
  }
}

// fastdl's nodes have no forward derivative: a forward-mode AD dual input is refused here,
// where its tangent would otherwise be dropped. fastdl.ops computes forward AD with torch's
// ops (ops/_common.composite_only), so only a direct call of a native eager op meets this.
inline void check_no_forward_grad(const char* op, const at::Tensor& t) {
  TORCH_CHECK(!t.defined() || !t._fw_grad(/*level=*/0).defined(), "fastdl.", op,
              ": the native eager op takes no forward-mode AD (dual) tensor; fastdl.ops.", op,
              " computes forward AD with torch's ops");
}

// t as the row kernels take it: its last dim contiguous. A gradient need not be (the
// gradient of y.sum() is one value expanded, stride 0); a copy then, else t itself.
inline at::Tensor contiguous_rows(const at::Tensor& t) {
  return t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

}  // namespace fastdl
