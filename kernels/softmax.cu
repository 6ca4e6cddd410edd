// softmax / log_softmax over rows: CUDA C++ forward and backward kernels.
//
// The shapes of kernel, picked by row length:
//   * tile (rows up to 16384 columns; 8192 for fp64): a warp or a block holds its row in
//     registers (common/row_tile.cuh: 16-byte loads, 8 to 32 values a thread), reduces
//     max and sum, and writes: one read and one write of every element.
//   * packed (16-bit rows up to 65536 columns, fp32 up to 32768, 16-byte aligned, or off a
//     boundary as the block kernel takes them, below, each ragged column one more value): 1024
//     threads hold the row in registers as it is in memory (common/row_tile.cuh
//     PackedRowTile), converting where used: one read and one write, as the tiles, at the
//     price of exp taken twice (for the sum, then for the output). The backward holds one
//     input and reads the other a pack at a time (softmax: dy twice, log_softmax: y once).
//     FASTDL_CUDA_PACKED_ROWS=0 turns both off (the tuner compares the two).
//     16-bit rows of the tiles' lengths from 2049 columns take them too, in blocks of 128-512
//     threads of 32 values (FASTDL_CUDA_PACKED_TILES=0: the tiles; =1: fp32 rows as well).
//   * block per row (longer rows): the block walks the row in 16-byte vectors keeping an
//     online (max, sum) state per thread (Milakov & Gimelshein 2018), combines the states
//     across the block, then a second sweep writes the output. The second read of the row
//     hits L2 only when few rows are in flight: with a block a row and many rows it came from
//     DRAM on the H200 (loop_grid: FASTDL_CUDA_LOOP_BLOCKS_PER_SM has fewer blocks walk the
//     rows; unset, a block a row, ran best or level: common/occupancy.h). Rows off a 16-byte
//     boundary (50257 columns, a GPT-2 vocabulary) take their ragged head and tail one element
//     a thread and the rest in vectors, as long as input and output rows are off by the same
//     amount (rows_share_alignment); other
//     layouts (a row stride that is not) one element at a time.
//   * split (long rows too few to fill the device with a block each: a 256k vocabulary
//     over a small batch): each row is cut into chunks, a block each. A first kernel
//     writes every chunk's (max, sum) (backward: its share of the dot product) to a
//     workspace; a second combines its row's chunks, in a fixed order, and writes its
//     chunk. Two launches and one more read of the row, against a grid of a few blocks.
// Arithmetic in fp32 (fp64 for fp64); loads and stores in the element type.
// Column indices are 64-bit: cols may come close to 2^31, where col + blockDim * kVec
// would overflow an int.
#include <algorithm>
#include <climits>
#include <type_traits>

#include "common/env.h"
#include "common/occupancy.h"
#include "common/reduce.cuh"
#include "common/row_tile.cuh"
#include "softmax.h"

