// LayerNorm / RMSNorm (optionally fused with a residual add) on CUDA tensors: checks,
// allocation and the launch of kernels/layer_norm.cu, registered as the CUDA
// implementation of the fastdl ops (same schema and results as csrc/cpu/layer_norm.cpp).
#include <torch/library.h>

#include "csrc/common/checks.h"
#include "csrc/common/outputs.h"
#include "csrc/ops/common.h"
#include "layer_norm.h"

namespace fastdl {
namespace {

// weight / bias as a contiguous vector of `type` on x's device; undefined when absent.
at::Tensor param_as(const std::optional<at::Tensor>& p, at::ScalarType type, const at::Tensor& x, int64_t n,
                    const char* fn, const char* name) {
  if (!p.has_value()) return at::Tensor();
  TORCH_CHECK(p->device() == x.device(), fn, ": ", name, " is on ", p->device(), " but x is on ", x.device());
  TORCH_CHECK(p->dim() == 1 && p->size(0) == n, fn, ": ", name, " must have shape (", n, "), got ", p->sizes());
  kernel_dtype(fn, name, *p);
  return p->to(type).contiguous();
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_rows_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms, std::optional<at::ScalarType> out_dtype) {
  const char* fn = "fastdl.layer_norm (cuda)";
  check_rows(fn, "x", x, at::kCUDA);
  const int64_t rows = x.size(0), n = x.size(1);
  kernel_dtype(fn, "x", x);
  at::ScalarType sum_type = x.scalar_type();
  if (residual.has_value()) {
    check_rows(fn, "residual", *residual, at::kCUDA, rows, n);
    TORCH_CHECK(residual->device() == x.device(), fn, ": residual must be on x's device");
    sum_type = norm_sum_type(fn, x.scalar_type(), residual->scalar_type());
  }
  // The kernels read the narrower of x and residual as "x" (the add commutes): a 16-bit one
  // beside an fp32 one is read as it is, where torch's add reads both and writes the fp32 sum
  // the norm then reads back (18 bytes a value moved; 14 fused)
  const bool swap = residual.has_value() && wider_of_pair(residual->scalar_type(), x.scalar_type());
  const at::Tensor& narrow = swap ? *residual : x;
  const std::optional<at::Tensor>& wide = swap ? std::optional<at::Tensor>(x) : residual;
  const auto dtype = kernel_dtype(fn, "x", narrow);
  // y in fp32 from 16-bit rows, the cast fused: 6 bytes a value moved, not the 14 of a cast
  // kernel then the norm; the kernels take that with the parameters in fp32 only (as autocast
  // has them)
  const at::ScalarType out_type = norm_out_type(fn, sum_type, out_dtype);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType params =
      out_type != narrow.scalar_type() ? stats_type(narrow.scalar_type()) : param_type(narrow, {&weight, &bias});
  const at::Tensor w = param_as(weight, params, x, n, fn, "weight");
  const at::Tensor b = param_as(bias, params, x, n, fn, "bias");
  const auto acc = x.options().dtype(stats_type(sum_type));
  at::Tensor y = empty_output({rows, n}, x.options().dtype(out_type));
  at::Tensor h =
      residual.has_value() ? empty_output({rows, n}, x.options().dtype(sum_type)) : at::empty({0}, x.options());
  at::Tensor mean = rms ? at::empty({0}, acc) : empty_output({rows}, acc);
  at::Tensor rstd = empty_output({rows}, acc);
  check_cuda_launch(fn, kernels::norm_forward(
                            dtype, kernel_dtype(fn, "weight", params), kernel_dtype(fn, "y", out_type),
                            kernel_dtype(fn, "residual", residual.has_value() ? sum_type : narrow.scalar_type()),
                            narrow.const_data_ptr(), wide.has_value() ? wide->const_data_ptr() : nullptr,
                            ptr_or_null(w), ptr_or_null(b), y.mutable_data_ptr(),
                            residual.has_value() ? h.mutable_data_ptr() : nullptr,
                            rms ? nullptr : mean.mutable_data_ptr(), rstd.mutable_data_ptr(), rows, n,
                            narrow.stride(0), wide.has_value() ? wide->stride(0) : 0, eps, rms,
                            at::cuda::getCurrentCUDAStream()));
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_rows_backward(
    const at::Tensor& dy, const std::optional<at::Tensor>& dsum, const at::Tensor& x,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
    bool has_bias, bool rms, std::optional<at::ScalarType> narrow_dtype) {
  const char* fn = "fastdl.layer_norm_backward (cuda)";
  check_rows(fn, "x", x, at::kCUDA);
  const int64_t rows = x.size(0), n = x.size(1);
  check_rows(fn, "dy", dy, at::kCUDA, rows, n);
  const auto dtype = kernel_dtype(fn, "x", x);
  TORCH_CHECK(dy.device() == x.device(), fn, ": dy must be on x's device");
  const bool dy_in_acc = norm_dy_in_stats_type(fn, dy, x);
  check_norm_narrow_type(fn, x.scalar_type(), narrow_dtype);
  if (dsum.has_value()) {
    check_rows(fn, "dsum", *dsum, at::kCUDA, rows, n);
    TORCH_CHECK(dsum->scalar_type() == x.scalar_type() && dsum->device() == x.device(), fn,
                ": dsum must match x's dtype and device");
  }
  const auto acc = stats_type(x.scalar_type());
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == rows && rstd.scalar_type() == acc && rstd.is_contiguous() &&
                  rstd.device() == x.device(),
              fn, ": rstd must be a contiguous (", rows, ") ", acc, " tensor on x's device");
  TORCH_CHECK(rms || (mean.has_value() && mean->dim() == 1 && mean->size(0) == rows && mean->scalar_type() == acc &&
                      mean->is_contiguous() && mean->device() == x.device()),
              fn, ": mean must be a contiguous (", rows, ") ", acc, " tensor on x's device for layer_norm");
  const c10::cuda::CUDAGuard guard(x.device());
  // dweight / dbias come out in the type the kernels read weight in: weight's dtype when it is
  // x's, else the accumulation type (the op's contract, csrc/bindings.cpp); with dy in the
  // accumulation type, that type (the kernels take dy in it only so)
  const at::ScalarType params = weight.has_value() && !dy_in_acc ? param_type(x, {&weight}) : acc;
  const at::Tensor w = param_as(weight, params, x, n, fn, "weight");
  const auto acc_opts = x.options().dtype(acc);
  at::Tensor dx = empty_output({rows, n}, x.options());
  // the 16-bit input's gradient of a 16-bit x and fp32 residual pair, written beside dx
  at::Tensor dx_narrow = narrow_dtype.has_value() ? empty_output({rows, n}, x.options().dtype(*narrow_dtype))
                                                  : at::empty({0}, x.options());
  const auto narrow = narrow_dtype.has_value() ? kernel_dtype(fn, "narrow_dtype", *narrow_dtype) : dtype;
  int64_t partial_rows = 1;
  check_cuda_launch(fn, kernels::norm_backward_partial_rows(dtype, narrow, rows, n, &partial_rows));
  // written whole by the kernels when there are rows (poisoned in tests), zeros otherwise
  auto param_grad = [&](bool wanted) {
    const auto opts = x.options().dtype(params);
    if (!wanted) return at::empty({0}, opts);
    return rows > 0 ? empty_output({n}, opts) : at::zeros({n}, opts);
  };
  at::Tensor dweight = param_grad(weight.has_value());
  at::Tensor dbias = param_grad(has_bias);
  at::Tensor dweight_partial = weight.has_value() ? at::empty({partial_rows, n}, acc_opts) : at::Tensor();
  at::Tensor dbias_partial = has_bias ? at::empty({partial_rows, n}, acc_opts) : at::Tensor();
  check_cuda_launch(fn, kernels::norm_backward(
                            dtype, kernel_dtype(fn, "weight", params), kernel_dtype(fn, "dy", dy), narrow,
                            dy.const_data_ptr(), dsum.has_value() ? dsum->const_data_ptr() : nullptr,
                            x.const_data_ptr(), ptr_or_null(w), rms ? nullptr : mean->const_data_ptr(),
                            rstd.const_data_ptr(), dx.mutable_data_ptr(),
                            narrow_dtype.has_value() ? dx_narrow.mutable_data_ptr() : nullptr,
                            mutable_or_null(dweight_partial), mutable_or_null(dbias_partial), partial_rows,
                            mutable_or_null(dweight), mutable_or_null(dbias), rows, n, dy.stride(0),
                            dsum.has_value() ? dsum->stride(0) : 0, x.stride(0), rms,
                            at::cuda::getCurrentCUDAStream()));
  return {dx, dweight, dbias, dx_narrow};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("layer_norm_rows_forward", &layer_norm_rows_forward);
  m.impl("layer_norm_rows_backward", &layer_norm_rows_backward);
}

}  // namespace fastdl
