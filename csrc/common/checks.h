// Input checks shared by the native ops, CPU and CUDA alike.
#pragma once
#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>

namespace fastdl {

// t is a 2-D (rows, cols) tensor on device_type whose last dim is contiguous.
inline void check_rows(const char* fn, const char* name, const at::Tensor& t, c10::DeviceType device_type) {
  TORCH_CHECK(t.device().type() == device_type, fn, ": ", name, " must be a ", c10::DeviceTypeName(device_type),
              " tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, fn, ": ", name, " must be 2-D (rows, cols), got ", t.dim(), "-D");
  TORCH_CHECK(t.numel() == 0 || t.size(1) <= 1 || t.stride(1) == 1, fn, ": ", name,
              " must have a contiguous last dim");
}

// ... and is exactly (rows, n).
inline void check_rows(const char* fn, const char* name, const at::Tensor& t, c10::DeviceType device_type,
                       int64_t rows, int64_t n) {
  check_rows(fn, name, t, device_type);
  TORCH_CHECK(t.size(0) == rows && t.size(1) == n, fn, ": ", name, " must be (", rows, ", ", n, "), got ", t.sizes());
}

// The floating dtypes the kernels take.
inline void check_float_dtype(const char* fn, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, fn, ": ",
              name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

// dtype of saved statistics and parameter gradients: float, double for double inputs.
inline at::ScalarType stats_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// An output dtype beside its input's that the kernels write in one pass: the same, or float32
// beside a float16 / bfloat16 input (the cast that torch.softmax(x, dtype=torch.float32) and
// CUDA autocast make before softmax and the norms, fused into the kernels; fastdl.ops._common's
// fuses_cast is the Python side of the rule).
inline bool fused_cast_dtypes(at::ScalarType input, at::ScalarType output) {
  return output == input || (output == at::kFloat && (input == at::kHalf || input == at::kBFloat16));
}

// softmax's output dtype from its input's and out_dtype (nullopt: the input's), checked.
inline at::ScalarType softmax_out_type(const char* fn, at::ScalarType x, std::optional<at::ScalarType> out_dtype) {
  const at::ScalarType out = out_dtype.value_or(x);
  TORCH_CHECK(fused_cast_dtypes(x, out), fn, ": out_dtype must be x's dtype (", x,
              ") or, for a Half / BFloat16 x, Float; got ", out);
  return out;
}

// softmax's backward: the gradient's dtype from out's and grad_in_dtype (nullopt: out's), checked.
inline at::ScalarType softmax_grad_in_type(const char* fn, at::ScalarType out,
                                           std::optional<at::ScalarType> grad_in_dtype) {
  const at::ScalarType grad_in = grad_in_dtype.value_or(out);
  TORCH_CHECK(fused_cast_dtypes(grad_in, out), fn, ": grad_in_dtype must be out's dtype (", out,
              ") or, for a Float out, Half / BFloat16; got ", grad_in);
  return grad_in;
}

// Whether a fused add-norm reads x and residual of these dtypes as they are: one dtype, or a
// 16-bit one beside an fp32 one, the sum then in fp32 as torch's add promotes (fastdl.ops'
// fuses_promotion; any other pair fastdl.ops casts first).
inline bool fused_sum_dtypes(at::ScalarType x, at::ScalarType residual) {
  return residual == x || fused_cast_dtypes(x, residual) || fused_cast_dtypes(residual, x);
}

// Of a fused add's pair of dtypes (fused_sum_dtypes), whether `other` is the wider one: Float
// beside a 16-bit `one`, the dtype the sum takes (false for one dtype). The norms read the
// 16-bit one of such a pair as it is, as "x" (the add commutes), and its gradient is the
// backward's narrow dx.
inline bool wider_of_pair(at::ScalarType one, at::ScalarType other) { return other != one && other == at::kFloat; }

// The dtype of a fused add's sum x + residual (fused_sum_dtypes), checked.
inline at::ScalarType norm_sum_type(const char* fn, at::ScalarType x, at::ScalarType residual) {
  if (residual == x) return x;
  TORCH_CHECK(fused_sum_dtypes(x, residual), fn, ": residual is ", residual, " but x is ", x,
              "; expected x's dtype, or Float beside a Half / BFloat16 one");
  return at::kFloat;
}

// The dtype a norm's y is written in (its out_dtype), given the dtype of the rows it
// normalises (x's, or the fused add's sum's: norm_sum_type): that one, or the statistics'
// dtype for 16-bit rows normalised into fp32 in one pass (fastdl.ops does so under CUDA
// autocast, which runs the norms in fp32). With a residual of x's dtype the sum stays in it,
// as torch's add gives it under autocast, and y is the fp32 norm of that sum.
inline at::ScalarType norm_out_type(const char* fn, at::ScalarType type, std::optional<at::ScalarType> out_dtype) {
  if (!out_dtype.has_value() || *out_dtype == type) return type;
  TORCH_CHECK(*out_dtype == stats_type(type), fn, ": out_dtype must be the dtype of the rows normalised (", type,
              ": x's, or x + residual's) or ", stats_type(type), ", got ", *out_dtype);
  return *out_dtype;
}

// The dtype a norm's backward also writes dx in (its narrow_dtype), beside rows of dtype x:
// none, or Half / BFloat16 beside Float rows (fused_cast_dtypes), the fp32 sum of a 16-bit x
// and an fp32 residual, whose 16-bit input's gradient is dx rounded to it.
inline void check_norm_narrow_type(const char* fn, at::ScalarType x, std::optional<at::ScalarType> narrow_dtype) {
  TORCH_CHECK(!narrow_dtype.has_value() || (*narrow_dtype != x && fused_cast_dtypes(*narrow_dtype, x)), fn,
              ": narrow_dtype must be Half or BFloat16 beside Float rows, got ", *narrow_dtype, " beside ", x);
}

// dy of a norm's backward is in x's dtype, or in the statistics' dtype (the gradient of an
// out_dtype forward's y); true for the latter.
inline bool norm_dy_in_stats_type(const char* fn, const at::Tensor& dy, const at::Tensor& x) {
  const at::ScalarType type = x.scalar_type();
  if (dy.scalar_type() == type) return false;
  TORCH_CHECK(dy.scalar_type() == stats_type(type), fn, ": dy is ", dy.scalar_type(), " but x is ", type,
              "; expected x's dtype or ", stats_type(type));
  return true;
}

// The norms' parameter dtype: x's when every parameter given has it (a 16-bit model's weight
// and bias, which the CUDA kernels read as they are), else the statistics' dtype. The
// backward ops write dweight / dbias in it (csrc/bindings.cpp), given the weight alone.
inline at::ScalarType param_type(const at::Tensor& x, std::initializer_list<const std::optional<at::Tensor>*> params) {
  for (const auto* p : params)
    if (p->has_value() && (*p)->scalar_type() != x.scalar_type()) return stats_type(x.scalar_type());
  return x.scalar_type();
}

}  // namespace fastdl
