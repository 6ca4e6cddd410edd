// LayerNorm / RMSNorm over rows on the CPU, optionally fused with a residual add:
// forward and backward (see fastdl/reference/layer_norm.py for the math).
//
// Forward: rows split over threads; per row a mean pass (LayerNorm), a variance pass
// over deviations (not sum of squares minus square of sums, which cancels in float) that
// also sums them to correct the mean (corrected_variance), and a normalise-and-write pass,
// all vectorised. With a residual the sum is written
// first and the passes read it back from L1/L2.
// Backward: dweight / dbias are reduced in two deterministic stages: the rows are cut
// into a number of chunks that depends on the row count only, each chunk sums its rows
// into one partial row, then the partial rows are summed in order. Same inputs, same
// bits, whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "csrc/common/checks.h"
#include "csrc/common/outputs.h"
#include "csrc/cpu/avx2.h"
#include "csrc/cpu/common.h"
#include "csrc/cpu/half_rows.h"

namespace fastdl::cpu {
namespace {

constexpr int64_t kMaxChunks = 256;  // partial rows of the dweight / dbias reduction (a power of two)

// The corrected two-pass algorithm (Chan, Golub & LeVeque 1983), as the CUDA and Triton row
// kernels (kernels/layer_norm.cu corrected_variance says more): from the deviations of n values
// from their first-found mean, their sum `dev` and sum of squares `sq`, the variance; `mean`
// corrected by `shift` = dev / n, what each deviation is then off, where that is more than the
// sum's own error (kShiftFloor2). A constant row's mean comes out exact and its norm 0, where the
// sum / n alone left it up to 5.8e-4 off (fp32 rows of 3.7, 4096 wide).
template <typename A> constexpr A kShiftFloor2 = std::is_same_v<A, double> ? 0x1p-98 : 0x1p-40f;  // (8 eps)^2

template <typename A> FASTDL_INLINE A corrected_variance(A sq, A dev, int64_t n, A& mean, A& shift) {
  shift = dev / static_cast<A>(n);
  const A sq_mean = sq / static_cast<A>(n);
  if (!(shift * shift > kShiftFloor2<A> * sq_mean)) shift = A(0);  // (NaN: the row's NaN anyway)
  mean += shift;
  const A var = sq_mean - shift * shift;
  return var < A(0) ? A(0) : var;  // rounding may leave it a hair below 0 (NaN stays NaN)
}

template <typename T, typename A>
FASTDL_INLINE void norm_row_forward(const T* __restrict x, const T* __restrict residual, T* __restrict h,
                                    const A* __restrict weight, const A* __restrict bias, T* __restrict y,
                                    int64_t n, A eps, bool rms, A* mean_out, A* rstd_out) {
  const T* src = x;
  A sum = 0;
  if (residual != nullptr) {
    // write the sum and add it up in the same pass; the sum as stored (rounded to T), as
    // the unfused add would give it
    sum = sum_lanes<A>(n, [&](int64_t j) FASTDL_LAMBDA_INLINE {
      const A v = round_acc<T>(load_acc<A>(x, j) + load_acc<A>(residual, j));
      store_acc(h, j, v);
      return v;
    });
    src = h;
  } else if (!rms) {
    sum = sum_lanes<A>(n, [&](int64_t j) FASTDL_LAMBDA_INLINE { return load_acc<A>(src, j); });
  }
  const A first_mean = rms ? A(0) : sum / static_cast<A>(n);
  A mean = first_mean, shift = 0, var;
  if (rms) {
    var = sum_lanes<A>(n, [&](int64_t j) FASTDL_LAMBDA_INLINE {
      const A v = load_acc<A>(src, j);
      return v * v;
    }) / static_cast<A>(n);
  } else {
    A sq, dev;
    sum_lanes2<A>(n, [&](int64_t j, A& d2, A& d) FASTDL_LAMBDA_INLINE {
      d = load_acc<A>(src, j) - first_mean;
      d2 = d * d;
    }, sq, dev);
    var = corrected_variance(sq, dev, n, mean, shift);
  }
  const A rstd = A(1) / std::sqrt(var + eps);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j)
    store_acc(y, j, (load_acc<A>(src, j) - first_mean - shift) * rstd * weight[j] + bias[j]);
  if (mean_out != nullptr) *mean_out = mean;
  *rstd_out = rstd;
}

#ifdef FASTDL_AVX2_KERNELS
// norm_row_forward for an fp16 row on an AVX2 CPU (csrc/cpu/avx2.h), converting 8 values
// as it loads or stores them, where the generic loops take fp16 rows through float
// buffers. norm_row_forward's math; the sums in sum_row8's order. (bf16 rows through these
// kernels, rounded in ~9 integer ops per 8 values, were no faster than the generic loops'
// AVX-512 clone: 4096 x 1024, 2 threads, dev VM's EPYC, forward 0.67 against 0.59-0.62 ms,
// backward 0.97 against 0.89-1.05.)
FASTDL_AVX2 void half_row_forward_avx2(const c10::Half* __restrict x, const c10::Half* __restrict residual,
                                       c10::Half* __restrict h, const float* __restrict weight,
                                       const float* __restrict bias, c10::Half* __restrict y, int64_t n, float eps,
                                       bool rms, float* mean_out, float* rstd_out) {
  const c10::Half* src = residual != nullptr ? h : x;
  float sum[1] = {0.0f};
  if (residual != nullptr) {
    // write the sum and add it up in the same pass; the sum as stored (rounded to fp16), as
    // the unfused add would give it. Past the row, x and residual load as 0 and add 0.
    sum_row8(n, [&](int64_t at, int64_t end, __m256 (&acc)[1]) FASTDL_AVX2_LAMBDA {
      const __m256 v = half_round8(_mm256_add_ps(load_cols8(x, at, end), load_cols8(residual, at, end)));
      store_cols8(h, at, end, v);
      acc[0] = _mm256_add_ps(acc[0], v);
    }, sum);
  } else if (!rms) {
    sum_row8(n, [&](int64_t at, int64_t end, __m256 (&acc)[1]) FASTDL_AVX2_LAMBDA {
      acc[0] = _mm256_add_ps(acc[0], load_cols8(x, at, end));
    }, sum);
  }
  const float first_mean = rms ? 0.0f : sum[0] / static_cast<float>(n);
  const __m256 mean_v = _mm256_set1_ps(first_mean);
  float sums[2];  // squared deviations, deviations (corrected_variance)
  sum_row8(n, [&](int64_t at, int64_t end, __m256 (&acc)[2]) FASTDL_AVX2_LAMBDA {
    __m256 d = _mm256_sub_ps(load_cols8(src, at, end), mean_v);
    if (end - at < 8) d = _mm256_and_ps(d, first_lanes8(end - at));  // past the row: 0, not -mean
    acc[0] = _mm256_fmadd_ps(d, d, acc[0]);
    acc[1] = _mm256_add_ps(d, acc[1]);
  }, sums);
  float mean = first_mean, shift = 0.0f;
  const float var = rms ? sums[0] / static_cast<float>(n) : corrected_variance(sums[0], sums[1], n, mean, shift);
  const float rstd = 1.0f / std::sqrt(var + eps);
  const __m256 rstd_v = _mm256_set1_ps(rstd), shift_v = _mm256_set1_ps(shift);
  for_cols8(n, [&](int64_t at, int64_t end) FASTDL_AVX2_LAMBDA {
    const __m256 d = _mm256_sub_ps(load_cols8(src, at, end), mean_v);
    const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(d, shift_v), rstd_v);
    store_cols8(y, at, end, _mm256_fmadd_ps(xhat, load_cols8(weight, at, end), load_cols8(bias, at, end)));
  });
  if (mean_out != nullptr) *mean_out = mean;
  *rstd_out = rstd;
}
#endif

