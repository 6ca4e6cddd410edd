// softmax / log_softmax over rows on the CPU: forward and backward.
//
// at::parallel_for splits the rows over threads; each row is three vectorised passes
// over memory that stays in L1/L2 (max, exp-and-sum into the output, scale), the same
// traffic as torch's own kernel. Accumulation in float (double for double inputs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "csrc/common/checks.h"
#include "csrc/common/outputs.h"
#include "csrc/cpu/avx2.h"
#include "csrc/cpu/common.h"
#include "csrc/cpu/half_rows.h"

namespace fastdl::cpu {
namespace {

// Row sums run in blocks of kSumBlock elements, each a vector reduction, the block sums
// then added in order: a lane of one long vector reduction adds up cols / kLanes terms one
// after the other, whose rounding error grows with the row (1e-5 relative at 256k
// columns in fp32; blocked, 1e-7).
constexpr int64_t kSumBlock = 2048;

FASTDL_INLINE float exp_acc(float x) { return exp_approx(x); }
FASTDL_INLINE double exp_acc(double x) { return std::exp(x); }

// The sum over j in [0, cols) of term(j) (which may also store), in blocks of kSumBlock, each
// in L lanes.
template <typename A, int L = kLanes<A>, typename Term> FASTDL_INLINE A blocked_sum(int64_t cols, Term term) {
  A sum = 0;
  for (int64_t b = 0; b < cols; b += kSumBlock) {
    const int64_t block_end = std::min(cols, b + kSumBlock);
    sum += sum_lanes<A, L>(block_end - b, [&](int64_t j) FASTDL_LAMBDA_INLINE { return term(b + j); });
  }
  return sum;
}

// One float or double row (16-bit rows: forward_rows).
template <typename T, bool kLog>
FASTDL_INLINE void softmax_row_forward(const T* __restrict x, T* __restrict y, int64_t cols) {
  static_assert(std::is_same_v<T, typename Acc<T>::type>, "softmax_row_forward takes float or double rows");
  const T max_val =
      max_lanes<T>(cols, -std::numeric_limits<T>::infinity(), [&](int64_t j) FASTDL_LAMBDA_INLINE { return x[j]; });
  // A row of -inf gives max = -inf and NaN outputs, as torch does.
  if constexpr (kLog) {
    // store x - max while summing its exp, then subtract log(sum) in place. Always
    // (x - max) - log(sum), never x - (max + log(sum)): near +-3e38 that rounds log(sum) away.
    const T sum = blocked_sum<T>(cols, [&](int64_t j) FASTDL_LAMBDA_INLINE {
      const T shifted = x[j] - max_val;
      y[j] = shifted;
      return exp_acc(shifted);
    });
    const T log_sum = std::log(sum);
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) y[j] -= log_sum;
  } else {
    // write exp(x - max) once, then scale in place: x is read once
    const T sum = blocked_sum<T>(cols, [&](int64_t j) FASTDL_LAMBDA_INLINE {
      const T e = exp_acc(x[j] - max_val);
      y[j] = e;
      return e;
    });
    const T inv = T(1) / sum;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) y[j] *= inv;
  }
}

// A 16-bit row (bf16, fp16) in three passes, as the float kernel's: x into the float row
// `buf` while finding the max, exp in place while summing (log_softmax: x - max), then
// scaled (less log(sum)): y = buf * scale + offset, which this returns as {scale, offset}
// for the caller's last pass. bf16 converts with a shift, fp16 with F16C where the CPU has
// it (csrc/cpu/half_rows.h). (Converting inside the exp loop instead left that loop scalar
// in GCC's target_clones functions.)
template <typename T, bool kLog>
FASTDL_INLINE std::pair<float, float> softmax_row_16_into(const T* __restrict x, float* __restrict buf,
                                                          int64_t cols) {
  const float max_val = row_to_float_max(x, buf, cols);
  if constexpr (kLog) {
    // (x - max) - log(sum), in that order, as the float kernel
    const float sum = blocked_sum<float>(cols, [&](int64_t j) FASTDL_LAMBDA_INLINE {
      const float shifted = buf[j] - max_val;
      buf[j] = shifted;
      return exp_acc(shifted);
    });
    return {1.0f, -std::log(sum)};
  } else {
    const float sum = blocked_sum<float>(cols, [&](int64_t j) FASTDL_LAMBDA_INLINE {
      const float e = exp_acc(buf[j] - max_val);
      buf[j] = e;
      return e;
    });
    return {1.0f / sum, 0.0f};
  }
}

