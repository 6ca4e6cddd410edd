// softmax / log_softmax on CUDA tensors: checks, allocation and the launch of
// kernels/softmax.cu, registered as the CUDA implementation of the fastdl ops.
#include <torch/library.h>

#include "csrc/common/checks.h"
#include "csrc/common/outputs.h"
#include "csrc/ops/common.h"
#include "softmax.h"

namespace fastdl {
namespace {

// The workspace the kernels want to split few long rows across blocks (empty when none).
at::Tensor split_workspace(const char* fn, kernels::DType dtype, const at::Tensor& like) {
  size_t bytes = 0;
  check_cuda_launch(fn, kernels::softmax_workspace_bytes(dtype, like.size(0), like.size(1), &bytes));
  return bytes == 0 ? at::Tensor() : at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

size_t bytes_of(const at::Tensor& t) { return t.defined() ? t.nbytes() : 0; }

void check_softmax_rows(const char* fn, const char* name, const at::Tensor& t) {
  check_rows(fn, name, t, at::kCUDA);
  TORCH_CHECK(t.size(0) <= INT_MAX && t.size(1) <= INT_MAX, fn, ": ", name, " of shape ", t.sizes(),
              " is too large (rows and cols must each be below 2^31)");
}

at::Tensor softmax_rows_forward(const at::Tensor& x, bool log, std::optional<at::ScalarType> out_dtype) {
  const char* fn = "fastdl.softmax (cuda)";
  check_softmax_rows(fn, "x", x);
  const auto dtype = kernel_dtype(fn, "x", x);
  // fp32 from a 16-bit x in one pass: 2 + 4 bytes a value, where a cast then the softmax move 2 + 4 + 4 + 4
  const at::ScalarType out_type = softmax_out_type(fn, x.scalar_type(), out_dtype);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = empty_output(x.sizes(), x.options().dtype(out_type));
  at::Tensor workspace = split_workspace(fn, dtype, x);
  check_cuda_launch(fn, kernels::softmax_forward(dtype, kernel_dtype(fn, "out_dtype", out_type), x.const_data_ptr(),
                                                 y.mutable_data_ptr(), x.size(0), x.size(1), x.stride(0), log,
                                                 mutable_or_null(workspace), bytes_of(workspace),
                                                 at::cuda::getCurrentCUDAStream()));
  return y;
}

at::Tensor softmax_rows_backward(const at::Tensor& grad_out, const at::Tensor& out, bool log,
                                 std::optional<at::ScalarType> grad_in_dtype) {
  const char* fn = "fastdl.softmax_backward (cuda)";
  check_softmax_rows(fn, "grad_out", grad_out);
  check_softmax_rows(fn, "out", out);
  TORCH_CHECK(grad_out.device() == out.device(), fn, ": grad_out is on ", grad_out.device(), " but out is on ",
              out.device());
  TORCH_CHECK(grad_out.sizes() == out.sizes(), fn, ": grad_out of shape ", grad_out.sizes(),
              " does not match out of shape ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == out.scalar_type(), fn, ": grad_out is ", grad_out.scalar_type(),
              " but out is ", out.scalar_type());
  const auto dtype = kernel_dtype(fn, "out", out);
  const at::ScalarType grad_in_type = softmax_grad_in_type(fn, out.scalar_type(), grad_in_dtype);
  const auto grad_in_kernel_dtype = kernel_dtype(fn, "grad_in_dtype", grad_in_type);
  const c10::cuda::CUDAGuard guard(out.device());
  at::Tensor grad_in = empty_output(out.sizes(), out.options().dtype(grad_in_type));
  at::Tensor workspace = split_workspace(fn, grad_in_kernel_dtype, out);  // sized for dx's dtype
  check_cuda_launch(fn, kernels::softmax_backward(dtype, grad_in_kernel_dtype, grad_out.const_data_ptr(),
                                                  out.const_data_ptr(), grad_in.mutable_data_ptr(), out.size(0),
                                                  out.size(1), grad_out.stride(0), out.stride(0), log,
                                                  mutable_or_null(workspace), bytes_of(workspace),
                                                  at::cuda::getCurrentCUDAStream()));
  return grad_in;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CUDA, m) {
  m.impl("softmax_rows_forward", &softmax_rows_forward);
  m.impl("softmax_rows_backward", &softmax_rows_backward);
}

}  // namespace fastdl
