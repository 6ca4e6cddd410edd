// LayerNorm / RMSNorm over the rows of a (rows, cols) matrix, optionally fused with a
// residual add: CUDA launchers. Framework-free: raw pointers, sizes, strides (elements)
// and a stream. Inputs have a contiguous last dim; outputs are written contiguous.
// Statistics (mean, rstd) and the backward's partial buffers are in the accumulation type A:
// float, or double for double inputs. weight / bias, and the backward's dweight / dbias, are
// in param_dtype: x's own dtype or A's. y (forward) and dy (backward) are in out_dtype /
// dy_dtype: x's own, or A's when param_dtype is A's (a 16-bit x normalised into fp32, as
// CUDA autocast runs the norms, in one pass). The forward's residual and sum are in
// residual_dtype: x's own, or A's when y is (a 16-bit x beside an fp32 residual, the sum
// in fp32 as torch's add promotes). Anything else: cudaErrorInvalidValue. Absent operands
// are nullptr.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace fastdl::kernels {

// y = norm(x [+ residual]) * weight + bias; sum = x + residual when residual is given;
// mean (not for rms) and rstd per row.
cudaError_t norm_forward(DType dtype, DType param_dtype, DType out_dtype, DType residual_dtype, const void* x,
                         const void* residual, const void* weight, const void* bias, void* y, void* sum, void* mean,
                         void* rstd, int64_t rows, int64_t cols, int64_t x_row_stride, int64_t residual_row_stride,
                         double eps, bool rms, cudaStream_t stream);

// Rows of the partial buffers the backward's parameter-gradient reduction uses for a
// (rows, cols) input of `dtype` (and dx_narrow_dtype, as norm_backward's) on the current
// device: one per block of the backward, as many blocks as fill the device once. The caller
// allocates *partial_rows x cols of A for each of dweight_partial / dbias_partial and passes
// the same count to norm_backward.
cudaError_t norm_backward_partial_rows(DType dtype, DType dx_narrow_dtype, int64_t rows, int64_t cols,
                                       int64_t* partial_rows);

// dx (+ dsum, the gradient reaching x + residual from elsewhere); dweight / dbias
// (when non-null) reduced deterministically through the partial buffers. dx_narrow_dtype:
// `dtype` for dx alone, or fp16 / bf16 beside fp32 rows (parameters and dy in fp32): dx is
// then also written rounded to it into dx_narrow (contiguous), the gradient of the 16-bit
// one of a 16-bit x and an fp32 residual whose fp32 sum was normalised.
cudaError_t norm_backward(DType dtype, DType param_dtype, DType dy_dtype, DType dx_narrow_dtype, const void* dy,
                          const void* dsum, const void* x, const void* weight, const void* mean, const void* rstd,
                          void* dx, void* dx_narrow, void* dweight_partial, void* dbias_partial, int64_t partial_rows,
                          void* dweight, void* dbias, int64_t rows, int64_t cols, int64_t dy_row_stride,
                          int64_t dsum_row_stride, int64_t x_row_stride, bool rms, cudaStream_t stream);

}  // namespace fastdl::kernels