// ... rounded into the 16-bit row y (with scale 1 or offset 0 the one operation of the
// float kernel's last pass, rounded once)
template <typename T, bool kLog>
FASTDL_INLINE void softmax_row_forward_16(const T* __restrict x, T* __restrict y, float* __restrict buf,
                                          int64_t cols) {
  const auto [scale, offset] = softmax_row_16_into<T, kLog>(x, buf, cols);
  row_from_float_affine(buf, scale, offset, y, cols);
}

// ... into an fp32 y (torch.softmax(x, dtype=torch.float32) of a 16-bit x, as attention
// often calls it): y is the float row the passes run in, so x is read once and y written
// and read back in L1/L2, where a cast first writes an fp32 copy of x and reads it back.
// The float kernel's bits: the same max, exps, sum and last operation.
template <typename T, bool kLog>
FASTDL_INLINE void softmax_row_forward_16_to_float(const T* __restrict x, float* __restrict y, int64_t cols) {
  const auto [scale, offset] = softmax_row_16_into<T, kLog>(x, y, cols);
#pragma omp simd
  for (int64_t j = 0; j < cols; ++j) y[j] = y[j] * scale + offset;
}

#ifdef FASTDL_AVX2_KERNELS
// softmax_row_backward for an fp16 row on an AVX2 CPU (csrc/cpu/avx2.h), converting 8
// values as it loads or stores them: the dot product in blocked_sum's blocks (each in
// sum_row8's order), then dx. Through float buffers it took five passes (4096 x 1024,
// 2-core VM, AMD EPYC: softmax 0.79 -> 0.55 ms, torch 0.58, with an F16C kernel of this
// shape; log_softmax 1.53-1.61 -> 0.93-1.04 ms, aten 1.06-1.12).
template <bool kLog>
FASTDL_AVX2 void half_softmax_backward_row_avx2(const c10::Half* __restrict dy, const c10::Half* __restrict y,
                                                c10::Half* __restrict dx, int64_t n) {
  float dot = 0;  // softmax: sum(dy * y); log_softmax: sum(dy)
  for (int64_t b = 0; b < n; b += kSumBlock) {
    const int64_t len = std::min(kSumBlock, n - b);
    float block_sum[1];
    sum_row8(len, [&](int64_t at, int64_t end, __m256 (&acc)[1]) FASTDL_AVX2_LAMBDA {
      const __m256 d = load_cols8(dy + b, at, end);  // past the block: 0
      acc[0] = kLog ? _mm256_add_ps(acc[0], d) : _mm256_fmadd_ps(d, load_cols8(y + b, at, end), acc[0]);
    }, block_sum);
    dot += block_sum[0];
  }
  const __m256 dot_v = _mm256_set1_ps(dot);
  for_cols8(n, [&](int64_t at, int64_t end) FASTDL_AVX2_LAMBDA {
    const __m256 d = load_cols8(dy, at, end), out = load_cols8(y, at, end);
    // softmax: y * (dy - dot); log_softmax: dy - exp(y) * dot
    store_cols8(dx, at, end,
                kLog ? _mm256_fnmadd_ps(exp_approx8(out), dot_v, d) : _mm256_mul_ps(out, _mm256_sub_ps(d, dot_v)));
  });
}
#endif