namespace fastdl::kernels {
namespace {

constexpr int kBlockThreads = 512;  // threads of the block-per-row kernels
// Steps a thread of the block and chunk kernels loads at once (for_row_pieces_ahead): 4 16-byte
// vectors, 2 of fp64.
template <typename T> constexpr int kAheadSteps = sizeof(T) == 8 ? 2 : 4;
constexpr int kPackedThreads = 1024;  // threads of the packed kernel
// Values a thread of the packed kernels holds, at most: 128 bytes (32 registers), so 64
// halves or 32 floats; none for fp64, whose tiles already reach its register space. log_softmax
// stops at 32 halves: at 64, ptxas spills 40-72 bytes of it (forward and backward, sm_80 and
// sm_90a) where softmax fits.
template <typename T, bool kLog>
constexpr int kMaxPackedElems = sizeof(T) == 8 ? 0 : kLog ? 32 : 128 / static_cast<int>(sizeof(T));
// Largest tiles: 1024 threads x 16 values (or 512 x 32); fp64 stops at 512 x 16, and 16
// values a thread (register space: the backward's 32 doubles of dy and y spill on sm_80).
// The launch takes the first tile that holds the row (with_row_tile).
template <typename T> constexpr int kMaxTileThreads = sizeof(T) == 8 ? 512 : 1024;
template <typename T> constexpr int kMaxTileElems = sizeof(T) == 8 ? 16 : 32;
template <typename T> constexpr int64_t kMaxTileCols = static_cast<int64_t>(kMaxTileThreads<T>) * 16;

// Calls launch(threads, elems) with the tile for rows of `cols`; false past the tiles.
template <typename T, typename F> bool with_tile(int64_t cols, F&& launch) {
  return with_row_tile<kMaxTileThreads<T>, kMaxTileElems<T>, kMaxTileCols<T>>(cols, tile_elems_knob(), launch);
}

// Calls launch(std::integral_constant<int, kElems>{}) with a packed kernel's values a thread
// for rows of `cols` (32 or 64, whichever holds the row first, up to kMaxElems); false when
// none does, or when FASTDL_CUDA_PACKED_ROWS is 0.
template <int kMaxElems, typename F> bool with_packed_tile(int64_t cols, F&& launch) {
  int64_t enabled = 1;
  env_knob("FASTDL_CUDA_PACKED_ROWS", 0, 1, &enabled);
  bool launched = false;
  auto try_elems = [&](auto elems) {
    constexpr int kElems = decltype(elems)::value;
    if constexpr (kElems <= kMaxElems) {
      if (!launched && enabled && cols <= static_cast<int64_t>(kPackedThreads) * kElems) {
        launch(elems);
        launched = true;
      }
    }
  };
  try_elems(std::integral_constant<int, 32>{});
  try_elems(std::integral_constant<int, 64>{});
  return launched;
}

// ---------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------
template <typename T, typename Y, int kThreads, int kElems, bool kLog>
__global__ void __launch_bounds__(kTileBlockThreads<kThreads>)
    softmax_forward_tile_kernel(const T* __restrict__ x, Y* __restrict__ y, int64_t rows, int64_t cols,
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

// Long rows, one a block of kThreads (kPackedThreads; with FASTDL_CUDA_PACKED_TILES=1 also
// rows of the tiles' lengths from 2049 columns, blocks of 128-512), held as they are
// (PackedRowTile). Rows off a 16-byte boundary, input and output by the same amount
// (rows_share_alignment: a 50257-wide vocabulary), hold their whole vectors so, and each of
// the (fewer than kPack) columns before the first and after the last in one more value of one
// thread (threads 0.., as for_row_pieces deals them): one more register a thread, not a second
// read of the row.
template <typename T, int kThreads, int kElems, bool kLog>
__global__ void __launch_bounds__(kThreads, 1024 / kThreads)
    softmax_forward_packed_kernel(const T* __restrict__ x, T* __restrict__ y, int cols, int64_t x_row_stride) {
  using A = typename Acc<T>::type;
  constexpr int kPack = Vec<T>::kSize;
  __shared__ A scratch[kThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const int t = threadIdx.x;
  const T* x_row = x + row * x_row_stride;
  T* y_row = y + row * cols;
  const auto [head, vec_cols, edge_col] = ragged_row<kPack>(x_row, cols, t);
  const A edge = edge_col >= 0 ? to_acc(x_row[edge_col]) : A(-INFINITY);  // -inf: exp(-inf - m) = 0
  PackedRowTile<T, kThreads, kElems> tile;
  tile.load(x_row + head, t, vec_cols, from_acc<T>(A(-INFINITY)));  // padding: exp(-inf - m) = 0
  A m = edge;
#pragma unroll
  for (int i = 0; i < kElems; ++i) m = nan_max(m, tile.value(i));
  m = block_max<kThreads>(m, scratch);
  tile.reconvert_after_here();
  A s = exp_fast_acc(edge - m);
#pragma unroll
  for (int i = 0; i < kElems; ++i) s += exp_fast_acc(tile.value(i) - m);
  s = block_sum<kThreads>(s, scratch);  // an all -inf row gives NaN, as torch
  tile.reconvert_after_here();
  // log_softmax = (x - max) - log(sum), as the tile kernel
  const A scale = kLog ? log_acc(s) : A(1) / s;
  auto out = [&](A v) { return kLog ? (v - m) - scale : exp_fast_acc(v - m) * scale; };
  if (edge_col >= 0) y_row[edge_col] = from_acc<T>(out(edge));
  tile.store(y_row + head, t, vec_cols, out);
}

// Columns [begin, end) of a row walked by a block of kBlockThreads in kVec-wide pieces
// (for_row_pieces): every thread's online (max, sum) state combined across the block;
// every thread gets it.
template <typename T, int kVec, typename A = typename Acc<T>::type>
__device__ __forceinline__ MaxSum<A> block_max_sum(const T* x_row, int64_t begin, int64_t end, MaxSum<A>* scratch) {
  MaxSum<A> state{-INFINITY, A(0)};
  // the loads of kAheadSteps steps at once (for_row_pieces_ahead), held as loaded (load_vec_raw):
  // a step's exps and the branches around them held the next step's load back
  for_row_pieces_ahead<kBlockThreads, kVec, kAheadSteps<T>>(
      x_row, begin, end, [&](int64_t col, auto width) { return load_vec_raw<decltype(width)::value>(x_row + col); },
      [&](const auto& raw, auto width, int64_t) {
        constexpr int n = decltype(width)::value;
        A v[n];
        convert_vec_raw<T>(raw, v);
        MaxSum<A> piece{v[0], A(0)};
#pragma unroll
        for (int k = 1; k < n; ++k) piece.m = nan_max(piece.m, v[k]);
        if (piece.m != -INFINITY) {
#pragma unroll
          for (int k = 0; k < n; ++k) piece.s += exp_fast_acc(v[k] - piece.m);
        }
        state = combine(state, piece);
      });
  return block_combine<kBlockThreads>(state, scratch);
}

// y over columns [begin, end) from the row's max and sum; y_row shares x_row's alignment
// (y of the accumulation type beside a 16-bit x: both rows 16-byte aligned). Each 16-byte
// vector of y goes out in one store (store_acc_whole), as does dx's below.
template <typename T, bool kLog, int kVec, typename Y, typename A>
__device__ __forceinline__ void block_write_softmax(const T* x_row, Y* y_row, int64_t begin, int64_t end,
                                                    MaxSum<A> row) {
  // log_softmax = (x - max) - log(sum): never x - (max + log(sum)), which loses log(sum) near 3e38
  const A scale = kLog ? log_acc(row.s) : A(1) / row.s;
  // the loads of kAheadSteps steps at once, as block_max_sum's (stepped one at a time, nvcc issued each
  // load after the step before it: sm_90a SASS, 12f6ed2)
  for_row_pieces_ahead<kBlockThreads, kVec, kAheadSteps<T>>(
      x_row, begin, end, [&](int64_t col, auto width) { return load_vec_raw<decltype(width)::value>(x_row + col); },
      [&](const auto& raw, auto width, int64_t col) {
        constexpr int n = decltype(width)::value;
        A v[n];
        convert_vec_raw<T>(raw, v);
#pragma unroll
        for (int k = 0; k < n; ++k) v[k] = kLog ? (v[k] - row.m) - scale : exp_fast_acc(v[k] - row.m) * scale;
        store_acc_whole<n>(y_row + col, v);
      });
}

// A block a row, or with FASTDL_CUDA_LOOP_BLOCKS_PER_SM fewer blocks, each walking rows
// blockIdx.x, + gridDim.x, ... (loop_grid): the row's second read from L2 needs few rows in flight.
template <typename T, typename Y, bool kLog, int kVec>
__global__ void __launch_bounds__(kBlockThreads)
    softmax_forward_block_kernel(const T* __restrict__ x, Y* __restrict__ y, int64_t rows, int cols,
                                 int64_t x_row_stride) {
  using A = typename Acc<T>::type;
  __shared__ MaxSum<A> scratch[kBlockThreads / kWarpSize];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const MaxSum<A> state = block_max_sum<T, kVec>(x + row * x_row_stride, 0, cols, scratch);
    block_write_softmax<T, kLog, kVec>(x + row * x_row_stride, y + row * cols, 0, cols, state);
  }
}

// Split rows, grid (chunks, rows): chunk blockIdx.x of row blockIdx.y is columns
// [chunk * chunk_cols, min(cols, (chunk + 1) * chunk_cols)); its (max, sum) goes to
// stats[row * chunks + chunk].
// no 16-byte stores accepted: softmax_forward_chunk_stats_kernel: one (max, sum) a block
template <typename T, int kVec>
__global__ void __launch_bounds__(kBlockThreads)
    softmax_forward_chunk_stats_kernel(const T* __restrict__ x, MaxSum<typename Acc<T>::type>* __restrict__ stats,
                                       int cols, int chunk_cols, int64_t x_row_stride) {
  using A = typename Acc<T>::type;
  __shared__ MaxSum<A> scratch[kBlockThreads / kWarpSize];
  const int64_t row = blockIdx.y;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk_cols;
  const int64_t end = begin + chunk_cols < cols ? begin + chunk_cols : cols;
  const MaxSum<A> state = block_max_sum<T, kVec>(x + row * x_row_stride, begin, end, scratch);
  if (threadIdx.x == 0) stats[row * gridDim.x + blockIdx.x] = state;
}

// Every block of a row combines the row's chunk states the same way (one a thread, then
// the block's fixed reduction tree), so all its chunks scale by the same bits.
template <typename T, typename Y, bool kLog, int kVec>
__global__ void __launch_bounds__(kBlockThreads)
    softmax_forward_chunk_write_kernel(const T* __restrict__ x, const MaxSum<typename Acc<T>::type>* __restrict__ stats,
                                       Y* __restrict__ y, int cols, int chunk_cols, int64_t x_row_stride) {
  using A = typename Acc<T>::type;
  __shared__ MaxSum<A> scratch[kBlockThreads / kWarpSize];
  const int64_t row = blockIdx.y;
  const MaxSum<A> mine = threadIdx.x < gridDim.x ? stats[row * gridDim.x + threadIdx.x] : MaxSum<A>{-INFINITY, A(0)};
  const MaxSum<A> state = block_combine<kBlockThreads>(mine, scratch);
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk_cols;
  const int64_t end = begin + chunk_cols < cols ? begin + chunk_cols : cols;
  block_write_softmax<T, kLog, kVec>(x + row * x_row_stride, y + row * cols, begin, end, state);
}

// ---------------------------------------------------------------------------------
// backward:  softmax dx = y * (dy - sum(dy * y));  log_softmax dx = dy - exp(y) * sum(dy)
// ---------------------------------------------------------------------------------
// dy and y in D: dx's T, or the accumulation type after a forward that wrote fp32 from a
// 16-bit x (the tile laid out by T's 16-byte vectors, D's read two of them a pack).
template <typename T, typename D, int kThreads, int kElems, bool kLog>
__global__ void __launch_bounds__(kTileBlockThreads<kThreads>)
    softmax_backward_tile_kernel(const D* __restrict__ dy, const D* __restrict__ y, T* __restrict__ dx, int64_t rows,
                                 int64_t cols, int64_t dy_row_stride, int64_t y_row_stride, bool aligned) {
  using A = typename Acc<T>::type;
  using Tile = RowTile<T, kThreads, kElems>;
  __shared__ A scratch[kThreads / kWarpSize];
  const int64_t row = tile_row<kThreads>();
  if (row >= rows) return;  // whole groups only (tile_row)
  const int t = threadIdx.x % kThreads;
  // dy and y both in flight before either is converted (RowTile::load_raw)
  typename Tile::template Raw<D> dy_in, y_in;
  Tile::load_raw(dy + row * dy_row_stride, t, cols, aligned, dy_in, from_acc<D>(A(0)));
  Tile::load_raw(y + row * y_row_stride, t, cols, aligned, y_in, from_acc<D>(A(0)));
  A g[kElems], o[kElems];
  Tile::convert(dy_in, g);
  Tile::convert(y_in, o);
  A total = 0;
#pragma unroll
  for (int i = 0; i < kElems; ++i) total += kLog ? g[i] : g[i] * o[i];
  total = group_sum<kThreads>(total, scratch);
#pragma unroll
  for (int i = 0; i < kElems; ++i) g[i] = kLog ? g[i] - exp_acc(o[i]) * total : o[i] * (g[i] - total);
  Tile::store(dx + row * cols, t, cols, aligned, g);
}

// This thread's share of the row's dot product over columns [begin, end): sum(dy * y), or
// sum(dy) for log_softmax (not yet reduced across the block). The rows share dy_row's
// alignment (for_row_pieces), as do dx's below.
template <typename T, bool kLog, int kVec, typename D, typename A = typename Acc<T>::type>
__device__ __forceinline__ A thread_dot(const D* dy_row, const D* y_row, int64_t begin, int64_t end) {
  A total = 0;
  for_row_pieces<kBlockThreads, kVec>(dy_row, begin, end, [&](int64_t col, auto width) {
    constexpr int n = decltype(width)::value;
    A g[n], o[n];
    load_acc<n>(dy_row + col, g);
    if constexpr (!kLog) load_acc<n>(y_row + col, o);
#pragma unroll
    for (int k = 0; k < n; ++k) total += kLog ? g[k] : g[k] * o[k];
  });
  return total;
}

template <typename T, bool kLog, int kVec, typename D, typename A>
__device__ __forceinline__ void block_write_dx(const D* dy_row, const D* y_row, T* dx_row, int64_t begin, int64_t end,
                                               A total) {
  // cut by the narrower dx when dy is wider (the rows are all 16-byte aligned then)
  const auto* cut_row = [&] {
    if constexpr (std::is_same_v<D, T>) return dy_row;
    else return dx_row;
  }();
  for_row_pieces<kBlockThreads, kVec>(cut_row, begin, end, [&](int64_t col, auto width) {
    constexpr int n = decltype(width)::value;
    A g[n], o[n];
    load_acc<n>(dy_row + col, g);
    load_acc<n>(y_row + col, o);
#pragma unroll
    for (int k = 0; k < n; ++k) g[k] = kLog ? g[k] - exp_acc(o[k]) * total : o[k] * (g[k] - total);
    store_acc_whole<n>(dx_row + col, g);
  });
}

// A block a row, or fewer walking rows, as the forward's.
template <typename T, typename D, bool kLog, int kVec>
__global__ void __launch_bounds__(kBlockThreads)
    softmax_backward_block_kernel(const D* __restrict__ dy, const D* __restrict__ y, T* __restrict__ dx, int64_t rows,
                                  int cols, int64_t dy_row_stride, int64_t y_row_stride) {
  using A = typename Acc<T>::type;
  __shared__ A scratch[kBlockThreads / kWarpSize];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const D* dy_row = dy + row * dy_row_stride;
    const D* y_row = y + row * y_row_stride;
    const A total = block_sum<kBlockThreads>(thread_dot<T, kLog, kVec>(dy_row, y_row, 0, cols), scratch);
    block_write_dx<T, kLog, kVec>(dy_row, y_row, dx + row * cols, 0, cols, total);
  }
}

// Long rows, one a block of kThreads (kPackedThreads; with FASTDL_CUDA_PACKED_TILES=1 also
// rows of the tiles' lengths from 2049 columns, blocks of 128-512), one input held as it is
// (PackedRowTile) and the other read a pack at a time. softmax holds y: dy is read for the
// dot product and again for dx, 4 moves of a row where the block kernel makes 5 (at the
// tiles' lengths the second read of a row of at most 32 KiB comes from L2). log_softmax holds
// dy, whose sum is all the first sweep needs: y is read once, 3 moves. Rows off a 16-byte
// boundary, dy, y and dx by the same amount (rows_share_alignment: a 50257-wide vocabulary),
// hold their whole vectors so, and each ragged column one value of one thread, as the
// packed forward's.
template <typename T, int kThreads, int kElems, bool kLog>
__global__ void __launch_bounds__(kThreads, 1024 / kThreads)
    softmax_backward_packed_kernel(const T* __restrict__ dy, const T* __restrict__ y, T* __restrict__ dx, int cols,
                                   int64_t dy_row_stride, int64_t y_row_stride) {
  using A = typename Acc<T>::type;
  constexpr int kPack = Vec<T>::kSize;
  __shared__ A scratch[kThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const int t = threadIdx.x;
  const T* dy_row = dy + row * dy_row_stride;
  const T* y_row = y + row * y_row_stride;
  T* dx_row = dx + row * cols;
  const T* held_row = kLog ? dy_row : y_row;
  const auto [head, vec_cols, edge_col] = ragged_row<kPack>(dy_row, cols, t);
  const A edge = edge_col >= 0 ? to_acc(held_row[edge_col]) : A(0);  // the held input's ragged value
  PackedRowTile<T, kThreads, kElems> held;  // y (softmax) or dy (log_softmax); 0 past the row
  held.load(held_row + head, t, vec_cols, from_acc<T>(A(0)));
  A total = edge;  // log_softmax: sum(dy)
  A edge_dy = 0;
  if constexpr (kLog) {
#pragma unroll
    for (int i = 0; i < kElems; ++i) total += held.value(i);
  } else {
    if (edge_col >= 0) edge_dy = to_acc(dy_row[edge_col]);
    total = edge * edge_dy + held.template sum_with<A>(dy_row + head, t, vec_cols, [](A o, A g) { return g * o; });
  }
  total = block_sum<kThreads>(total, scratch);
  held.reconvert_after_here();
  if constexpr (kLog) {
    if (edge_col >= 0) dx_row[edge_col] = from_acc<T>(edge - exp_acc(to_acc(y_row[edge_col])) * total);
    held.store_with(y_row + head, dx_row + head, t, vec_cols, [&](A g, A o) { return g - exp_acc(o) * total; });
  } else {
    if (edge_col >= 0) dx_row[edge_col] = from_acc<T>(edge * (edge_dy - total));
    held.store_with(dy_row + head, dx_row + head, t, vec_cols, [&](A o, A g) { return o * (g - total); });
  }
}

// Split rows, grid (chunks, rows) as the forward's: each chunk's share of the dot product
// to dots[row * chunks + chunk], then each block adds its row's shares and writes its chunk.
// no 16-byte stores accepted: softmax_backward_chunk_dot_kernel: one dot share a block
template <typename T, typename D, bool kLog, int kVec>
__global__ void __launch_bounds__(kBlockThreads)
    softmax_backward_chunk_dot_kernel(const D* __restrict__ dy, const D* __restrict__ y,
                                      typename Acc<T>::type* __restrict__ dots, int cols, int chunk_cols,
                                      int64_t dy_row_stride, int64_t y_row_stride) {
  using A = typename Acc<T>::type;
  __shared__ A scratch[kBlockThreads / kWarpSize];
  const int64_t row = blockIdx.y;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk_cols;
  const int64_t end = begin + chunk_cols < cols ? begin + chunk_cols : cols;
  const A share =
      block_sum<kBlockThreads>(thread_dot<T, kLog, kVec>(dy + row * dy_row_stride, y + row * y_row_stride, begin, end),
                               scratch);
  if (threadIdx.x == 0) dots[row * gridDim.x + blockIdx.x] = share;
}

template <typename T, typename D, bool kLog, int kVec>
__global__ void __launch_bounds__(kBlockThreads)
    softmax_backward_chunk_write_kernel(const D* __restrict__ dy, const D* __restrict__ y,
                                        const typename Acc<T>::type* __restrict__ dots, T* __restrict__ dx, int cols,
                                        int chunk_cols, int64_t dy_row_stride, int64_t y_row_stride) {
  using A = typename Acc<T>::type;
  __shared__ A scratch[kBlockThreads / kWarpSize];
  const int64_t row = blockIdx.y;
  const A mine = threadIdx.x < gridDim.x ? dots[row * gridDim.x + threadIdx.x] : A(0);
  const A total = block_sum<kBlockThreads>(mine, scratch);
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * chunk_cols;
  const int64_t end = begin + chunk_cols < cols ? begin + chunk_cols : cols;
  block_write_dx<T, kLog, kVec>(dy + row * dy_row_stride, y + row * y_row_stride, dx + row * cols, begin, end, total);
}

// ---------------------------------------------------------------------------------
// launch
// ---------------------------------------------------------------------------------
// Blocks for `rows` rows of tiles with groups of kThreads.
template <int kThreads> unsigned tile_grid(int64_t rows) {
  constexpr int kRowsPerBlock = kTileBlockThreads<kThreads> / kThreads;
  return static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
}

// The split's chunks are whole steps of every kernel shape (kBlockThreads x 8 elements),
// so a chunk starts on a 16-byte boundary wherever its row does; the write kernels read
// one chunk's state a thread, hence at most kBlockThreads chunks.
constexpr int kChunkAlign = kBlockThreads * 8;
constexpr int64_t kMaxChunks = kBlockThreads;
constexpr int64_t kMaxGridY = 65535;  // the split's grid has a row per blockIdx.y

struct Split {
  int64_t chunks, chunk_cols;  // chunks == 1: one block a row
  dim3 grid(int64_t rows) const { return dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(rows)); }
};

// Blocks an SM should hold for the split: FASTDL_CUDA_SPLIT_PER_SM when set to a number (0
// never splits; a huge one splits rows into as many chunks as allowed), else as many
// kBlockThreads-blocks of the chunk kernel as fit on an SM at once.
template <typename T> cudaError_t split_blocks_per_sm(int64_t* per_sm) {
  if (env_knob("FASTDL_CUDA_SPLIT_PER_SM", 0, 1 << 20, per_sm)) return cudaSuccess;
  int resident = 0;
  const cudaError_t err = resident_blocks(
      reinterpret_cast<const void*>(softmax_forward_chunk_stats_kernel<T, Vec<T>::kSize>), kBlockThreads, 0, &resident);
  *per_sm = std::max(resident, 1);
  return err;
}

// How a (rows, cols) softmax splits its rows on the current device: only long rows (past
// the tiles) too few to give every SM its blocks.
template <typename T> cudaError_t split_for(int64_t rows, int64_t cols, Split* split) {
  *split = Split{1, cols};
  if (rows == 0 || cols <= kMaxTileCols<T> || rows > kMaxGridY) return cudaSuccess;
  int device = 0, sms = 0;
  int64_t per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = split_blocks_per_sm<T>(&per_sm);
  if (err != cudaSuccess) return err;
  const int64_t target = static_cast<int64_t>(sms) * per_sm;
  if (rows >= target) return cudaSuccess;
  const int64_t steps = (cols + kChunkAlign - 1) / kChunkAlign;
  const int64_t chunks = std::min({(target + rows - 1) / rows, steps, kMaxChunks});
  if (chunks <= 1) return cudaSuccess;
  const int64_t chunk_cols = (steps + chunks - 1) / chunks * kChunkAlign;
  *split = Split{(cols + chunk_cols - 1) / chunk_cols, chunk_cols};  // no empty chunk
  return cudaSuccess;
}

// Workspace bytes of a split: the forward's (max, sum) pairs (the backward's dots take half).
template <typename T> size_t split_bytes(int64_t rows, const Split& split) {
  return split.chunks == 1 ? 0 : static_cast<size_t>(rows * split.chunks) * sizeof(MaxSum<typename Acc<T>::type>);
}

// The forward of 16-bit rows of 2049 to 16384 columns (whole vectors, or input and output rows
// equally off a 16-byte boundary) held as they are by the packed kernel in row_tile.cuh's
// with_packed_block (32 values a thread, blocks of 128-512 threads), instead of the tile (at
// 16384 columns 1024 threads x 16 values converted: one block a multiprocessor); the backward
// of such rows likewise. FASTDL_CUDA_PACKED_TILES=0 keeps them on the tiles, =1 takes fp32 rows
// too (untimed). H200, bf16, 4096 rows (tuner, 2b1309b): backward 8192 / 16384 columns 0.0535 /
// 0.101 ms packed, 0.0729 / 0.153 the tile (16384: 96% of the copy bandwidth); forward 16384
// 0.097 against 0.102, 1024 x 8193 0.025 against 0.056, but 8192 0.0519 against 0.0489.
template <typename T> bool packed_tiles_knob() {
  int64_t on = sizeof(T) == 2 ? 1 : 0;
  env_knob("FASTDL_CUDA_PACKED_TILES", 0, 1, &on);
  return on == 1;
}

// The split a launch takes: split_for's, or none when the caller gave too little workspace.
template <typename T>
cudaError_t plan_split(int64_t rows, int64_t cols, const void* workspace, size_t workspace_bytes, Split* split) {
  const cudaError_t err = split_for<T>(rows, cols, split);
  if (err != cudaSuccess || workspace == nullptr || workspace_bytes < split_bytes<T>(rows, *split))
    *split = Split{1, cols};
  return err;
}

// y in Y: x's T, or the accumulation type (a 16-bit x's softmax written in fp32, the cast
// CUDA autocast and torch.softmax(x, dtype=float32) make fused). Such a mixed call takes
// the tile, block and split kernels (laid out by T's vectors), not the packed ones, and
// moves 16 bytes at a time in the kernels that walk rows in steps only when every row
// is 16-byte aligned.
template <typename T, typename Y, bool kLog>
cudaError_t forward(const T* x, Y* y, int64_t rows, int64_t cols, int64_t x_row_stride, void* workspace,
                    size_t workspace_bytes, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  constexpr bool kMixed = !std::is_same_v<T, Y>;
  // the output's row stride is cols. Tiles move 16 bytes on aligned rows; the kernels that walk
  // rows in steps also on rows equally far off (a ragged head and tail an element a thread)
  const bool aligned = rows_aligned<T>(x, x_row_stride) && rows_aligned<Y>(y, cols);
  const bool step_vectors = kMixed ? aligned : rows_share_alignment<T>({{x, x_row_stride}, {y, cols}});
  if constexpr (!kMixed && sizeof(T) <= 4) {
    if (step_vectors && packed_tiles_knob<T>() && with_packed_block(cols, [&](auto threads) {
          constexpr int kThreads = decltype(threads)::value;
          softmax_forward_packed_kernel<T, kThreads, kPackedBlockElems, kLog>
              <<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, y, static_cast<int>(cols), x_row_stride);
        }))
      return cudaGetLastError();
  }
  const bool tiled = with_tile<T>(cols, [&](auto threads, auto elems) {
    constexpr int kThreads = decltype(threads)::value, kElems = decltype(elems)::value;
    softmax_forward_tile_kernel<T, Y, kThreads, kElems, kLog>
        <<<tile_grid<kThreads>(rows), kTileBlockThreads<kThreads>, 0, stream>>>(x, y, rows, cols, x_row_stride,
                                                                                    aligned);
  });
  if (tiled) return cudaGetLastError();
  // long rows; cols <= INT_MAX here (sizes_supported)
  const int c = static_cast<int>(cols);
  Split split{1, cols};
  if (const cudaError_t err = plan_split<T>(rows, cols, workspace, workspace_bytes, &split); err != cudaSuccess)
    return err;
  // enough rows to fill the device, on 16-byte boundaries: held in registers when they fit
  if constexpr (!kMixed) {
    if (split.chunks == 1 && step_vectors && with_packed_tile<kMaxPackedElems<T, kLog>>(cols, [&](auto elems) {
          constexpr int kElems = decltype(elems)::value;
          softmax_forward_packed_kernel<T, kPackedThreads, kElems, kLog>
              <<<static_cast<unsigned>(rows), kPackedThreads, 0, stream>>>(x, y, c, x_row_stride);
        }))
      return cudaGetLastError();
  }
  const int chunk_cols = static_cast<int>(split.chunk_cols);  // <= cols
  auto* stats = static_cast<MaxSum<A>*>(workspace);
  with_vec<T>(step_vectors, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    if (split.chunks > 1) {
      softmax_forward_chunk_stats_kernel<T, kVec>
          <<<split.grid(rows), kBlockThreads, 0, stream>>>(x, stats, c, chunk_cols, x_row_stride);
      softmax_forward_chunk_write_kernel<T, Y, kLog, kVec>
          <<<split.grid(rows), kBlockThreads, 0, stream>>>(x, stats, y, c, chunk_cols, x_row_stride);
    } else {
      softmax_forward_block_kernel<T, Y, kLog, kVec>
          <<<loop_grid(rows), kBlockThreads, 0, stream>>>(x, y, rows, c, x_row_stride);
    }
  });
  return cudaGetLastError();
}

