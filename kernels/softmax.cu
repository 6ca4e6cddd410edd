// softmax / log_softmax over rows: CUDA C++ forward and backward kernels.
//
// Two shapes of kernel, picked by row length:
//   * tile (rows up to 16384 columns; 8192 for fp64): a warp or a block holds its row in
//     registers (common/row_tile.cuh: 16-byte loads, 8 or 16 values a thread), reduces
//     max and sum, and writes: one read and one write of every element.
//   * block per row (longer rows): the block walks the row in 16-byte vectors keeping an
//     online (max, sum) state per thread (Milakov & Gimelshein 2018), combines the states
//     across the block, then a second sweep writes the output. The second read of the row
//     usually hits L2. Scalar loads when the row is not 16-byte aligned.
// Arithmetic in fp32 (fp64 for fp64); loads and stores in the element type.
// Column indices are 64-bit: cols may come close to 2^31, where col + blockDim * kVec
// would overflow an int.
#include <climits>

#include "common/reduce.cuh"
#include "common/row_tile.cuh"
#include "softmax.h"

namespace fastdl::kernels {
namespace {

constexpr int kBlockThreads = 512;  // threads of the block-per-row kernels
// Largest tiles: 1024 threads x 16 values; fp64 stops at 512 x 16 (register space).
template <typename T> constexpr int kMaxTileThreads = sizeof(T) == 8 ? 512 : 1024;
constexpr int kMaxTileElems = 16;

// Load / store kVec consecutive elements (one 16-byte transaction when kVec > 1).
template <int kVec, typename T, typename A>
__device__ __forceinline__ void load_acc(const T* p, A (&out)[kVec]) {
  if constexpr (kVec == 1) {
    out[0] = to_acc(*p);
  } else {
    const Vec<T> v = *reinterpret_cast<const Vec<T>*>(p);
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = to_acc(v.v[k]);
  }
}

template <int kVec, typename T, typename A>
__device__ __forceinline__ void store_acc(T* p, const A (&in)[kVec]) {
  if constexpr (kVec == 1) {
    *p = from_acc<T>(in[0]);
  } else {
    Vec<T> v;
#pragma unroll
    for (int k = 0; k < kVec; ++k) v.v[k] = from_acc<T>(in[k]);
    *reinterpret_cast<Vec<T>*>(p) = v;
  }
}

// ---------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------
template <typename T, int kThreads, int kElems, bool kLog>
__global__ void __launch_bounds__(kTileBlockThreads<kThreads>)
    softmax_forward_tile_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t cols,
                                int64_t x_row_stride, bool aligned) {
  using A = typename Acc<T>::type;
  using Tile = RowTile<T, kThreads, kElems>;
  __shared__ A scratch[kThreads / kWarpSize];
  const int64_t row = tile_row<kThreads>();
  if (row >= rows) return;  // whole groups only (tile_row)
  const int t = threadIdx.x % kThreads;
  A v[kElems];
  Tile::load(x + row * x_row_stride, t, cols, aligned, v, A(-INFINITY));  // padding: exp(-inf - m) = 0
  A m = -INFINITY;
#pragma unroll
  for (int i = 0; i < kElems; ++i) m = nan_max(m, v[i]);
  m = group_max<kThreads>(m, scratch);
  A s = 0;
#pragma unroll
  for (int i = 0; i < kElems; ++i) {
    v[i] -= m;
    const A e = exp_acc(v[i]);
    s += e;
    if constexpr (!kLog) v[i] = e;
  }
  s = group_sum<kThreads>(s, scratch);  // an all -inf row gives NaN, as torch
  // log_softmax = (x - max) - log(sum): never x - (max + log(sum)), which loses log(sum) near 3e38
  const A scale = kLog ? log_acc(s) : A(1) / s;
#pragma unroll
  for (int i = 0; i < kElems; ++i) v[i] = kLog ? v[i] - scale : v[i] * scale;
  Tile::store(y + row * cols, t, cols, aligned, v);
}

template <typename T, bool kLog, int kVec>
__global__ void __launch_bounds__(kBlockThreads)
    softmax_forward_block_kernel(const T* __restrict__ x, T* __restrict__ y, int cols, int64_t x_row_stride) {
  using A = typename Acc<T>::type;
  __shared__ MaxSum<A> scratch[kBlockThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * x_row_stride;
  T* y_row = y + row * cols;

  // pass 1: online max and sum (cols is a multiple of kVec)
  MaxSum<A> state{-INFINITY, A(0)};
  for (int64_t col = threadIdx.x * kVec; col < cols; col += kBlockThreads * kVec) {
    A v[kVec];
    load_acc<kVec>(x_row + col, v);
    MaxSum<A> chunk{v[0], A(0)};
#pragma unroll
    for (int k = 1; k < kVec; ++k) chunk.m = nan_max(chunk.m, v[k]);
    if (chunk.m != -INFINITY) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) chunk.s += exp_acc(v[k] - chunk.m);
    }
    state = combine(state, chunk);
  }
  state = block_combine<kBlockThreads>(state, scratch);
  const A scale = kLog ? log_acc(state.s) : A(1) / state.s;