// Lanes of the row backward's sum: 64 bytes of them (16 floats, 8 doubles) where sum_lanes takes
// 256. A row's sum ends in a fold of its lanes to one value, which weighed on short rows (perf,
// 4096 x 256 fp32: ~25% of the kernel's samples). 2-core VM, AMD EPYC with AVX-512, softmax
// backward against aten in one process (2 threads), 256 -> 64 bytes: fp32 4096 x 256 0.76x ->
// 1.0x, 4096 x 1024 0.8x -> 0.9x, bf16 4096 x 1024 0.7x -> 0.8x; faster in the x86-64-v3 build
// too. The same lanes in every ISA clone, so the same bits.
template <typename A> constexpr int kRowSumLanes = 64 / static_cast<int>(sizeof(A));

// softmax:      dx = y * (dy - sum(dy * y))
// log_softmax:  dx = dy - exp(y) * sum(dy)
template <typename T, bool kLog>
FASTDL_INLINE void softmax_row_backward(const T* __restrict dy, const T* __restrict y, T* __restrict dx, int64_t cols) {
  using acc_t = typename Acc<T>::type;
  if constexpr (kLog) {
    const acc_t dot = blocked_sum<acc_t, kRowSumLanes<acc_t>>(
        cols, [&](int64_t j) FASTDL_LAMBDA_INLINE { return load_acc<acc_t>(dy, j); });
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) store_acc(dx, j, load_acc<acc_t>(dy, j) - exp_acc(load_acc<acc_t>(y, j)) * dot);
  } else {
    const acc_t dot = blocked_sum<acc_t, kRowSumLanes<acc_t>>(cols, [&](int64_t j) FASTDL_LAMBDA_INLINE {
      return load_acc<acc_t>(dy, j) * load_acc<acc_t>(y, j);
    });
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) store_acc(dx, j, load_acc<acc_t>(y, j) * (load_acc<acc_t>(dy, j) - dot));
  }
}

template <typename T, bool kLog>
FASTDL_MULTIVERSION void forward_rows(const T* x, int64_t x_stride, T* y, int64_t begin, int64_t end, int64_t cols) {
  if constexpr (kIs16Bit<T>) {
    FloatRows buf(1, cols);
    for (int64_t r = begin; r < end; ++r) softmax_row_forward_16<T, kLog>(x + r * x_stride, y + r * cols, buf[0], cols);
  } else {
    for (int64_t r = begin; r < end; ++r) softmax_row_forward<T, kLog>(x + r * x_stride, y + r * cols, cols);
  }
}

// 16-bit rows into an fp32 y, a row a task at every length (softmax_rows_forward casts
// first where the float kernels would split fewer long rows than threads)
template <typename T, bool kLog>
FASTDL_MULTIVERSION void forward_rows_to_float(const T* x, int64_t x_stride, float* y, int64_t begin, int64_t end,
                                               int64_t cols) {
  for (int64_t r = begin; r < end; ++r) softmax_row_forward_16_to_float<T, kLog>(x + r * x_stride, y + r * cols, cols);
}

// The gradient of an fp32 y of 16-bit x (forward_rows_to_float) in x's dtype: the float
// kernel's dx into an L1 buffer, rounded into dx, where casting afterwards writes the fp32
// dx and reads it back.
template <typename T, bool kLog>
FASTDL_MULTIVERSION void backward_rows_from_float(const float* dy, int64_t dy_stride, const float* y, int64_t y_stride,
                                                  T* dx, int64_t begin, int64_t end, int64_t cols) {
  FloatRows buf(1, cols);
  for (int64_t r = begin; r < end; ++r) {
    softmax_row_backward<float, kLog>(dy + r * dy_stride, y + r * y_stride, buf[0], cols);
    row_from_float(buf[0], dx + r * cols, cols);
  }
}