template <typename T>
FASTDL_MULTIVERSION void norm_forward_rows(const T* x, int64_t x_stride, const T* residual, int64_t residual_stride,
                                           T* h, const typename Acc<T>::type* weight,
                                           const typename Acc<T>::type* bias, T* y, typename Acc<T>::type* mean,
                                           typename Acc<T>::type* rstd, int64_t begin, int64_t end, int64_t n,
                                           typename Acc<T>::type eps, bool rms) {
  if constexpr (std::is_same_v<T, c10::Half>) {
#ifdef FASTDL_AVX2_KERNELS
    if (cpu_has_avx2()) {
      for (int64_t r = begin; r < end; ++r)
        half_row_forward_avx2(x + r * x_stride, residual ? residual + r * residual_stride : nullptr,
                              h ? h + r * n : nullptr, weight, bias, y + r * n, n, eps, rms, mean ? mean + r : nullptr,
                              rstd + r);
      return;
    }
#endif
    // through float buffers (csrc/cpu/half_rows.h); the sum is rounded
    // to T before the norm reads it back, as the unfused add would give it
    FloatRows buf(2, n);
    for (int64_t r = begin; r < end; ++r) {
      if (residual != nullptr) half_rows_add(x + r * x_stride, residual + r * residual_stride, h + r * n, buf[0], n);
      else row_to_float(x + r * x_stride, buf[0], n);
      norm_row_forward<float>(buf[0], nullptr, nullptr, weight, bias, buf[1], n, eps, rms,
                              mean ? mean + r : nullptr, rstd + r);
      row_from_float(buf[1], y + r * n, n);
    }
  } else {
    for (int64_t r = begin; r < end; ++r)
      norm_row_forward<T>(x + r * x_stride, residual ? residual + r * residual_stride : nullptr,
                          h ? h + r * n : nullptr, weight, bias, y + r * n, n, eps, rms, mean ? mean + r : nullptr,
                          rstd + r);
  }
}