// dy and y in D: dx's T, or the accumulation type (the gradient of a mixed forward, dx
// written in the 16-bit x's dtype); mixed calls run as mixed forwards do.
template <typename T, typename D, bool kLog>
cudaError_t backward(const D* dy, const D* y, T* dx, int64_t rows, int64_t cols, int64_t dy_row_stride,
                     int64_t y_row_stride, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  constexpr bool kMixed = !std::is_same_v<T, D>;
  const bool aligned = rows_aligned<D>(dy, dy_row_stride) && rows_aligned<D>(y, y_row_stride) &&
                       rows_aligned<T>(dx, cols);
  const bool step_vectors =
      kMixed ? aligned : rows_share_alignment<T>({{dy, dy_row_stride}, {y, y_row_stride}, {dx, cols}});
  if constexpr (!kMixed && sizeof(T) <= 4) {
    if (step_vectors && packed_tiles_knob<T>() && with_packed_block(cols, [&](auto threads) {
          constexpr int kThreads = decltype(threads)::value;
          softmax_backward_packed_kernel<T, kThreads, kPackedBlockElems, kLog>
              <<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(dy, y, dx, static_cast<int>(cols), dy_row_stride,
                                                                     y_row_stride);
        }))
      return cudaGetLastError();
  }
  const bool tiled = with_tile<T>(cols, [&](auto threads, auto elems) {
    constexpr int kThreads = decltype(threads)::value, kElems = decltype(elems)::value;
    softmax_backward_tile_kernel<T, D, kThreads, kElems, kLog>
        <<<tile_grid<kThreads>(rows), kTileBlockThreads<kThreads>, 0, stream>>>(
            dy, y, dx, rows, cols, dy_row_stride, y_row_stride, aligned);
  });
  if (tiled) return cudaGetLastError();
  const int c = static_cast<int>(cols);
  Split split{1, cols};
  if (const cudaError_t err = plan_split<T>(rows, cols, workspace, workspace_bytes, &split); err != cudaSuccess)
    return err;
  // enough rows to fill the device, on 16-byte boundaries or equally off them: one input held
  if constexpr (!kMixed) {
    if (split.chunks == 1 && step_vectors && with_packed_tile<kMaxPackedElems<T, kLog>>(cols, [&](auto elems) {
          constexpr int kElems = decltype(elems)::value;
          softmax_backward_packed_kernel<T, kPackedThreads, kElems, kLog>
              <<<static_cast<unsigned>(rows), kPackedThreads, 0, stream>>>(dy, y, dx, c, dy_row_stride, y_row_stride);
        }))
      return cudaGetLastError();
  }
  const int chunk_cols = static_cast<int>(split.chunk_cols);  // <= cols
  auto* dots = static_cast<A*>(workspace);
  with_vec<T>(step_vectors, [&](auto vec) {
    constexpr int kVec = decltype(vec)::value;
    if (split.chunks > 1) {
      softmax_backward_chunk_dot_kernel<T, D, kLog, kVec>
          <<<split.grid(rows), kBlockThreads, 0, stream>>>(dy, y, dots, c, chunk_cols, dy_row_stride, y_row_stride);
      softmax_backward_chunk_write_kernel<T, D, kLog, kVec><<<split.grid(rows), kBlockThreads, 0, stream>>>(
          dy, y, dots, dx, c, chunk_cols, dy_row_stride, y_row_stride);
    } else {
      softmax_backward_block_kernel<T, D, kLog, kVec><<<loop_grid(rows), kBlockThreads, 0, stream>>>(
          dy, y, dx, rows, c, dy_row_stride, y_row_stride);
    }
  });
  return cudaGetLastError();
}

