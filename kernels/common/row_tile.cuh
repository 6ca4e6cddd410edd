// A row held in registers by a group of threads, for row kernels whose row fits on chip
// (softmax, layer norm). No torch here.
//
// A group of kThreads threads (one warp, or a whole block) shares a row; each thread
// holds kElems values of it, in packs of kPack consecutive elements, kPack being one
// 16-byte vector of the row's element type T (8 halves, 4 floats, 2 doubles). Pack p of
// thread t covers columns [(p * kThreads + t) * kPack, ... + kPack): the threads of a
// warp load consecutive 16-byte vectors, so every load instruction is fully coalesced
// and moves 16 bytes a thread.
//
// A pack that runs past the row end is moved element by element, as is every pack when
// the launch is not `aligned` (some row start is not on a 16-byte boundary).
#pragma once
#include <type_traits>

#include "common/reduce.cuh"

namespace fastdl::kernels {

template <typename T, int kThreads, int kElems> struct RowTile {
  static constexpr int kPack = Vec<T>::kSize;
  static_assert(kElems % kPack == 0, "a thread holds whole packs");
  static constexpr int kPacks = kElems / kPack;

  // First column of pack p of thread t.
  __device__ static __forceinline__ int64_t pack_col(int t, int p) {
    return (static_cast<int64_t>(p) * kThreads + t) * kPack;
  }
  // Column of value i of thread t.
  __device__ static __forceinline__ int64_t col(int t, int i) { return pack_col(t, i / kPack) + i % kPack; }

  // This thread's values of a row of U (the row's T, or the accumulation-type weights),
  // converted to A; `fill` where a column is past `cols`.
  template <typename U, typename A>
  __device__ static __forceinline__ void load(const U* row, int t, int64_t cols, bool aligned, A (&out)[kElems],
                                              A fill) {
    // kPack elements of U are a whole number of 16-byte vectors (U is at least as wide as T)
    constexpr int kVectors = kPack * static_cast<int>(sizeof(U)) / kVecBytes;
    static_assert(kVectors * kVecBytes == kPack * static_cast<int>(sizeof(U)), "packs of whole vectors");
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int64_t c0 = pack_col(t, p);
      A* dst = out + p * kPack;
      if (aligned && c0 + kPack <= cols) {
        const Vec<U>* src = reinterpret_cast<const Vec<U>*>(row + c0);
#pragma unroll
        for (int v = 0; v < kVectors; ++v) {
          const Vec<U> vec = src[v];
#pragma unroll
          for (int k = 0; k < Vec<U>::kSize; ++k) dst[v * Vec<U>::kSize + k] = to_acc(vec.v[k]);
        }
      } else {
#pragma unroll
        for (int k = 0; k < kPack; ++k) dst[k] = c0 + k < cols ? to_acc(row[c0 + k]) : fill;
      }
    }
  }

  // Writes this thread's values (columns < cols) to a row of T, rounded to T.
  template <typename A>
  __device__ static __forceinline__ void store(T* row, int t, int64_t cols, bool aligned, const A (&in)[kElems]) {
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int64_t c0 = pack_col(t, p);
      const A* src = in + p * kPack;
      if (aligned && c0 + kPack <= cols) {
        Vec<T> vec;
#pragma unroll
        for (int k = 0; k < kPack; ++k) vec.v[k] = from_acc<T>(src[k]);
        *reinterpret_cast<Vec<T>*>(row + c0) = vec;
      } else {
#pragma unroll
        for (int k = 0; k < kPack; ++k)
          if (c0 + k < cols) row[c0 + k] = from_acc<T>(src[k]);
      }
    }
  }
};

// Threads of a block running RowTile kernels with groups of kThreads: a warp-sized group
// runs several rows per block (one per warp), a larger group is the whole block.
template <int kThreads> constexpr int kTileBlockThreads = kThreads < 128 ? 128 : kThreads;

// The row of this thread's group when rows are dealt one per group: one per warp for warp
// groups, one per block for block groups. Threads past the last row may return at once:
// a warp group leaves whole (it reduces with shuffles only), and a block group never is
// past it (the grid has one block per row).
template <int kThreads> __device__ __forceinline__ int64_t tile_row() {
  return static_cast<int64_t>(blockIdx.x) * (kTileBlockThreads<kThreads> / kThreads) + threadIdx.x / kThreads;
}

inline bool ptr_aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

// 16-byte moves are allowed when every row start is 16-byte aligned: the base pointer
// and the row stride (elements of T) are. For a contiguous output the stride is cols.
template <typename T> inline bool rows_aligned(const void* base, int64_t row_stride) {
  return ptr_aligned(base) && row_stride % Vec<T>::kSize == 0;
}

// Calls launch(std::integral_constant<int, kVec>{}): 16-byte vectors of T when the rows are
// aligned, else one element at a time. For the kernels that walk a row in steps.
template <typename T, typename F> void with_vec(bool aligned, F&& launch) {
  if (aligned) launch(std::integral_constant<int, Vec<T>::kSize>{});
  else launch(std::integral_constant<int, 1>{});
}

// Calls launch(std::integral_constant<int, kThreads>{}, std::integral_constant<int, kElems>{})
// with the smallest tile that holds `cols` columns, among tiles of at most kMaxThreads
// threads and kMaxElems values a thread; false when none holds the row. Tiles, smallest
// first: a warp, 128 and 512 threads with 8 then 16 values a thread, then 1024 x 16.
// Only the tiles allowed are instantiated.
template <int kMaxThreads, int kMaxElems, typename F> bool with_row_tile(int64_t cols, F&& launch) {
  bool launched = false;
  auto try_tile = [&](auto threads, auto elems) {
    constexpr int kThreads = decltype(threads)::value, kElems = decltype(elems)::value;
    if constexpr (kThreads <= kMaxThreads && kElems <= kMaxElems) {
      if (!launched && cols <= static_cast<int64_t>(kThreads) * kElems) {
        launch(threads, elems);
        launched = true;
      }
    }
  };
  using std::integral_constant;
  try_tile(integral_constant<int, 32>{}, integral_constant<int, 8>{});
  try_tile(integral_constant<int, 32>{}, integral_constant<int, 16>{});
  try_tile(integral_constant<int, 128>{}, integral_constant<int, 8>{});
  try_tile(integral_constant<int, 128>{}, integral_constant<int, 16>{});
  try_tile(integral_constant<int, 512>{}, integral_constant<int, 8>{});
  try_tile(integral_constant<int, 512>{}, integral_constant<int, 16>{});
  try_tile(integral_constant<int, 1024>{}, integral_constant<int, 16>{});
  return launched;
}

}  // namespace fastdl::kernels