// y in fp32 from 16-bit rows, the cast fused (CUDA autocast's norms, or an out_dtype): each
// row converted into an L1 buffer as it is read, then normalised by the float kernel. With
// a residual of x's dtype the sum is stored in it (rounded as torch's add stores it) and
// normalised from the buffer; beside an fp32 residual the sum is fp32, as torch's add
// promotes, and the float kernel adds it. One pass over the rows where the unfused ops
// (the cast or the promoting add, then the norm) write and read back an fp32 copy.
template <typename T, typename R>
FASTDL_MULTIVERSION void norm_forward_rows_to_float(const T* x, int64_t x_stride, const R* residual,
                                                    int64_t residual_stride, R* h, const float* weight,
                                                    const float* bias, float* y, float* mean, float* rstd,
                                                    int64_t begin, int64_t end, int64_t n, float eps, bool rms) {
  FloatRows buf(1, n);
  for (int64_t r = begin; r < end; ++r) {
    const T* x_row = x + r * x_stride;
    float* mean_row = mean ? mean + r : nullptr;
    if constexpr (std::is_same_v<R, T>) {  // the sum in x's dtype, normalised from the buffer
      if (residual != nullptr) rows_add_to_float(x_row, residual + r * residual_stride, h + r * n, buf[0], n);
      else row_to_float(x_row, buf[0], n);
      norm_row_forward<float>(buf[0], nullptr, nullptr, weight, bias, y + r * n, n, eps, rms, mean_row, rstd + r);
    } else {  // beside an fp32 residual: x's row in fp32, added to it by the float kernel
      row_to_float(x_row, buf[0], n);
      norm_row_forward<float>(buf[0], residual + r * residual_stride, h + r * n, weight, bias, y + r * n, n, eps,
                              rms, mean_row, rstd + r);
    }
  }
}

// dx for one row; adds this row's dy * xhat and dy to the chunk's partial rows. The
// optional operands are template flags, so the vector loop has no branches.
template <typename T, typename A, bool kDsum, bool kDweight, bool kDbias>
FASTDL_INLINE void norm_row_backward(const T* __restrict dy, const T* __restrict dsum, const T* __restrict x,
                                     const A* __restrict weight, A mean, A rstd, T* __restrict dx,
                                     A* __restrict dweight_partial, A* __restrict dbias_partial, int64_t n, bool rms) {
  // sum(g * xhat) and sum(g) with g = dy * weight, in one pass (sum_lanes2, csrc/cpu/common.h)
  A sum_gx, sum_g;
  sum_lanes2<A>(
      n,
      [&](int64_t j, A& gx, A& g) FASTDL_LAMBDA_INLINE {
        g = load_acc<A>(dy, j) * weight[j];
        gx = g * ((load_acc<A>(x, j) - mean) * rstd);
      },
      sum_gx, sum_g);
  const A c1 = sum_gx / static_cast<A>(n);
  const A c2 = rms ? A(0) : sum_g / static_cast<A>(n);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const A xhat = (load_acc<A>(x, j) - mean) * rstd;
    const A d = load_acc<A>(dy, j);
    A v = (d * weight[j] - c2 - xhat * c1) * rstd;
    if constexpr (kDsum) v += load_acc<A>(dsum, j);
    store_acc(dx, j, v);
    if constexpr (kDweight) dweight_partial[j] += d * xhat;
    if constexpr (kDbias) dbias_partial[j] += d;
  }
}