// bf16 rows convert inside the backward's loops (a shift). fp16 rows take
// half_softmax_backward_row_avx2 where the CPU has AVX2, else float buffers. (bf16 in the
// same hand-written AVX2 form was no faster than GCC's code: its rounding, ~7 integer ops
// for 8 values, is what it spends on.)
template <typename T, bool kLog>
FASTDL_MULTIVERSION void backward_rows(const T* dy, int64_t dy_stride, const T* y, int64_t y_stride, T* dx,
                                       int64_t begin, int64_t end, int64_t cols) {
  if constexpr (std::is_same_v<T, c10::Half>) {
#ifdef FASTDL_AVX2_KERNELS
    if (cpu_has_avx2()) {
      for (int64_t r = begin; r < end; ++r)
        half_softmax_backward_row_avx2<kLog>(dy + r * dy_stride, y + r * y_stride, dx + r * cols, cols);
      return;
    }
#endif
    FloatRows buf(3, cols);
    for (int64_t r = begin; r < end; ++r) {
      row_to_float(dy + r * dy_stride, buf[0], cols);
      row_to_float(y + r * y_stride, buf[1], cols);
      softmax_row_backward<float, kLog>(buf[0], buf[1], buf[2], cols);
      row_from_float(buf[2], dx + r * cols, cols);
    }
  } else {
    for (int64_t r = begin; r < end; ++r)
      softmax_row_backward<T, kLog>(dy + r * dy_stride, y + r * y_stride, dx + r * cols, cols);
  }
}

// Long rows (cols >= kLongCols) go chunk by chunk, kChunkCols columns at a time. The
// forward finds each chunk's max and sum of exp (writing the exps while the chunk is in
// L1/L2), combines a row's chunks in order (Milakov & Gimelshein 2018, sec. 3), then
// rescales each chunk: x is read once, where the row kernel reads it twice. The backward
// adds a row's dot product from its chunks' shares, in order. When there are fewer rows
// than threads, the chunks are tasks of their own (a 256k vocabulary over a batch of one);
// otherwise each thread takes whole rows and walks their chunks itself. The chunks and the
// order of their sums are the same either way, so a row's bits depend neither on the
// number of threads nor on the rows around it. float / double only (16-bit rows take the
// row kernels).
constexpr int64_t kLongCols = 32768, kChunkCols = 16384;

bool long_rows(int64_t cols) { return cols >= kLongCols; }
int64_t chunk_count(int64_t cols) { return (cols + kChunkCols - 1) / kChunkCols; }
int64_t chunk_len(int64_t cols, int64_t c) { return std::min(kChunkCols, cols - c * kChunkCols); }

// One chunk, first pass: its max and sum of exp(x - max); softmax writes the exps into y.
// A chunk of only -inf gives max -inf, sum 0 and zeros; a NaN anywhere makes the sum NaN.
template <typename T, bool kLog>
FASTDL_MULTIVERSION void forward_chunk_stats(const T* x, T* y, int64_t n, T* chunk_max, T* chunk_sum) {
  const T max_val =
      max_lanes<T>(n, -std::numeric_limits<T>::infinity(), [&](int64_t j) FASTDL_LAMBDA_INLINE { return x[j]; });
  T sum = 0;
  if (max_val == -std::numeric_limits<T>::infinity()) {  // -inf and NaN only (the max skips NaN)
    if constexpr (!kLog) std::fill(y, y + n, T(0));
    sum = blocked_sum<T>(n, [&](int64_t j) FASTDL_LAMBDA_INLINE { return x[j] != x[j] ? x[j] : T(0); });
  } else {
    sum = blocked_sum<T>(n, [&](int64_t j) FASTDL_LAMBDA_INLINE {
      const T e = exp_acc(x[j] - max_val);
      if constexpr (!kLog) y[j] = e;
      return e;
    });
  }
  *chunk_max = max_val;
  *chunk_sum = sum;
}

// A row's max and sum of exp(x - max) from its chunks', added in order; a NaN sum (a NaN
// in x) reaches the row's sum.
template <typename T>
void combine_chunks(const T* chunk_max, const T* chunk_sum, int64_t chunks, T* row_max, T* row_sum) {
  T m = -std::numeric_limits<T>::infinity(), s = 0;
  for (int64_t c = 0; c < chunks; ++c) m = chunk_max[c] > m ? chunk_max[c] : m;
  for (int64_t c = 0; c < chunks; ++c) s += chunk_sum[c] == T(0) ? T(0) : chunk_sum[c] * std::exp(chunk_max[c] - m);
  *row_max = m;
  *row_sum = s;
}

