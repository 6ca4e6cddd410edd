// LayerNorm / RMSNorm over rows on the CPU, optionally fused with a residual add:
// forward and backward (see fastdl/reference/layer_norm.py for the math).
//
// Forward: rows split over threads; per row a mean pass (LayerNorm), a variance pass
// over deviations (not sum of squares minus square of sums, which cancels in float)
// and a normalise-and-write pass, all vectorised. With a residual the sum is written
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
  const A mean = rms ? A(0) : sum / static_cast<A>(n);
  const A sq = sum_lanes<A>(n, [&](int64_t j) FASTDL_LAMBDA_INLINE {
    const A d = load_acc<A>(src, j) - mean;
    return d * d;
  });
  const A rstd = A(1) / std::sqrt(sq / static_cast<A>(n) + eps);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) store_acc(y, j, (load_acc<A>(src, j) - mean) * rstd * weight[j] + bias[j]);
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
  const float mean = rms ? 0.0f : sum[0] / static_cast<float>(n);
  const __m256 mean_v = _mm256_set1_ps(mean);
  float sq[1];
  sum_row8(n, [&](int64_t at, int64_t end, __m256 (&acc)[1]) FASTDL_AVX2_LAMBDA {
    __m256 d = _mm256_sub_ps(load_cols8(src, at, end), mean_v);
    if (end - at < 8) d = _mm256_and_ps(d, first_lanes8(end - at));  // past the row: 0, not -mean
    acc[0] = _mm256_fmadd_ps(d, d, acc[0]);
  }, sq);
  const float rstd = 1.0f / std::sqrt(sq[0] / static_cast<float>(n) + eps);
  const __m256 rstd_v = _mm256_set1_ps(rstd);
  for_cols8(n, [&](int64_t at, int64_t end) FASTDL_AVX2_LAMBDA {
    const __m256 xhat = _mm256_mul_ps(_mm256_sub_ps(load_cols8(src, at, end), mean_v), rstd_v);
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

// norm_backward_rows with the flags picked at run time
template <typename T, typename... Args>
void norm_backward_rows_dispatch(bool has_dsum, bool has_dweight, bool has_dbias, Args... args) {
  const int which = (has_dsum ? 4 : 0) | (has_dweight ? 2 : 0) | (has_dbias ? 1 : 0);
  switch (which) {
    case 0: return norm_backward_rows<T, false, false, false>(args...);
    case 1: return norm_backward_rows<T, false, false, true>(args...);
    case 2: return norm_backward_rows<T, false, true, false>(args...);
    case 3: return norm_backward_rows<T, false, true, true>(args...);
    case 4: return norm_backward_rows<T, true, false, false>(args...);
    case 5: return norm_backward_rows<T, true, false, true>(args...);
    case 6: return norm_backward_rows<T, true, true, false>(args...);
    default: return norm_backward_rows<T, true, true, true>(args...);
  }
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
  // y in fp32 from 16-bit x: x (or x + residual, added in the sum's dtype) cast first, as torch
  // under autocast (the CUDA kernels fuse the cast; CPU autocast leaves the norms in x's dtype,
  // so on CPU this is only the op's contract). A residual of another dtype: the sum first, as
  // torch's add promotes, then its norm (the CUDA kernels read both as they are).
  const at::ScalarType out_type = norm_out_type(fn, sum_type, out_dtype);
  if (out_type != x.scalar_type() || (residual.has_value() && residual->scalar_type() != x.scalar_type())) {
    if (!residual.has_value()) return layer_norm_rows_forward(x.to(out_type), {}, weight, bias, eps, rms, {});
    at::Tensor h = at::add(x, *residual).contiguous();
    auto out = layer_norm_rows_forward(h.to(out_type), {}, weight, bias, eps, rms, {});
    std::get<1>(out) = h;
    return out;
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_rows_backward(
    const at::Tensor& dy, const std::optional<at::Tensor>& dsum, const at::Tensor& x,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
    bool has_bias, bool rms) {
  const char* fn = "fastdl.layer_norm_backward (cpu)";
  check_rows(fn, "x", x, at::kCPU);
  const int64_t rows = x.size(0), n = x.size(1);
  check_rows(fn, "dy", dy, at::kCPU, rows, n);
  check_float_dtype(fn, "x", x);
  if (norm_dy_in_stats_type(fn, dy, x)) {  // after an out_dtype forward: as its cast of x, then dx cast back
    const auto as_dy = [&](const at::Tensor& t) { return t.to(dy.scalar_type()); };
    auto grads = layer_norm_rows_backward(dy, dsum.has_value() ? std::optional(as_dy(*dsum)) : std::nullopt, as_dy(x),
                                          weight, mean, rstd, has_bias, rms);
    std::get<0>(grads) = std::get<0>(grads).to(x.scalar_type());
    return grads;
  }
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
          norm_backward_rows_dispatch<scalar_t>(
              dsp != nullptr, dweight_partial.defined(), dbias_partial.defined(), dy.const_data_ptr<scalar_t>(),
              dy.stride(0), dsp, ds_stride, x.const_data_ptr<scalar_t>(), x.stride(0), w.const_data_ptr<A>(), mp,
              rstd.const_data_ptr<A>(), dx.mutable_data_ptr<scalar_t>(),
              dweight_partial.defined() ? dweight_partial.mutable_data_ptr<A>() + c * n : nullptr,
              dbias_partial.defined() ? dbias_partial.mutable_data_ptr<A>() + c * n : nullptr, begin, end, n, rms);
        }
      });
    });
  }
  // stage 2: the partial rows, summed in chunk order, out in the parameters' dtype as the CUDA
  // kernels write them (param_type: weight's when it is x's, else the accumulation type)
  const auto out_type = weight.has_value() ? param_type(x, {&weight}) : acc;
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
  return {dx, reduce(dweight_partial), reduce(dbias_partial)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("layer_norm_rows_forward", &layer_norm_rows_forward);
  m.impl("layer_norm_rows_backward", &layer_norm_rows_backward);
}

}  // namespace fastdl::cpu