#ifdef FASTDL_AVX2_KERNELS
// norm_row_backward for an fp16 row on an AVX2 CPU (csrc/cpu/avx2.h): each load converts
// 8 values inside the loop that uses them, as bf16 rows are converted, so the loads overlap
// the math (4096 x 1024, 2-core VM, AMD EPYC: 1.66-1.81 -> 0.6-0.9 ms, aten 1.19-1.29; one
// thread 3.9 -> 1.63-1.76 ms, aten 2.34-2.4). norm_row_backward's math; the sums in
// sum_row8's order.
template <bool kDsum, bool kDweight, bool kDbias>
FASTDL_AVX2 void half_row_backward_avx2(const c10::Half* __restrict dy, const c10::Half* __restrict dsum,
                                        const c10::Half* __restrict x, const float* __restrict weight, float mean,
                                        float rstd, c10::Half* __restrict dx, float* __restrict dweight_partial,
                                        float* __restrict dbias_partial, int64_t n, bool rms) {
  const __m256 mean_v = _mm256_set1_ps(mean), rstd_v = _mm256_set1_ps(rstd);
  // sum(g * xhat) and sum(g) with g = dy * weight; past the row, dy and weight load as 0: g = 0 adds 0
  float sums[2];
  sum_row8(n, [&](int64_t at, int64_t end, __m256 (&acc)[2]) FASTDL_AVX2_LAMBDA {
    const __m256 g = _mm256_mul_ps(load_cols8(dy, at, end), load_cols8(weight, at, end));
    const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(load_cols8(x, at, end), mean_v), rstd_v);
    acc[0] = _mm256_fmadd_ps(g, xhat, acc[0]);
    acc[1] = _mm256_add_ps(acc[1], g);
  }, sums);
  const __m256 c1 = _mm256_set1_ps(sums[0] / static_cast<float>(n));
  const __m256 c2 = _mm256_set1_ps(rms ? 0.0f : sums[1] / static_cast<float>(n));
  for_cols8(n, [&](int64_t at, int64_t end) FASTDL_AVX2_LAMBDA {
    const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(load_cols8(x, at, end), mean_v), rstd_v);
    const __m256 d = load_cols8(dy, at, end);
    // (d * weight - c2 - xhat * c1) * rstd
    __m256 v = _mm256_fmsub_ps(d, load_cols8(weight, at, end), c2);
    v = _mm256_mul_ps(_mm256_fnmadd_ps(xhat, c1, v), rstd_v);
    if constexpr (kDsum) v = _mm256_add_ps(v, load_cols8(dsum, at, end));
    store_cols8(dx, at, end, v);
    if constexpr (kDweight)
      store_cols8(dweight_partial, at, end, _mm256_fmadd_ps(d, xhat, load_cols8(dweight_partial, at, end)));
    if constexpr (kDbias)
      store_cols8(dbias_partial, at, end, _mm256_add_ps(load_cols8(dbias_partial, at, end), d));
  });
}
#endif

template <typename T, bool kDsum, bool kDweight, bool kDbias>
FASTDL_MULTIVERSION void norm_backward_rows(const T* dy, int64_t dy_stride, const T* dsum, int64_t dsum_stride,
                                            const T* x, int64_t x_stride, const typename Acc<T>::type* weight,
                                            const typename Acc<T>::type* mean, const typename Acc<T>::type* rstd,
                                            T* dx, typename Acc<T>::type* dweight_partial,
                                            typename Acc<T>::type* dbias_partial, int64_t begin, int64_t end,
                                            int64_t n, bool rms) {
  if constexpr (std::is_same_v<T, c10::Half>) {
#ifdef FASTDL_AVX2_KERNELS
    if (cpu_has_avx2()) {
      for (int64_t r = begin; r < end; ++r)
        half_row_backward_avx2<kDsum, kDweight, kDbias>(dy + r * dy_stride, dsum + r * dsum_stride, x + r * x_stride,
                                                        weight, mean ? mean[r] : 0.0f, rstd[r], dx + r * n,
                                                        dweight_partial, dbias_partial, n, rms);
      return;
    }
#endif
    // through float buffers (csrc/cpu/half_rows.h)
    FloatRows buf(4, n);
    for (int64_t r = begin; r < end; ++r) {
      row_to_float(dy + r * dy_stride, buf[0], n);
      row_to_float(x + r * x_stride, buf[1], n);
      if constexpr (kDsum) row_to_float(dsum + r * dsum_stride, buf[2], n);
      norm_row_backward<float, float, kDsum, kDweight, kDbias>(buf[0], buf[2], buf[1], weight, mean ? mean[r] : 0.0f,
                                                               rstd[r], buf[3], dweight_partial, dbias_partial, n,
                                                               rms);
      row_from_float(buf[3], dx + r * n, n);
    }
  } else {
    for (int64_t r = begin; r < end; ++r)
      norm_row_backward<T, typename Acc<T>::type, kDsum, kDweight, kDbias>(
          dy + r * dy_stride, dsum + r * dsum_stride, x + r * x_stride, weight,
          mean ? mean[r] : typename Acc<T>::type(0), rstd[r], dx + r * n, dweight_partial, dbias_partial, n, rms);
  }
}