// One chunk, second pass, given its row's max and sum (a row of only -inf gives NaN, as torch).
template <typename T, bool kLog>
FASTDL_MULTIVERSION void forward_chunk_finish(const T* x, T* y, int64_t n, T row_max, T row_sum, T chunk_max) {
  if constexpr (kLog) {
    const T log_sum = std::log(row_sum);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] = (x[j] - row_max) - log_sum;
  } else {
    const T scale = std::exp(chunk_max - row_max) / row_sum;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) y[j] *= scale;
  }
}

// Rows [begin, end), each walked chunk by chunk on this thread.
template <typename T, bool kLog>
void forward_long_rows(const T* x, int64_t x_stride, T* y, int64_t begin, int64_t end, int64_t cols) {
  const int64_t chunks = chunk_count(cols);
  std::vector<T> chunk_max(chunks), chunk_sum(chunks);
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * x_stride;
    T* yr = y + r * cols;
    for (int64_t c = 0; c < chunks; ++c)
      forward_chunk_stats<T, kLog>(xr + c * kChunkCols, yr + c * kChunkCols, chunk_len(cols, c), &chunk_max[c],
                                   &chunk_sum[c]);
    T row_max, row_sum;
    combine_chunks(chunk_max.data(), chunk_sum.data(), chunks, &row_max, &row_sum);
    for (int64_t c = 0; c < chunks; ++c)
      forward_chunk_finish<T, kLog>(xr + c * kChunkCols, yr + c * kChunkCols, chunk_len(cols, c), row_max, row_sum,
                                    chunk_max[c]);
  }
}

// Fewer rows than threads: every chunk of every row a task.
template <typename T, bool kLog>
void forward_split(const T* x, int64_t x_stride, T* y, int64_t rows, int64_t cols) {
  const int64_t chunks = chunk_count(cols);
  std::vector<T> chunk_max(rows * chunks), chunk_sum(rows * chunks), row_max(rows), row_sum(rows);
  at::parallel_for(0, rows * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / chunks, c = t % chunks;
      forward_chunk_stats<T, kLog>(x + r * x_stride + c * kChunkCols, y + r * cols + c * kChunkCols,
                                   chunk_len(cols, c), &chunk_max[t], &chunk_sum[t]);
    }
  });
  for (int64_t r = 0; r < rows; ++r)
    combine_chunks(&chunk_max[r * chunks], &chunk_sum[r * chunks], chunks, &row_max[r], &row_sum[r]);
  at::parallel_for(0, rows * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / chunks, c = t % chunks;
      forward_chunk_finish<T, kLog>(x + r * x_stride + c * kChunkCols, y + r * cols + c * kChunkCols,
                                    chunk_len(cols, c), row_max[r], row_sum[r], chunk_max[t]);
    }
  });
}

template <typename T, bool kLog>
void forward_long(const T* x, int64_t x_stride, T* y, int64_t rows, int64_t cols) {
  if (rows < at::get_num_threads()) return forward_split<T, kLog>(x, x_stride, y, rows, cols);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    forward_long_rows<T, kLog>(x, x_stride, y, begin, end, cols);
  });
}

template <typename T, bool kLog>
FASTDL_MULTIVERSION T backward_chunk_dot(const T* dy, const T* y, int64_t n) {
  if constexpr (kLog) return blocked_sum<T>(n, [&](int64_t j) FASTDL_LAMBDA_INLINE { return dy[j]; });
  else return blocked_sum<T>(n, [&](int64_t j) FASTDL_LAMBDA_INLINE { return dy[j] * y[j]; });
}

