// softmax / log_softmax rows with autograd recorded in C++, for the eager path of the
// native backends (fastdl/ops/softmax.py): the forward and backward run the device's
// softmax_rows_forward / _backward kernels through the dispatcher, and the backward is
// a C++ node, so a training step pays neither a Python autograd.Function nor a Python
// backward (a 4 x 8 fp32 softmax forward + backward on the CPU: see the commit).
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "csrc/common/autograd.h"

namespace fastdl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct SoftmaxRows : public torch::autograd::Function<SoftmaxRows> {
  static c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, bool)> forward_op() {
    static const auto op = typed_op<at::Tensor(const at::Tensor&, bool)>("fastdl::softmax_rows_forward");
    return op;
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, bool log) {
    at::Tensor y = forward_op().call(x, log);
    ctx->saved_data["log"] = log;
    ctx->save_for_backward({y});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, bool)>("fastdl::softmax_rows_backward");
    const at::Tensor y = ctx->get_saved_variables()[0];
    const bool log = ctx->saved_data["log"].toBool();
    const at::Tensor& dy = grads[0];
    if (!at::GradMode::is_enabled()) return {op.call(contiguous_rows(dy), y, log), at::Tensor()};
    // create_graph=True (a gradient penalty, a Hessian-vector product): the same formula
    // in differentiable ATen ops, in the accumulation dtype (fastdl/reference/softmax.py)
    const at::Tensor g = dy.to(stats_type(y.scalar_type())), out = y.to(g.scalar_type());
    const at::Tensor dx = log ? g - out.exp() * g.sum(-1, true) : out * (g - (g * out).sum(-1, true));
    return {dx.to(y.scalar_type()), at::Tensor()};
  }
};

// Eager entry of the native backends: softmax of x along dim (in [0, x.dim()), or 0 for
// a 0-d x). x becomes the (rows, cols) layout the kernels take, with dim last and
// contiguous, and the result goes back to x's shape, contiguous, as torch.softmax returns
// it (fastdl/ops/_common.py as_rows / from_rows do the same in Python). This is a
// CompositeImplicitAutograd kernel, so those moves are recorded by autograd; the node
// itself only when a gradient is wanted. In C++: as_rows / from_rows cost ~1 us a call in Python.
at::Tensor softmax_eager(const at::Tensor& x, int64_t dim, bool log) {
  const int64_t ndim = x.dim();
  TORCH_CHECK(0 <= dim && dim < std::max<int64_t>(ndim, 1), "fastdl.softmax: dim ", dim, " out of range");
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
  const at::Tensor y = at::GradMode::is_enabled() && x.requires_grad() ? SoftmaxRows::apply(rows, log)
                                                                        : SoftmaxRows::forward_op().call(rows, log);
  if (ndim == 2 && dim == 1) return y;
  if (ndim == 0) return y.reshape({});
  if (dim == ndim - 1) return y.view(x.sizes());
  std::vector<int64_t> moved_sizes(x.sizes().begin(), x.sizes().end());
  moved_sizes.erase(moved_sizes.begin() + dim);
  moved_sizes.push_back(x.size(dim));
  return y.view(moved_sizes).movedim(-1, dim).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CompositeImplicitAutograd, m) { m.impl("softmax_eager", &softmax_eager); }

}  // namespace fastdl