// dx of 16-bit rows whose y was written in fp32 (norm_forward_rows_to_float): dy read as it
// is, x (the rows normalised) and dsum converted into L1 buffers, dx rounded into x's dtype.
// One pass, where casting x and dsum to fp32 and dx back writes and reads three fp32 copies.
template <typename T, bool kDsum, bool kDweight, bool kDbias>
FASTDL_MULTIVERSION void norm_backward_rows_from_float(const float* dy, int64_t dy_stride, const T* dsum,
                                                       int64_t dsum_stride, const T* x, int64_t x_stride,
                                                       const float* weight, const float* mean, const float* rstd,
                                                       T* dx, float* dweight_partial, float* dbias_partial,
                                                       int64_t begin, int64_t end, int64_t n, bool rms) {
  FloatRows buf(3, n);
  for (int64_t r = begin; r < end; ++r) {
    row_to_float(x + r * x_stride, buf[0], n);
    if constexpr (kDsum) row_to_float(dsum + r * dsum_stride, buf[1], n);
    norm_row_backward<float, float, kDsum, kDweight, kDbias>(dy + r * dy_stride, buf[1], buf[0], weight,
                                                             mean ? mean[r] : 0.0f, rstd[r], buf[2], dweight_partial,
                                                             dbias_partial, n, rms);
    row_from_float(buf[2], dx + r * n, n);
  }
}

// dx of fp32 rows, the fp32 sum of a 16-bit x and an fp32 residual (norm_forward_rows_to_float),
// also rounded to x's dtype N as each row is written, while it is in L1: the 16-bit input's
// gradient in the same pass, where autograd's cast of the fp32 dx would read it back.
template <typename N, bool kDsum, bool kDweight, bool kDbias>
FASTDL_MULTIVERSION void norm_backward_rows_to_narrow(const float* dy, int64_t dy_stride, const float* dsum,
                                                      int64_t dsum_stride, const float* x, int64_t x_stride,
                                                      const float* weight, const float* mean, const float* rstd,
                                                      float* dx, N* dx_narrow, float* dweight_partial,
                                                      float* dbias_partial, int64_t begin, int64_t end, int64_t n,
                                                      bool rms) {
  for (int64_t r = begin; r < end; ++r) {
    norm_row_backward<float, float, kDsum, kDweight, kDbias>(dy + r * dy_stride, dsum + r * dsum_stride,
                                                             x + r * x_stride, weight, mean ? mean[r] : 0.0f, rstd[r],
                                                             dx + r * n, dweight_partial, dbias_partial, n, rms);
    row_from_float(dx + r * n, dx_narrow + r * n, n);
  }
}

// fn(kDsum, kDweight, kDbias) with the backward's three flags picked at run time, each passed
// as a std::bool_constant (its ::value a template argument)
template <typename Fn> void with_backward_flags(bool has_dsum, bool has_dweight, bool has_dbias, Fn fn) {
  const auto bias = [&](auto dsum, auto dweight) {
    has_dbias ? fn(dsum, dweight, std::true_type{}) : fn(dsum, dweight, std::false_type{});
  };
  const auto weight = [&](auto dsum) { has_dweight ? bias(dsum, std::true_type{}) : bias(dsum, std::false_type{}); };
  has_dsum ? weight(std::true_type{}) : weight(std::false_type{});
}

// out[j] = sum over c of partial[c][j], in order of c: the same bits for any thread count.
template <typename A> void sum_partial_rows(const A* partial, A* out, int64_t chunks, int64_t n) {
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) out[j] = 0;
    for (int64_t c = 0; c < chunks; ++c) {
#pragma omp simd
      for (int64_t j = begin; j < end; ++j) out[j] += partial[c * n + j];
    }
  });
}

