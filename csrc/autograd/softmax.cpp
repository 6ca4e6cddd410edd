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
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, bool log) {
    static const auto op = typed_op<at::Tensor(const at::Tensor&, bool)>("fastdl::softmax_rows_forward");
    at::Tensor y = op.call(x, log);
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

at::Tensor softmax_rows(const at::Tensor& x, bool log) { return SoftmaxRows::apply(x, log); }

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CompositeImplicitAutograd, m) { m.impl("softmax_rows", &softmax_rows); }

}  // namespace fastdl
