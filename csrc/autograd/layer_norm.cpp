// layer_norm / rms_norm rows, with or without the fused residual add, with autograd
// recorded in C++: the eager path of the native backends (fastdl/ops/layer_norm.py), as
// csrc/autograd/softmax.cpp is for softmax. The forward and backward run the device's
// layer_norm_rows_forward / _backward kernels through the dispatcher; no Python runs in
// the backward.
#include <torch/library.h>

#include "csrc/autograd/eager.h"
#include "csrc/common/autograd.h"

namespace fastdl {
namespace {

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

using Forward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const OptTensor&,
                                                                           const OptTensor&, const OptTensor&, double,
                                                                           bool, std::optional<at::ScalarType>);
const RowOp<Forward>& forward_op() {
  static const auto op = typed_op<Forward>("fastdl::layer_norm_rows_forward");
  return op;
}

// The backward of a norm over the rows: gradients for (x, residual, weight, bias), from the
// normalised input (x, or x + residual when fused, then an output of the forward) and the
// forward's statistics. dy comes in y's dtype: the input's, or after an out_dtype forward
// the statistics' (the backward op takes either and writes dx in the input's dtype).
struct NormRowsBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable input, weight, mean, rstd;
  bool fused = false, rms = false, has_bias = false;
  // The backward op writes dweight and dbias in one dtype, param_type of the weight alone; when
  // the bias changes the forward's (a bf16 weight beside an fp32 bias), it would round the
  // bias's gradient to bf16, so the backward passes the weight in the statistics' dtype
  bool mixed_params = false;
  // A 16-bit x beside an fp32 residual (or the other way round), their sum fp32: the backward
  // op writes the 16-bit one's gradient too (narrow_dtype), where the engine would cast dx
  std::optional<at::ScalarType> narrow_dtype;
  bool narrow_is_x = false;  // else the residual is the 16-bit one
  double eps = 0;

  std::string name() const override { return "fastdl::NormRowsBackward"; }
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    input.reset_data();
    weight.reset_data();
    mean.reset_data();
    rstd.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const OptTensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
        bool, bool, std::optional<at::ScalarType>);
    static const auto op = typed_op<Backward>("fastdl::layer_norm_rows_backward");
    std::lock_guard<std::mutex> lock(mutex_);
    const auto self = node_ptr(this);
    const at::Tensor input_ = input.unpack(self), weight_ = weight.unpack(self), mean_ = mean.unpack(self),
                     rstd_ = rstd.unpack(self);
    // dy undefined: only the sum of a fused call was used downstream
    const at::Tensor dy = grads[0].defined() ? contiguous_rows(grads[0]) : at::zeros_like(input_);
    const at::Tensor dsum = fused && grads[1].defined() ? contiguous_rows(grads[1]) : at::Tensor();
    at::Tensor dx, dweight, dbias, dx_narrow;
    if (at::GradMode::is_enabled()) {  // create_graph=True: the gradient must be differentiable too
      std::tie(dx, dweight, dbias) = differentiable_grads(dy, input_, weight_, has_bias, eps, rms);
      if (dsum.defined()) dx = dx + dsum;
      dx_narrow = dx;  // cast by the engine
    } else {
      const at::Tensor w = mixed_params ? weight_.to(stats_type(input_.scalar_type())) : weight_;
      std::tie(dx, dweight, dbias, dx_narrow) = op.call(dy, present(dsum), input_, present(w), present(mean_), rstd_,
                                                        has_bias, rms, narrow_dtype);
      if (!narrow_dtype.has_value()) dx_narrow = dx;
    }
    // dweight / dbias in weight's dtype or the statistics' (empty when absent); the engine casts
    // each gradient to its input's dtype (validate_outputs)
    return {narrow_is_x ? dx_narrow : dx, fused ? (narrow_is_x ? dx : dx_narrow) : at::Tensor(),
            weight_.defined() ? dweight : at::Tensor(), has_bias ? dbias : at::Tensor()};
  }
};

}  // namespace

// Eager entry of the native backends: x of any shape, normalised over its last
// normalized_ndim dims. The reshapes to (rows, n) and back happen here, under autograd (a
// CompositeImplicitAutograd kernel, or called by fastdl._C.layer_norm_eager: above autograd
// either way), so they are differentiable views; the autograd node is recorded only when a
// gradient is wanted. Done in C++ rather than in fastdl/ops/layer_norm.py: the Python
// reshapes and helpers cost ~3 us a call.
std::tuple<at::Tensor, at::Tensor> layer_norm_eager(const at::Tensor& x, const OptTensor& residual,
                                                    const OptTensor& weight, const OptTensor& bias,
                                                    int64_t normalized_ndim, double eps, bool rms,
                                                    std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(normalized_ndim >= 1 && normalized_ndim <= x.dim(), "fastdl.layer_norm: normalized_ndim ",
              normalized_ndim, " out of range for a ", x.dim(), "-D x");
  const char* op = rms ? "rms_norm" : "layer_norm";
  check_no_forward_grad(op, x);
  for (const OptTensor* t : {&residual, &weight, &bias}) {
    if (t->has_value()) check_no_forward_grad(op, **t);
  }
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
  at::Tensor y, h, mean, rstd;
  std::tie(y, h, mean, rstd) = forward_op().call(x_rows, residual_rows, weight_flat, bias_flat, eps, rms, out_dtype);
  if (at::GradMode::is_enabled() &&
      (x.requires_grad() || wants_grad(residual) || wants_grad(weight) || wants_grad(bias))) {
    // record the backward, as torch's generated code does; without a residual, h is an empty
    // tensor outside the graph
    const bool fused = residual.has_value();
    auto node = make_node<NormRowsBackward>();
    auto tensor = [](const OptTensor& t) { return t.value_or(at::Tensor()); };
    node->set_next_edges(torch::autograd::collect_next_edges(x_rows, tensor(residual_rows), tensor(weight_flat),
                                                             tensor(bias_flat)));
    node->fused = fused;
    node->rms = rms;
    node->has_bias = bias.has_value();
    node->mixed_params = weight.has_value() && param_type(x, {&weight}) != param_type(x, {&weight, &bias});
    if (fused && residual->scalar_type() != x.scalar_type()) {  // the fp32 sum of a 16-bit and an fp32 one
      node->narrow_is_x = wider_of_pair(x.scalar_type(), residual->scalar_type());
      node->narrow_dtype = node->narrow_is_x ? x.scalar_type() : residual->scalar_type();
    }
    node->eps = eps;
    torch::autograd::set_history(y, node);
    if (fused) torch::autograd::set_history(h, node);
    node->input = torch::autograd::SavedVariable(fused ? h : x_rows, /*is_output=*/fused);
    node->weight = torch::autograd::SavedVariable(tensor(weight_flat), false);
    if (!rms) node->mean = torch::autograd::SavedVariable(mean, false);
    node->rstd = torch::autograd::SavedVariable(rstd, false);
  }
  if (two_d) return {y, h};
  return {y.view(x.sizes()), residual.has_value() ? h.view(x.sizes()) : h};
}

TORCH_LIBRARY_IMPL(fastdl, CompositeImplicitAutograd, m) { m.impl("layer_norm_eager", &layer_norm_eager); }

}  // namespace fastdl