// weight / bias of any float dtype, as a contiguous vector of the accumulation type;
// absent ones become ones / zeros, so the kernels have one loop for every case.
at::Tensor param_or(const std::optional<at::Tensor>& p, int64_t n, at::ScalarType acc, double fill, const char* fn,
                    const char* name) {
  if (!p.has_value()) return at::full({n}, fill, at::TensorOptions().dtype(acc));
  TORCH_CHECK(p->device().is_cpu(), fn, ": ", name, " must be a CPU tensor, got ", p->device());
  TORCH_CHECK(p->dim() == 1 && p->size(0) == n, fn, ": ", name, " must have shape (", n, "), got ", p->sizes());
  check_float_dtype(fn, name, *p);
  return p->to(acc).contiguous();
}

// layer_norm_rows_forward of 16-bit rows into an fp32 y (norm_forward_rows_to_float): x alone,
// x + residual of x's dtype (the sum in it), or a 16-bit one beside an fp32 one (the sum fp32;
// the add commutes, so the 16-bit one is read as "x"). The caller has checked the shapes.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_forward_to_float(
    const char* fn, const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps, bool rms) {
  const bool swap = residual.has_value() && wider_of_pair(residual->scalar_type(), x.scalar_type());
  const at::Tensor& narrow = swap ? *residual : x;
  const std::optional<at::Tensor>& other = swap ? std::optional<at::Tensor>(x) : residual;
  const int64_t rows = x.size(0), n = x.size(1);
  const at::Tensor w = param_or(weight, n, at::kFloat, 1.0, fn, "weight");
  const at::Tensor b = param_or(bias, n, at::kFloat, 0.0, fn, "bias");
  const auto fp32 = x.options().dtype(at::kFloat);
  at::Tensor y = empty_output({rows, n}, fp32);
  at::Tensor h = other.has_value() ? empty_output({rows, n}, other->options()) : at::empty({0}, x.options());
  at::Tensor mean = rms ? at::empty({0}, fp32) : empty_output({rows}, fp32);
  at::Tensor rstd = empty_output({rows}, fp32);
  if (rows == 0 || n == 0) return {y, h, mean, rstd};
  AT_DISPATCH_REDUCED_FLOATING_TYPES(narrow.scalar_type(), "fastdl_norm_forward_to_float_cpu", [&] {
    const auto run = [&](auto* residual_type) {
      using R = std::remove_pointer_t<decltype(residual_type)>;
      const R* rp = other.has_value() ? other->const_data_ptr<R>() : nullptr;
      R* hp = other.has_value() ? h.mutable_data_ptr<R>() : nullptr;
      at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
        norm_forward_rows_to_float<scalar_t, R>(
            narrow.const_data_ptr<scalar_t>(), narrow.stride(0), rp, other.has_value() ? other->stride(0) : 0, hp,
            w.const_data_ptr<float>(), b.const_data_ptr<float>(), y.mutable_data_ptr<float>(),
            rms ? nullptr : mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), begin, end, n,
            static_cast<float>(eps), rms);
      });
    };
    if (other.has_value() && other->scalar_type() == at::kFloat) run(static_cast<float*>(nullptr));
    else run(static_cast<scalar_t*>(nullptr));
  });
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_rows_forward(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool rms, std::optional<at::ScalarType> out_dtype) {
  const char* fn = "fastdl.layer_norm (cpu)";
  check_rows(fn, "x", x, at::kCPU);
  const int64_t rows = x.size(0), n = x.size(1);
  check_float_dtype(fn, "x", x);
  at::ScalarType sum_type = x.scalar_type();
  if (residual.has_value()) {
    check_rows(fn, "residual", *residual, at::kCPU, rows, n);
    sum_type = norm_sum_type(fn, x.scalar_type(), residual->scalar_type());
  }
  // y in fp32 from 16-bit rows (CUDA autocast's norms; CPU autocast leaves the norms in x's
  // dtype, so on the CPU it is the op's contract), or a 16-bit x beside an fp32 residual (a
  // bf16 sublayer output beside an fp32 residual stream under autocast): in one pass
  const at::ScalarType out_type = norm_out_type(fn, sum_type, out_dtype);
  if (out_type != x.scalar_type() || (residual.has_value() && residual->scalar_type() != x.scalar_type())) {
    return norm_forward_to_float(fn, x, residual, weight, bias, eps, rms);
  }
  const auto acc = stats_type(x.scalar_type());
  const at::Tensor w = param_or(weight, n, acc, 1.0, fn, "weight");
  const at::Tensor b = param_or(bias, n, acc, 0.0, fn, "bias");
  at::Tensor y = empty_output({rows, n}, x.options());
  at::Tensor h = residual.has_value() ? empty_output({rows, n}, x.options()) : at::empty({0}, x.options());
  at::Tensor mean = rms ? at::empty({0}, x.options().dtype(acc)) : empty_output({rows}, x.options().dtype(acc));
  at::Tensor rstd = empty_output({rows}, x.options().dtype(acc));
  if (rows == 0 || n == 0) return {y, h, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastdl_norm_forward_cpu", [&] {
    using A = typename Acc<scalar_t>::type;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    const int64_t r_stride = residual.has_value() ? residual->stride(0) : 0;
    scalar_t* hp = residual.has_value() ? h.mutable_data_ptr<scalar_t>() : nullptr;
    A* mp = rms ? nullptr : mean.mutable_data_ptr<A>();
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
      norm_forward_rows<scalar_t>(xp, x.stride(0), rp, r_stride, hp, w.const_data_ptr<A>(), b.const_data_ptr<A>(),
                                  y.mutable_data_ptr<scalar_t>(), mp, rstd.mutable_data_ptr<A>(), begin, end, n,
                                  static_cast<A>(eps), rms);
    });
  });
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_rows_backward(
    const at::Tensor& dy, const std::optional<at::Tensor>& dsum, const at::Tensor& x,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
    bool has_bias, bool rms, std::optional<at::ScalarType> narrow_dtype) {
  const char* fn = "fastdl.layer_norm_backward (cpu)";
  check_rows(fn, "x", x, at::kCPU);
  const int64_t rows = x.size(0), n = x.size(1);
  check_rows(fn, "dy", dy, at::kCPU, rows, n);
  check_float_dtype(fn, "x", x);
  // dy in fp32 beside 16-bit x: the gradient of an fp32 y (norm_forward_rows_to_float)
  const bool dy_in_acc = norm_dy_in_stats_type(fn, dy, x);
  check_norm_narrow_type(fn, x.scalar_type(), narrow_dtype);
  if (dsum.has_value()) {
    check_rows(fn, "dsum", *dsum, at::kCPU, rows, n);
    TORCH_CHECK(dsum->scalar_type() == x.scalar_type(), fn, ": dsum is ", dsum->scalar_type(), " but x is ",
                x.scalar_type());
  }
  const auto acc = stats_type(x.scalar_type());
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == rows && rstd.scalar_type() == acc && rstd.is_contiguous(), fn,
              ": rstd must be a contiguous (", rows, ") ", acc, " tensor, got ", rstd.sizes(), " ", rstd.scalar_type());
  TORCH_CHECK(rms || (mean.has_value() && mean->dim() == 1 && mean->size(0) == rows && mean->scalar_type() == acc &&
                      mean->is_contiguous()),
              fn, ": mean must be a contiguous (", rows, ") ", acc, " tensor for layer_norm");
  const at::Tensor w = param_or(weight, n, acc, 1.0, fn, "weight");
  at::Tensor dx = empty_output({rows, n}, x.options());
  // the 16-bit input's gradient of a 16-bit x and fp32 residual pair, written beside dx
  at::Tensor dx_narrow = narrow_dtype.has_value() ? empty_output({rows, n}, x.options().dtype(*narrow_dtype))
                                                  : at::empty({0}, x.options());
  // stage 1 buffers: one partial row per chunk of rows. A chunk holds about a task's worth
  // of work (grain_rows) and there are at most kMaxChunks: small inputs get few partial rows
  // to zero and sum, not one per row. Their count is a power of two, the rows spread evenly
  // (chunk c: rows [c * rows / chunks, (c + 1) * rows / chunks)), so at::parallel_for hands
  // 2, 4 or 8 threads equal work: 256 rows of 768 in 7 chunks of 42 gave one of two threads
  // 168 rows, the other 88. The chunking depends on the shape only, never on the thread
  // count, so the sums are the same bits on any machine.
  const int64_t wanted = std::min(kMaxChunks, (rows + grain_rows(n) - 1) / grain_rows(n));
  int64_t chunks = 1;
  while (chunks < wanted) chunks *= 2;
  chunks = std::min(chunks, std::max<int64_t>(rows, 1));
  // one chunk (small inputs): its partial row is the sum itself, so it is allocated as one
  const auto partial_shape = chunks == 1 ? std::vector<int64_t>{n} : std::vector<int64_t>{chunks, n};
  at::Tensor dweight_partial = weight.has_value() ? at::zeros(partial_shape, x.options().dtype(acc)) : at::Tensor();
  at::Tensor dbias_partial = has_bias ? at::zeros(partial_shape, x.options().dtype(acc)) : at::Tensor();
  if (rows > 0 && n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastdl_norm_backward_cpu", [&] {
      using A = typename Acc<scalar_t>::type;
      const scalar_t* dsp = dsum.has_value() ? dsum->const_data_ptr<scalar_t>() : nullptr;
      const int64_t ds_stride = dsum.has_value() ? dsum->stride(0) : 0;
      const A* mp = rms ? nullptr : mean->const_data_ptr<A>();
      at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
        for (int64_t c = chunk_begin; c < chunk_end; ++c) {
          const int64_t begin = c * rows / chunks, end = (c + 1) * rows / chunks;
          A* dwp = dweight_partial.defined() ? dweight_partial.mutable_data_ptr<A>() + c * n : nullptr;
          A* dbp = dbias_partial.defined() ? dbias_partial.mutable_data_ptr<A>() + c * n : nullptr;
          with_backward_flags(dsp != nullptr, dwp != nullptr, dbp != nullptr, [&](auto dsum_, auto dweight_,
                                                                                  auto dbias_) {
            constexpr bool kDsum = decltype(dsum_)::value, kDweight = decltype(dweight_)::value,
                           kDbias = decltype(dbias_)::value;
            if constexpr (std::is_same_v<scalar_t, float>) {
              if (narrow_dtype.has_value()) {
                return AT_DISPATCH_REDUCED_FLOATING_TYPES(*narrow_dtype, "fastdl_norm_backward_to_narrow_cpu", [&] {
                  norm_backward_rows_to_narrow<scalar_t, kDsum, kDweight, kDbias>(
                      dy.const_data_ptr<float>(), dy.stride(0), dsp, ds_stride, x.const_data_ptr<float>(),
                      x.stride(0), w.const_data_ptr<float>(), mp, rstd.const_data_ptr<float>(),
                      dx.mutable_data_ptr<float>(), dx_narrow.mutable_data_ptr<scalar_t>(), dwp, dbp, begin, end, n,
                      rms);
                });
              }
            }
            if constexpr (kIs16Bit<scalar_t>) {
              if (dy_in_acc) {
                return norm_backward_rows_from_float<scalar_t, kDsum, kDweight, kDbias>(
                    dy.const_data_ptr<A>(), dy.stride(0), dsp, ds_stride, x.const_data_ptr<scalar_t>(), x.stride(0),
                    w.const_data_ptr<A>(), mp, rstd.const_data_ptr<A>(), dx.mutable_data_ptr<scalar_t>(), dwp, dbp,
                    begin, end, n, rms);
              }
            }
            norm_backward_rows<scalar_t, kDsum, kDweight, kDbias>(
                dy.const_data_ptr<scalar_t>(), dy.stride(0), dsp, ds_stride, x.const_data_ptr<scalar_t>(), x.stride(0),
                w.const_data_ptr<A>(), mp, rstd.const_data_ptr<A>(), dx.mutable_data_ptr<scalar_t>(), dwp, dbp, begin,
                end, n, rms);
          });
        }
      });
    });
  }
  // stage 2: the partial rows, summed in chunk order, out in the parameters' dtype as the CUDA
  // kernels write them (param_type: weight's when it is x's, else the accumulation type)
  const auto out_type = weight.has_value() && !dy_in_acc ? param_type(x, {&weight}) : acc;
  auto reduce = [&](const at::Tensor& partial) {
    if (!partial.defined()) return at::empty({0}, x.options().dtype(out_type));
    at::Tensor out = partial;  // one chunk: already the sum
    if (chunks > 1) {
      out = at::empty({n}, partial.options());
      AT_DISPATCH_FLOATING_TYPES(partial.scalar_type(), "fastdl_norm_reduce_cpu", [&] {
        sum_partial_rows(partial.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), chunks, n);
      });
    }
    return out_type == acc ? out : out.to(out_type);
  };
  return {dx, reduce(dweight_partial), reduce(dbias_partial), dx_narrow};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("layer_norm_rows_forward", &layer_norm_rows_forward);
  m.impl("layer_norm_rows_backward", &layer_norm_rows_backward);
}

}  // namespace fastdl::cpu
