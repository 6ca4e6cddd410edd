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

// y in out_dtype: x's dtype, or float32 for a float16 / bfloat16 x (its softmax written in
// fp32 in one pass, as torch.softmax(x, dtype=torch.float32) and CUDA autocast compute it);
// any other: cudaErrorInvalidValue. The workspace is sized for x's dtype.
cudaError_t softmax_forward(DType dtype, DType out_dtype, const void* x, void* y, int64_t rows, int64_t cols,
                            int64_t x_row_stride, bool log, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream);

// grad_in = d(loss)/dx from grad_out and the forward's output `out`, both of `dtype`;
// grad_in in grad_in_dtype: dtype, or the float16 / bfloat16 x of a forward that wrote fp32
// (then dtype is float32, and the workspace is sized for grad_in_dtype).
cudaError_t softmax_backward(DType dtype, DType grad_in_dtype, const void* grad_out, const void* out,
                             void* grad_in, int64_t rows, int64_t cols, int64_t grad_out_row_stride,
                             int64_t out_row_stride, bool log, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream);

}  // namespace fastdl::kernels
