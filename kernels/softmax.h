// softmax / log_softmax over the rows of a (rows, cols) matrix: CUDA launchers.
// Framework-free: raw pointers, sizes, strides (in elements) and a stream.
// The last dim is contiguous; outputs are written contiguous (row stride = cols).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"

namespace fastdl::kernels {

// Workspace bytes that softmax_forward / softmax_backward want for a (rows, cols) input of
// `dtype` on the current device: nonzero when the rows are long and too few to fill the
// device with a block each, so that each row is split across blocks. The caller allocates
// them (8-byte aligned) and passes them in; given none or fewer, the launchers run one
// block a row instead (correct, slower). FASTDL_CUDA_SPLIT_PER_SM (blocks per SM the split
// aims for; 0: never split) is read here and by the launchers.
cudaError_t softmax_workspace_bytes(DType dtype, int64_t rows, int64_t cols, size_t* bytes);

cudaError_t softmax_forward(DType dtype, const void* x, void* y, int64_t rows, int64_t cols, int64_t x_row_stride,
                            bool log, void* workspace, size_t workspace_bytes, cudaStream_t stream);

// grad_in = d(loss)/dx from grad_out and the forward's output `out`.
cudaError_t softmax_backward(DType dtype, const void* grad_out, const void* out, void* grad_in, int64_t rows,
                             int64_t cols, int64_t grad_out_row_stride, int64_t out_row_stride, bool log,
                             void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace fastdl::kernels
