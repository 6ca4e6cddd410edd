// softmax / log_softmax over the rows of a (rows, cols) matrix: CUDA launchers.
// Framework-free: raw pointers, sizes, strides (in elements) and a stream.
// The last dim is contiguous; outputs are written contiguous (row stride = cols).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/types.cuh"

namespace fastdl::kernels {

cudaError_t softmax_forward(DType dtype, const void* x, void* y, int64_t rows, int64_t cols, int64_t x_row_stride,
                            bool log, cudaStream_t stream);

// grad_in = d(loss)/dx from grad_out and the forward's output `out`.
cudaError_t softmax_backward(DType dtype, const void* grad_out, const void* out, void* grad_in, int64_t rows,
                             int64_t cols, int64_t grad_out_row_stride, int64_t out_row_stride, bool log,
                             cudaStream_t stream);

}  // namespace fastdl::kernels