// Grid limits: one block per row (block kernels), at most one per row (tile kernels).
bool sizes_supported(int64_t rows, int64_t cols) { return rows <= INT_MAX && cols <= INT_MAX; }

template <typename T, typename Y>
cudaError_t forward_typed(const void* x, void* y, int64_t rows, int64_t cols, int64_t stride, bool log,
                          void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const T* xp = static_cast<const T*>(x);
  Y* yp = static_cast<Y*>(y);
  return log ? forward<T, Y, true>(xp, yp, rows, cols, stride, workspace, workspace_bytes, stream)
             : forward<T, Y, false>(xp, yp, rows, cols, stride, workspace, workspace_bytes, stream);
}

template <typename T, typename D>
cudaError_t backward_typed(const void* dy, const void* y, void* dx, int64_t rows, int64_t cols, int64_t dy_stride,
                           int64_t y_stride, bool log, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const D* dyp = static_cast<const D*>(dy);
  const D* yp = static_cast<const D*>(y);
  T* dxp = static_cast<T*>(dx);
  return log ? backward<T, D, true>(dyp, yp, dxp, rows, cols, dy_stride, y_stride, workspace, workspace_bytes, stream)
             : backward<T, D, false>(dyp, yp, dxp, rows, cols, dy_stride, y_stride, workspace, workspace_bytes, stream);
}

