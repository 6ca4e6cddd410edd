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

using OptType = std::optional<at::ScalarType>;
using Forward = at::Tensor(const at::Tensor&, bool, OptType);
using Backward = at::Tensor(const at::Tensor&, const at::Tensor&, bool, OptType);

const RowOp<Forward>& forward_op() {
  static const auto op = typed_op<Forward>("fastdl::softmax_rows_forward");
  return op;
}

const RowOp<Backward>& backward_op() {
  static const auto op = typed_op<Backward>("fastdl::softmax_rows_backward");
  return op;
}

// The backward of softmax / log_softmax over the rows, from the forward's output y; x's
// gradient in x's dtype (a 16-bit x's, when y was written in fp32)
struct SoftmaxRowsBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable y;
  bool log = false;
  at::ScalarType x_type = at::kFloat;

  std::string name() const override { return "fastdl::SoftmaxRowsBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    y.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor& dy = grads[0];
    if (!dy.defined() || !task_should_compute_output(0)) return {at::Tensor()};
    const at::Tensor out = y.unpack(node_ptr(this));
    const OptType grad_in_dtype = x_type != out.scalar_type() ? OptType(x_type) : std::nullopt;
    if (!at::GradMode::is_enabled()) return {backward_op().call(contiguous_rows(dy), out, log, grad_in_dtype)};
    // create_graph=True (a gradient penalty, a Hessian-vector product): the same formula
    // in differentiable ATen ops, in the accumulation dtype (fastdl/reference/softmax.py)
    const at::Tensor g = dy.to(stats_type(out.scalar_type())), o = out.to(g.scalar_type());
    const at::Tensor dx = log ? g - o.exp() * g.sum(-1, true) : o * (g - (g * o).sum(-1, true));
    return {dx.to(x_type)};
  }
};

// x as the (rows, cols) layout the kernels take, with dim last and contiguous (fastdl/ops/
// _common.py as_rows does the same in Python; in C++ a call saves ~1 us of it).
at::Tensor rows_along(const at::Tensor& x, int64_t dim) {
  const int64_t ndim = x.dim();
  if (ndim == 2 && dim == 1) return contiguous_rows(x);  // the common case, without a reshape
  if (ndim == 0) return x.reshape({1, 1});
  int64_t count = 1;  // the number of rows: the product of the other dims (not numel / cols: cols may be 0)
  for (int64_t d = 0; d < ndim; ++d) count *= d == dim ? 1 : x.size(d);
  const at::Tensor moved = dim == ndim - 1 ? x : x.movedim(dim, -1);
  return contiguous_rows(moved.reshape({count, x.size(dim)}));
}

// A (rows, cols) result of the kernels back in x's shape, contiguous (as_rows' inverse,
// fastdl/ops/_common.py from_rows)
at::Tensor shaped_as(const at::Tensor& y, const at::Tensor& x, int64_t dim) {
  const int64_t ndim = x.dim();
  if (ndim == 2 && dim == 1) return y;
  if (ndim == 0) return y.reshape({});
  if (dim == ndim - 1) return y.view(x.sizes());
  std::vector<int64_t> moved_sizes(x.sizes().begin(), x.sizes().end());
  moved_sizes.erase(moved_sizes.begin() + dim);
  moved_sizes.push_back(x.size(dim));
  return y.view(moved_sizes).movedim(-1, dim).contiguous();
}

}  // namespace

// Eager entry of the native backends: softmax of x along dim (in [0, x.dim()), or 0 for
// a 0-d x), returned in x's shape, contiguous, as torch.softmax returns it. This is a
// CompositeImplicitAutograd kernel (or called by fastdl._C.softmax_eager: above autograd
// either way), so the layout moves are recorded by autograd; the node itself only when a
// gradient is wanted. out_dtype: y's dtype (as softmax_rows_forward takes it).
at::Tensor softmax_eager(const at::Tensor& x, int64_t dim, bool log, OptType out_dtype) {
  TORCH_CHECK(0 <= dim && dim < std::max<int64_t>(x.dim(), 1), "fastdl.softmax: dim ", dim, " out of range");
  check_no_forward_grad(log ? "log_softmax" : "softmax", x);
  const at::Tensor rows = rows_along(x, dim);
  at::Tensor y = forward_op().call(rows, log, out_dtype);  // not const: older torch takes set_history(at::Tensor&, ...)
  if (at::GradMode::is_enabled() && x.requires_grad()) {  // record the backward, as torch's generated code does
    auto node = make_node<SoftmaxRowsBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(rows));
    node->log = log;
    node->x_type = x.scalar_type();
    torch::autograd::set_history(y, node);
    node->y = torch::autograd::SavedVariable(y, /*is_output=*/true);
  }
  return shaped_as(y, x, dim);
}

// fastdl.ops.softmax_backward on a native backend: the gradient of (log_)softmax's input
// along dim from its output out and grad_out (of out's shape, dtype and device; the caller
// checked them), through the dispatcher as fastdl.ops' Python path calls it.
at::Tensor softmax_backward_eager(const at::Tensor& grad_out, const at::Tensor& out, int64_t dim, bool log) {
  TORCH_CHECK(0 <= dim && dim < std::max<int64_t>(out.dim(), 1), "fastdl.softmax_backward: dim ", dim,
              " out of range");
  return shaped_as(backward_op().call(rows_along(grad_out, dim), rows_along(out, dim), log, std::nullopt), out, dim);
}

TORCH_LIBRARY_IMPL(fastdl, CompositeImplicitAutograd, m) { m.impl("softmax_eager", &softmax_eager); }

}  // namespace fastdl