  // pass 2: write
  for (int64_t col = threadIdx.x * kVec; col < cols; col += kBlockThreads * kVec) {
    A v[kVec];
    load_acc<kVec>(x_row + col, v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = kLog ? (v[k] - state.m) - scale : exp_acc(v[k] - state.m) * scale;
    store_acc<kVec>(y_row + col, v);
  }
}

// ---------------------------------------------------------------------------------
// backward:  softmax dx = y * (dy - sum(dy * y));  log_softmax dx = dy - exp(y) * sum(dy)
// ---------------------------------------------------------------------------------
template <typename T, int kThreads, int kElems, bool kLog>
__global__ void __launch_bounds__(kTileBlockThreads<kThreads>)
    softmax_backward_tile_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, int64_t rows,
                                 int64_t cols, int64_t dy_row_stride, int64_t y_row_stride, bool aligned) {
  using A = typename Acc<T>::type;
  using Tile = RowTile<T, kThreads, kElems>;
  __shared__ A scratch[kThreads / kWarpSize];
  const int64_t row = tile_row<kThreads>();
  if (row >= rows) return;  // whole groups only (tile_row)
  const int t = threadIdx.x % kThreads;
  A g[kElems], o[kElems];
  Tile::load(dy + row * dy_row_stride, t, cols, aligned, g, A(0));
  Tile::load(y + row * y_row_stride, t, cols, aligned, o, A(0));
  A total = 0;
#pragma unroll
  for (int i = 0; i < kElems; ++i) total += kLog ? g[i] : g[i] * o[i];
  total = group_sum<kThreads>(total, scratch);
#pragma unroll
  for (int i = 0; i < kElems; ++i) g[i] = kLog ? g[i] - exp_acc(o[i]) * total : o[i] * (g[i] - total);
  Tile::store(dx + row * cols, t, cols, aligned, g);
}