template <typename T> cudaError_t workspace_bytes_typed(int64_t rows, int64_t cols, size_t* bytes) {
  Split split{1, cols};
  const cudaError_t err = split_for<T>(rows, cols, &split);
  *bytes = split_bytes<T>(rows, split);
  return err;
}

}  // namespace

#define FASTDL_DTYPE_CASES(CALL)             \
  case DType::kFloat32: return CALL(float);  \
  case DType::kFloat16: return CALL(__half); \
  case DType::kBFloat16: return CALL(__nv_bfloat16); \
  case DType::kFloat64: return CALL(double);

cudaError_t softmax_workspace_bytes(DType dtype, int64_t rows, int64_t cols, size_t* bytes) {
  *bytes = 0;
  if (rows == 0 || cols == 0 || !sizes_supported(rows, cols)) return cudaSuccess;
#define FASTDL_CALL(T) workspace_bytes_typed<T>(rows, cols, bytes)
  switch (dtype) { FASTDL_DTYPE_CASES(FASTDL_CALL) }
#undef FASTDL_CALL
  return cudaErrorInvalidValue;
}

// x's (dx's) dtype T and y's (dy's) dtype: T itself, or float beside a 16-bit T; any other pair
// is refused.
#define FASTDL_MIXED_CASES(CALL)                                                                          \
  case DType::kFloat16: return other == DType::kFloat32 ? CALL(__half, float) : CALL(__half, __half);   \
  case DType::kBFloat16:                                                                                   \
    return other == DType::kFloat32 ? CALL(__nv_bfloat16, float) : CALL(__nv_bfloat16, __nv_bfloat16);  \
  case DType::kFloat32: return CALL(float, float);                                                        \
  case DType::kFloat64: return CALL(double, double);

