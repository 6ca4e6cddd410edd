// The eager entries of the native backends (csrc/autograd/softmax.cpp, layer_norm.cpp):
// registered as torch.ops.fastdl.softmax_eager / layer_norm_eager, and called directly by
// fastdl._C's Python functions (csrc/python.cpp); softmax_backward_eager by those only.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastdl {

// softmax / log_softmax of x along dim (in [0, x.dim()), or 0 for a 0-d x), y in out_dtype
// (nullopt: x's), as softmax_rows_forward takes it
at::Tensor softmax_eager(const at::Tensor& x, int64_t dim, bool log,
                         std::optional<at::ScalarType> out_dtype = std::nullopt);

// the gradient of softmax / log_softmax's input along dim from its output out and grad_out
at::Tensor softmax_backward_eager(const at::Tensor& grad_out, const at::Tensor& out, int64_t dim, bool log);

// layer_norm / rms_norm of x (+ residual) over its last normalized_ndim dims -> (y, x + residual or empty);
// y in out_dtype (nullopt: x's), as layer_norm_rows_forward takes it
std::tuple<at::Tensor, at::Tensor> layer_norm_eager(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                    const std::optional<at::Tensor>& weight,
                                                    const std::optional<at::Tensor>& bias, int64_t normalized_ndim,
                                                    double eps, bool rms,
                                                    std::optional<at::ScalarType> out_dtype = std::nullopt);

}  // namespace fastdl