template <typename T, bool kLog>
FASTDL_MULTIVERSION void backward_chunk_finish(const T* dy, const T* y, T* dx, int64_t n, T dot) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dx[j] = kLog ? dy[j] - exp_acc(y[j]) * dot : y[j] * (dy[j] - dot);
}

template <typename T, bool kLog>
void backward_long_rows(const T* dy, int64_t dy_stride, const T* y, int64_t y_stride, T* dx, int64_t begin,
                        int64_t end, int64_t cols) {
  const int64_t chunks = chunk_count(cols);
  for (int64_t r = begin; r < end; ++r) {
    const T *dyr = dy + r * dy_stride, *yr = y + r * y_stride;
    T dot = 0;
    for (int64_t c = 0; c < chunks; ++c)  // in order, as backward_split adds them
      dot += backward_chunk_dot<T, kLog>(dyr + c * kChunkCols, yr + c * kChunkCols, chunk_len(cols, c));
    for (int64_t c = 0; c < chunks; ++c)
      backward_chunk_finish<T, kLog>(dyr + c * kChunkCols, yr + c * kChunkCols, dx + r * cols + c * kChunkCols,
                                     chunk_len(cols, c), dot);
  }
}

template <typename T, bool kLog>
void backward_split(const T* dy, int64_t dy_stride, const T* y, int64_t y_stride, T* dx, int64_t rows, int64_t cols) {
  const int64_t chunks = chunk_count(cols);
  std::vector<T> shares(rows * chunks), dots(rows, T(0));
  at::parallel_for(0, rows * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / chunks, c = t % chunks;
      shares[t] = backward_chunk_dot<T, kLog>(dy + r * dy_stride + c * kChunkCols, y + r * y_stride + c * kChunkCols,
                                              chunk_len(cols, c));
    }
  });
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < chunks; ++c) dots[r] += shares[r * chunks + c];  // in order
  at::parallel_for(0, rows * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / chunks, c = t % chunks;
      backward_chunk_finish<T, kLog>(dy + r * dy_stride + c * kChunkCols, y + r * y_stride + c * kChunkCols,
                                     dx + r * cols + c * kChunkCols, chunk_len(cols, c), dots[r]);
    }
  });
}

template <typename T, bool kLog>
void backward_long(const T* dy, int64_t dy_stride, const T* y, int64_t y_stride, T* dx, int64_t rows, int64_t cols) {
  if (rows < at::get_num_threads()) return backward_split<T, kLog>(dy, dy_stride, y, y_stride, dx, rows, cols);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    backward_long_rows<T, kLog>(dy, dy_stride, y, y_stride, dx, begin, end, cols);
  });
}

void check_softmax_rows(const char* fn, const char* name, const at::Tensor& t) {
  check_rows(fn, name, t, at::kCPU);
  check_float_dtype(fn, name, t);
}

at::Tensor softmax_rows_forward(const at::Tensor& x, bool log, std::optional<at::ScalarType> out_dtype) {
  check_softmax_rows("fastdl.softmax (cpu)", "x", x);
  const at::ScalarType out_type = softmax_out_type("fastdl.softmax (cpu)", x.scalar_type(), out_dtype);
  const int64_t rows = x.size(0), cols = x.size(1);
  // fewer long rows than threads: the float kernels split each row over the threads
  // (forward_split), where the fused kernel takes a row a thread (1 x 262144 bf16, 2 threads:
  // 0.075 ms cast first, 0.109 fused), so x is cast first
  if (out_type != x.scalar_type() && long_rows(cols) && rows < at::get_num_threads())
    return softmax_rows_forward(x.to(out_type), log, std::nullopt);
  at::Tensor y = empty_output(x.sizes(), x.options().dtype(out_type));
  if (y.numel() == 0) return y;
  if (out_type != x.scalar_type()) {  // fp32 from a 16-bit x, the cast fused
    AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "fastdl_softmax_to_float_cpu", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      float* yp = y.mutable_data_ptr<float>();
      at::parallel_for(0, rows, grain_rows(cols, 8192), [&](int64_t begin, int64_t end) {
        if (log) forward_rows_to_float<scalar_t, true>(xp, x.stride(0), yp, begin, end, cols);
        else forward_rows_to_float<scalar_t, false>(xp, x.stride(0), yp, begin, end, cols);
      });
    });
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fastdl_softmax_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t stride = x.stride(0);
    if constexpr (!kIs16Bit<scalar_t>) {
      if (long_rows(cols)) {
        if (log) forward_long<scalar_t, true>(xp, stride, yp, rows, cols);
        else forward_long<scalar_t, false>(xp, stride, yp, rows, cols);
        return;
      }
    }
    at::parallel_for(0, rows, grain_rows(cols, 8192), [&](int64_t begin, int64_t end) {
      if (log) forward_rows<scalar_t, true>(xp, stride, yp, begin, end, cols);
      else forward_rows<scalar_t, false>(xp, stride, yp, begin, end, cols);
    });
  });
  return y;
}

