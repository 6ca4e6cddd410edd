// Shared by the torch-facing CUDA host code in csrc/ops.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/dtype.h"

namespace fastdl {

inline kernels::DType kernel_dtype(const char* fn, const char* name, at::ScalarType type) {
  switch (type) {
    case at::kFloat: return kernels::DType::kFloat32;
    case at::kHalf: return kernels::DType::kFloat16;
    case at::kBFloat16: return kernels::DType::kBFloat16;
    case at::kDouble: return kernels::DType::kFloat64;
    default: TORCH_CHECK(false, fn, ": ", name, " must be float32, float16, bfloat16 or float64, got ", type);
  }
}

inline kernels::DType kernel_dtype(const char* fn, const char* name, const at::Tensor& t) {
  return kernel_dtype(fn, name, t.scalar_type());
}

// A tensor's data for a kernel argument that may be absent: nullptr when undefined or empty.
inline void* mutable_or_null(at::Tensor& t) { return t.defined() && t.numel() ? t.mutable_data_ptr() : nullptr; }

inline void check_cuda_launch(const char* fn, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, fn, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace fastdl