namespace {
bool valid_pair(DType dtype, DType other) {
  return other == dtype || (other == DType::kFloat32 && (dtype == DType::kFloat16 || dtype == DType::kBFloat16));
}
}  // namespace

cudaError_t softmax_forward(DType dtype, DType out_dtype, const void* x, void* y, int64_t rows, int64_t cols,
                            int64_t x_row_stride, bool log, void* workspace, size_t workspace_bytes,
                            cudaStream_t stream) {
  if (!valid_pair(dtype, out_dtype)) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (!sizes_supported(rows, cols)) return cudaErrorInvalidValue;
  const DType other = out_dtype;
#define FASTDL_CALL(T, Y) forward_typed<T, Y>(x, y, rows, cols, x_row_stride, log, workspace, workspace_bytes, stream)
  switch (dtype) { FASTDL_MIXED_CASES(FASTDL_CALL) }
#undef FASTDL_CALL
  return cudaErrorInvalidValue;
}

cudaError_t softmax_backward(DType dtype, DType grad_in_dtype, const void* grad_out, const void* out,
                             void* grad_in, int64_t rows, int64_t cols, int64_t grad_out_row_stride,
                             int64_t out_row_stride, bool log, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) {
  if (!valid_pair(grad_in_dtype, dtype)) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (!sizes_supported(rows, cols)) return cudaErrorInvalidValue;
  const DType other = dtype;
#define FASTDL_CALL(T, D)                                                                                 \
  backward_typed<T, D>(grad_out, out, grad_in, rows, cols, grad_out_row_stride, out_row_stride, log, workspace, \
                       workspace_bytes, stream)
  switch (grad_in_dtype) { FASTDL_MIXED_CASES(FASTDL_CALL) }
#undef FASTDL_CALL
  return cudaErrorInvalidValue;
}

#undef FASTDL_MIXED_CASES
#undef FASTDL_DTYPE_CASES

}  // namespace fastdl::kernels