at::Tensor softmax_rows_backward(const at::Tensor& grad_out, const at::Tensor& out, bool log,
                                 std::optional<at::ScalarType> grad_in_dtype) {
  check_softmax_rows("fastdl.softmax_backward (cpu)", "grad_out", grad_out);
  check_softmax_rows("fastdl.softmax_backward (cpu)", "out", out);
  TORCH_CHECK(grad_out.sizes() == out.sizes(), "fastdl.softmax_backward (cpu): grad_out of shape ", grad_out.sizes(),
              " does not match out of shape ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == out.scalar_type(), "fastdl.softmax_backward (cpu): grad_out is ",
              grad_out.scalar_type(), " but out is ", out.scalar_type());
  const at::ScalarType grad_in_type =
      softmax_grad_in_type("fastdl.softmax_backward (cpu)", out.scalar_type(), grad_in_dtype);
  at::Tensor dx = empty_output(out.sizes(), out.options().dtype(grad_in_type));
  const int64_t rows = out.size(0), cols = out.size(1);
  if (dx.numel() == 0) return dx;
  if (grad_in_type != out.scalar_type()) {  // a 16-bit dx from an fp32 out, the cast fused
    AT_DISPATCH_REDUCED_FLOATING_TYPES(grad_in_type, "fastdl_softmax_backward_from_float_cpu", [&] {
      const float *dyp = grad_out.const_data_ptr<float>(), *yp = out.const_data_ptr<float>();
      scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
      const int64_t dy_stride = grad_out.stride(0), y_stride = out.stride(0);
      at::parallel_for(0, rows, grain_rows(cols, 8192), [&](int64_t begin, int64_t end) {
        if (log) backward_rows_from_float<scalar_t, true>(dyp, dy_stride, yp, y_stride, dxp, begin, end, cols);
        else backward_rows_from_float<scalar_t, false>(dyp, dy_stride, yp, y_stride, dxp, begin, end, cols);
      });
    });
    return dx;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "fastdl_softmax_backward_cpu", [&] {
    const scalar_t* dyp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* yp = out.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const int64_t dy_stride = grad_out.stride(0), y_stride = out.stride(0);
    if constexpr (!kIs16Bit<scalar_t>) {
      if (long_rows(cols)) {
        if (log) backward_long<scalar_t, true>(dyp, dy_stride, yp, y_stride, dxp, rows, cols);
        else backward_long<scalar_t, false>(dyp, dy_stride, yp, y_stride, dxp, rows, cols);
        return;
      }
    }
    at::parallel_for(0, rows, grain_rows(cols, 8192), [&](int64_t begin, int64_t end) {
      if (log) backward_rows<scalar_t, true>(dyp, dy_stride, yp, y_stride, dxp, begin, end, cols);
      else backward_rows<scalar_t, false>(dyp, dy_stride, yp, y_stride, dxp, begin, end, cols);
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdl, CPU, m) {
  m.impl("softmax_rows_forward", &softmax_rows_forward);
  m.impl("softmax_rows_backward", &softmax_rows_backward);
}

}  // namespace fastdl::cpu