template <typename T, bool kLog, int kVec>
__global__ void __launch_bounds__(kBlockThreads)
    softmax_backward_block_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, int cols,
                                  int64_t dy_row_stride, int64_t y_row_stride) {
  using A = typename Acc<T>::type;
  __shared__ A scratch[kBlockThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const T* dy_row = dy + row * dy_row_stride;
  const T* y_row = y + row * y_row_stride;
  T* dx_row = dx + row * cols;
  A total = 0;
  for (int64_t col = threadIdx.x * kVec; col < cols; col += kBlockThreads * kVec) {
    A g[kVec], o[kVec];
    load_acc<kVec>(dy_row + col, g);
    if constexpr (!kLog) load_acc<kVec>(y_row + col, o);
#pragma unroll
    for (int k = 0; k < kVec; ++k) total += kLog ? g[k] : g[k] * o[k];
  }
  total = block_sum<kBlockThreads>(total, scratch);
  for (int64_t col = threadIdx.x * kVec; col < cols; col += kBlockThreads * kVec) {
    A g[kVec], o[kVec];
    load_acc<kVec>(dy_row + col, g);
    load_acc<kVec>(y_row + col, o);
#pragma unroll
    for (int k = 0; k < kVec; ++k) g[k] = kLog ? g[k] - exp_acc(o[k]) * total : o[k] * (g[k] - total);
    store_acc<kVec>(dx_row + col, g);
  }
}

// ---------------------------------------------------------------------------------
// launch
// ---------------------------------------------------------------------------------
// Blocks for `rows` rows of tiles with groups of kThreads.
template <int kThreads> unsigned tile_grid(int64_t rows) {
  constexpr int kRowsPerBlock = kTileBlockThreads<kThreads> / kThreads;
  return static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
}

template <typename T, bool kLog>
cudaError_t forward(const T* x, T* y, int64_t rows, int64_t cols, int64_t x_row_stride, cudaStream_t stream) {
  // the output's row stride is cols: aligned rows mean whole vectors a row, as the block kernel needs
  const bool aligned = rows_aligned<T>(x, x_row_stride) && rows_aligned<T>(y, cols);
  const bool tiled = with_row_tile<kMaxTileThreads<T>, kMaxTileElems>(cols, [&](auto threads, auto elems) {
    constexpr int kThreads = decltype(threads)::value, kElems = decltype(elems)::value;
    softmax_forward_tile_kernel<T, kThreads, kElems, kLog>
        <<<tile_grid<kThreads>(rows), kTileBlockThreads<kThreads>, 0, stream>>>(x, y, rows, cols, x_row_stride,
                                                                                    aligned);
  });
  if (!tiled) {  // long rows; cols <= INT_MAX here (sizes_supported)
    const int c = static_cast<int>(cols);
    if (aligned)
      softmax_forward_block_kernel<T, kLog, Vec<T>::kSize>
          <<<static_cast<unsigned>(rows), kBlockThreads, 0, stream>>>(x, y, c, x_row_stride);
    else
      softmax_forward_block_kernel<T, kLog, 1>
          <<<static_cast<unsigned>(rows), kBlockThreads, 0, stream>>>(x, y, c, x_row_stride);
  }
  return cudaGetLastError();
}

template <typename T, bool kLog>
cudaError_t backward(const T* dy, const T* y, T* dx, int64_t rows, int64_t cols, int64_t dy_row_stride,
                     int64_t y_row_stride, cudaStream_t stream) {
  const bool aligned = rows_aligned<T>(dy, dy_row_stride) && rows_aligned<T>(y, y_row_stride) &&
                       rows_aligned<T>(dx, cols);
  const bool tiled = with_row_tile<kMaxTileThreads<T>, kMaxTileElems>(cols, [&](auto threads, auto elems) {
    constexpr int kThreads = decltype(threads)::value, kElems = decltype(elems)::value;
    softmax_backward_tile_kernel<T, kThreads, kElems, kLog>
        <<<tile_grid<kThreads>(rows), kTileBlockThreads<kThreads>, 0, stream>>>(
            dy, y, dx, rows, cols, dy_row_stride, y_row_stride, aligned);
  });
  if (!tiled) {
    const int c = static_cast<int>(cols);
    if (aligned)
      softmax_backward_block_kernel<T, kLog, Vec<T>::kSize>
          <<<static_cast<unsigned>(rows), kBlockThreads, 0, stream>>>(dy, y, dx, c, dy_row_stride, y_row_stride);
    else
      softmax_backward_block_kernel<T, kLog, 1>
          <<<static_cast<unsigned>(rows), kBlockThreads, 0, stream>>>(dy, y, dx, c, dy_row_stride, y_row_stride);
  }
  return cudaGetLastError();
}

// Grid limits: one block per row (block kernels), at most one per row (tile kernels).
bool sizes_supported(int64_t rows, int64_t cols) { return rows <= INT_MAX && cols <= INT_MAX; }

template <typename T>
cudaError_t forward_typed(const void* x, void* y, int64_t rows, int64_t cols, int64_t stride, bool log,
                          cudaStream_t stream) {
  const T* xp = static_cast<const T*>(x);
  T* yp = static_cast<T*>(y);
  return log ? forward<T, true>(xp, yp, rows, cols, stride, stream)
             : forward<T, false>(xp, yp, rows, cols, stride, stream);
}

template <typename T>
cudaError_t backward_typed(const void* dy, const void* y, void* dx, int64_t rows, int64_t cols, int64_t dy_stride,
                           int64_t y_stride, bool log, cudaStream_t stream) {
  const T* dyp = static_cast<const T*>(dy);
  const T* yp = static_cast<const T*>(y);
  T* dxp = static_cast<T*>(dx);
  return log ? backward<T, true>(dyp, yp, dxp, rows, cols, dy_stride, y_stride, stream)
             : backward<T, false>(dyp, yp, dxp, rows, cols, dy_stride, y_stride, stream);
}

}  // namespace

cudaError_t softmax_forward(DType dtype, const void* x, void* y, int64_t rows, int64_t cols, int64_t x_row_stride,
                            bool log, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (!sizes_supported(rows, cols)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return forward_typed<float>(x, y, rows, cols, x_row_stride, log, stream);
    case DType::kFloat16: return forward_typed<__half>(x, y, rows, cols, x_row_stride, log, stream);
    case DType::kBFloat16: return forward_typed<__nv_bfloat16>(x, y, rows, cols, x_row_stride, log, stream);
    case DType::kFloat64: return forward_typed<double>(x, y, rows, cols, x_row_stride, log, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t softmax_backward(DType dtype, const void* grad_out, const void* out, void* grad_in, int64_t rows,
                             int64_t cols, int64_t grad_out_row_stride, int64_t out_row_stride, bool log,
                             cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (!sizes_supported(rows, cols)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed<float>(grad_out, out, grad_in, rows, cols, grad_out_row_stride, out_row_stride, log, stream);
    case DType::kFloat16:
      return backward_typed<__half>(grad_out, out, grad_in, rows, cols, grad_out_row_stride, out_row_stride, log, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(grad_out, out, grad_in, rows, cols, grad_out_row_stride, out_row_stride,
                                           log, stream);
    case DType::kFloat64:
      return backward_typed<double>(grad_out, out, grad_in, rows, cols, grad_out_row_stride, out_row_stride, log,
                                    stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastdl::kernels
