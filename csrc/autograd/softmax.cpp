// softmax / log_softmax rows with autograd recorded in C++, for the eager path of the
// native backends (fastdl/ops/softmax.py): the forward and backward run the device's
// softmax_rows_forward / _backward kernels through the dispatcher, and the backward is
// a C++ node, so a training step pays neither a Python autograd.Function nor a Python
// backward (a 4 x 8 fp32 softmax forward + backward on the CPU: see the commit).
#include <torch/library.h>

#include "csrc/autograd/eager.h"
#include "csrc/common/autograd.h"

namespace fastdl {
namespace {

using torch::autograd::variable_list;

const RowOp<at::Tensor(const at::Tensor&, bool)>& forward_op() {
  static const auto op = typed_op<at::Tensor(const at::Tensor&, bool)>("fastdl::softmax_rows_forward");
  return op;
}

// The backward of softmax / log_softmax over the rows, from the forward's output y
struct SoftmaxRowsBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable y;
  bool log = false;

  std::string name() const override { return "fastdl::SoftmaxRowsBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    y.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    static const auto op =
        typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, bool)>("fastdl::softmax_rows_backward");
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor& dy = grads[0];
    if (!dy.defined() || !task_should_compute_output(0)) return {at::Tensor()};
    const at::Tensor out = y.unpack(node_ptr(this));
    if (!at::GradMode::is_enabled()) return {op.call(contiguous_rows(dy), out, log)};
    // create_graph=True (a gradient penalty, a Hessian-vector product): the same formula
    // in differentiable ATen ops, in the accumulation dtype (fastdl/reference/softmax.py)
    const at::Tensor g = dy.to(stats_type(out.scalar_type())), o = out.to(g.scalar_type());
    const at::Tensor dx = log ? g - o.exp() * g.sum(-1, true) : o * (g - (g * o).sum(-1, true));
    return {dx.to(out.scalar_type())};
  }
};

}  // namespace

// Eager entry of the native backends: softmax of x along dim (in [0, x.dim()), or 0 for
// a 0-d x). x becomes the (rows, cols) layout the kernels take, with dim last and
// contiguous, and the result goes back to x's shape, contiguous, as torch.softmax returns
// it (fastdl/ops/_common.py as_rows / from_rows do the same in Python). This is a
// CompositeImplicitAutograd kernel (or called by fastdl._C.softmax_eager: above autograd
// either way), so those moves are recorded by autograd; the node itself only when a
// gradient is wanted. In C++: as_rows / from_rows cost ~1 us a call in Python.
at::Tensor softmax_eager(const at::Tensor& x, int64_t dim, bool log) {
  const int64_t ndim = x.dim();
  TORCH_CHECK(0 <= dim && dim < std::max<int64_t>(ndim, 1), "fastdl.softmax: dim ", dim, " out of range");
  check_no_forward_grad(log ? "log_softmax" : "softmax", x);
  at::Tensor rows;
  if (ndim == 2 && dim == 1) {
    rows = contiguous_rows(x);  // the common case, without a reshape
  } else if (ndim == 0) {
    rows = x.reshape({1, 1});
  } else {
    int64_t count = 1;  // the number of rows: the product of the other dims (not numel / cols: cols may be 0)
    for (int64_t d = 0; d < ndim; ++d) count *= d == dim ? 1 : x.size(d);
    const at::Tensor moved = dim == ndim - 1 ? x : x.movedim(dim, -1);
    rows = contiguous_rows(moved.reshape({count, x.size(dim)}));
  }
  at::Tensor y = forward_op().call(rows, log);  // not const: older torch takes set_history(at::Tensor&, ...)
  if (at::GradMode::is_enabled() && x.requires_grad()) {  // record the backward, as torch's generated code does
    auto node = make_node<SoftmaxRowsBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(rows));
    node->log = log;
    torch::autograd::set_history(y, node);
    node->y = torch::autograd::SavedVariable(y, /*is_output=*/true);
  }
  if (ndim == 2 && dim == 1) return y;
  if (ndim == 0) return y.reshape({});
  if (dim == ndim - 1) return y.view(x.sizes());
  std::vector<int64_t> moved_sizes(x.sizes().begin(), x.sizes().end());
  moved_sizes.erase(moved_sizes.begin() + dim);
  moved_sizes.push_back(x.size(dim));
  return y.view(moved_sizes).movedim(-1, dim).contiguous();
}

TORCH_LIBRARY_IMPL(fastdl, CompositeImplicitAutograd, m) { m.impl("softmax_eager", &softmax_eager); }

}  // namespace fastdl
