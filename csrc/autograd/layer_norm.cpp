// layer_norm / rms_norm rows, with or without the fused residual add, with autograd
// recorded in C++: the eager path of the native backends (fastdl/ops/layer_norm.py), as
// csrc/autograd/softmax.cpp is for softmax. The forward and backward run the device's
// layer_norm_rows_forward / _backward kernels through the dispatcher; no Python runs in
// the backward.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "csrc/common/autograd.h"

namespace fastdl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

OptTensor present(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The gradients as differentiable functions of the inputs and of dy, for a backward with
// create_graph=True: the backward formula (fastdl/reference/layer_norm.py) in ATen ops,
// with mean and rstd recomputed from the saved input so that a second derivative sees how
// they depend on it (as _differentiable_grads in fastdl/ops/layer_norm.py).
std::tuple<at::Tensor, at::Tensor, at::Tensor> differentiable_grads(const at::Tensor& dy, const at::Tensor& input,
                                                                    const at::Tensor& weight, bool has_bias,
                                                                    double eps, bool rms) {
  const auto acc = stats_type(input.scalar_type());
  const at::Tensor xa = input.to(acc), dya = dy.to(acc);
  const at::Tensor centred = rms ? xa : xa - xa.mean(-1, true);
  const at::Tensor rstd = at::rsqrt((centred * centred).mean(-1, true) + eps);
  const at::Tensor xhat = centred * rstd;
  const at::Tensor g = weight.defined() ? dya * weight.to(acc) : dya;
  at::Tensor dx = g - xhat * (g * xhat).mean(-1, true);
  if (!rms) dx = dx - g.mean(-1, true);
  dx = (dx * rstd).to(input.scalar_type());
  return {dx, weight.defined() ? (dya * xhat).sum(0) : at::Tensor(), has_bias ? dya.sum(0) : at::Tensor()};
}

struct NormRows : public torch::autograd::Function<NormRows> {
  using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, double, bool);
  static c10::TypedOperatorHandle<Forward> forward_op() {
    static const auto op = typed_op<Forward>("fastdl::layer_norm_rows_forward");
    return op;
  }

  // -> (y, x + residual); the second is empty, and not differentiable, without a residual
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& residual,
                               const OptTensor& weight, const OptTensor& bias, double eps, bool rms) {
    auto [y, h, mean, rstd] = forward_op().call(x, residual, weight, bias, eps, rms);
    const bool fused = residual.has_value();
    ctx->save_for_backward({fused ? h : x, weight.value_or(at::Tensor()), rms ? at::Tensor() : mean, rstd});
    ctx->saved_data["fused"] = fused;
    ctx->saved_data["rms"] = rms;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = bias.has_value();
    // The backward op writes dweight and dbias in one dtype, param_type of the weight alone; when
    // the bias changes the forward's (a bf16 weight beside an fp32 bias), it would round the
    // bias's gradient to bf16, so the backward passes the weight in the statistics' dtype
    ctx->saved_data["mixed_params"] =
        weight.has_value() && param_type(x, {&weight}) != param_type(x, {&weight, &bias});
    if (!fused) ctx->mark_non_differentiable({h});
    ctx->set_materialize_grads(false);
    return {y, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const OptTensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
        bool, bool);
    static const auto op = typed_op<Backward>("fastdl::layer_norm_rows_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &weight = saved[1], &mean = saved[2], &rstd = saved[3];
    const bool fused = ctx->saved_data["fused"].toBool(), rms = ctx->saved_data["rms"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // dy undefined: only the sum of a fused call was used downstream
    const at::Tensor dy = grads[0].defined() ? contiguous_rows(grads[0]) : at::zeros_like(input);
    const at::Tensor dsum = fused && grads[1].defined() ? contiguous_rows(grads[1]) : at::Tensor();
    at::Tensor dx, dweight, dbias;
    if (at::GradMode::is_enabled()) {  // create_graph=True: the gradient must be differentiable too
      std::tie(dx, dweight, dbias) = differentiable_grads(dy, input, weight, has_bias,
                                                          ctx->saved_data["eps"].toDouble(), rms);
      if (dsum.defined()) dx = dx + dsum;
    } else {
      const at::Tensor w = ctx->saved_data["mixed_params"].toBool() ? weight.to(stats_type(input.scalar_type()))
                                                                    : weight;
      std::tie(dx, dweight, dbias) = op.call(dy, present(dsum), input, present(w), present(mean), rstd, has_bias, rms);
    }
    // dweight / dbias in weight's dtype or the statistics' (empty when absent); the engine casts
    // each gradient to its input's dtype (validate_outputs)
    return {dx, fused ? dx : at::Tensor(), weight.defined() ? dweight : at::Tensor(), has_bias ? dbias : at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

// Eager entry of the native backends: x of any shape, normalised over its last
// normalized_ndim dims. The reshapes to (rows, n) and back happen here, under autograd
// (this is a CompositeImplicitAutograd kernel), so they are differentiable views; the
// autograd node is recorded only when a gradient is wanted. Done in C++ rather than in
// fastdl/ops/layer_norm.py: the Python reshapes and helpers cost ~3 us a call.
std::tuple<at::Tensor, at::Tensor> layer_norm_eager(const at::Tensor& x, const OptTensor& residual,
                                                    const OptTensor& weight, const OptTensor& bias,
                                                    int64_t normalized_ndim, double eps, bool rms) {
  TORCH_CHECK(normalized_ndim >= 1 && normalized_ndim <= x.dim(), "fastdl.layer_norm: normalized_ndim ",
              normalized_ndim, " out of range for a ", x.dim(), "-D x");
  const int64_t split = x.dim() - normalized_ndim;
  int64_t rows = 1, n = 1;
  for (int64_t d = 0; d < x.dim(); ++d) (d < split ? rows : n) *= x.size(d);
  const bool two_d = x.dim() == 2 && normalized_ndim == 1;
  auto as_rows = [&](const at::Tensor& t) { return contiguous_rows(two_d ? t : t.reshape({rows, n})); };
  auto flat = [&](const OptTensor& p) { return p.has_value() && p->dim() != 1 ? OptTensor(p->reshape({n})) : p; };
  const at::Tensor x_rows = as_rows(x);
  const OptTensor residual_rows = residual.has_value() ? OptTensor(as_rows(*residual)) : std::nullopt;
  const OptTensor weight_flat = flat(weight), bias_flat = flat(bias);
  auto wants_grad = [](const OptTensor& t) { return t.has_value() && t->requires_grad(); };
  at::Tensor y, h;
  if (at::GradMode::is_enabled() &&
      (x.requires_grad() || wants_grad(residual) || wants_grad(weight) || wants_grad(bias))) {
    variable_list out = NormRows::apply(x_rows, residual_rows, weight_flat, bias_flat, eps, rms);
    y = out[0];
    h = out[1];
  } else {  // no graph to record: the forward alone, without the autograd node's cost
    std::tie(y, h, std::ignore, std::ignore) = NormRows::forward_op().call(x_rows, residual_rows, weight_flat,
                                                                           bias_flat, eps, rms);
  }
  if (two_d) return {y, h};
  return {y.view(x.sizes()), residual.has_value() ? h.view(x.sizes()) : h};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CompositeImplicitAutograd, m) { m.impl("layer_norm_eager", &layer_norm_eager); }

}  // namespace fastdl
