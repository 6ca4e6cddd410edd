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
#include <climits>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "common/env.h"
#include "common/reduce.cuh"

namespace fastdl::kernels {

// Element k of a 16-byte vector of U held as 32-bit words (a uint4): RowTile::Raw's and
// PackedRowTile's rows. Words, not an array of U, which the compiler keeps one 16-bit element to a
// register (twice the registers, and a vector loaded in a branch unpacked, so waited for, there).
template <typename U> __device__ __forceinline__ U vec_element(const uint4& vec, int k) {
  if constexpr (sizeof(U) <= 4) {
    constexpr int kPerWord = 4 / static_cast<int>(sizeof(U));
    const int w = k / kPerWord;
    const unsigned word = w == 0 ? vec.x : w == 1 ? vec.y : w == 2 ? vec.z : vec.w;
    U elements[kPerWord];
    memcpy(elements, &word, sizeof word);
    return elements[k % kPerWord];
  } else {  // 8-byte elements: two a vector
    U elements[2];
    memcpy(elements, &vec, sizeof vec);
    return elements[k];
  }
}

// kVec elements of U at p as they lie in memory, to convert later (convert_vec_raw): one 16-byte
// vector as 32-bit words (p 16-byte aligned), or one element (kVec = 1). A kernel that loads
// several steps before it works on any holds them so, half the registers of 16-bit values
// converted.
template <int kVec, typename U> __device__ __forceinline__ auto load_vec_raw(const U* p) {
  if constexpr (kVec == 1) {
    return *p;
  } else {
    static_assert(kVec * sizeof(U) == sizeof(uint4), "one 16-byte vector");
    FASTDL_CHECK_ALIGNED(p, kVecBytes);
    return *reinterpret_cast<const uint4*>(p);
  }
}
// load_vec_raw's kVec elements of U, converted to A.
template <typename U, int kVec, typename Raw, typename A>
__device__ __forceinline__ void convert_vec_raw(const Raw& raw, A (&out)[kVec]) {
  if constexpr (kVec == 1) {
    out[0] = to_acc(raw);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = to_acc(vec_element<U>(raw, k));
  }
}

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
        FASTDL_CHECK_ALIGNED(row + c0, kVecBytes);
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

  // load in two steps, for a kernel that reads several rows (x and dy, a next row): load_raw
  // reads this thread's kElems values of a row of U as they lie in memory, convert turns them
  // into the accumulation type, and the kernel calls load_raw for every row before it converts
  // any, so that all their loads are in flight at once. load converts each pack inside its
  // branch (whole vector, or element by element), so the warp waits for that load before it
  // issues the next: the norm backward tile waited for x, then dy, then its mean and rstd, a
  // DRAM latency each, every row (sm_90a SASS, 2b1309b). load stays as it is for the kernels
  // that read one row: built on these, some took 3-4 more registers a thread.
  // Held as 32-bit words, 16 bytes at a time (vec_element).
  template <typename U> struct Raw {
    uint4 vectors[kElems * static_cast<int>(sizeof(U)) / kVecBytes];
  };

  // load_raw: `fill` (a U) where a column is past `cols`.
  template <typename U>
  __device__ static __forceinline__ void load_raw(const U* row, int t, int64_t cols, bool aligned, Raw<U>& out,
                                                  U fill) {
    // kPack elements of U are a whole number of 16-byte vectors (U is at least as wide as T)
    constexpr int kVectors = kPack * static_cast<int>(sizeof(U)) / kVecBytes;
    static_assert(kVectors * kVecBytes == kPack * static_cast<int>(sizeof(U)), "packs of whole vectors");
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int64_t c0 = pack_col(t, p);
      uint4* dst = out.vectors + p * kVectors;
      if (aligned && c0 + kPack <= cols) {
        FASTDL_CHECK_ALIGNED(row + c0, kVecBytes);
        const uint4* src = reinterpret_cast<const uint4*>(row + c0);
#pragma unroll
        for (int v = 0; v < kVectors; ++v) dst[v] = src[v];
      } else {
#pragma unroll
        for (int v = 0; v < kVectors; ++v) {
          U elements[Vec<U>::kSize];
#pragma unroll
          for (int k = 0; k < Vec<U>::kSize; ++k) {
            const int64_t c = c0 + v * Vec<U>::kSize + k;
            elements[k] = c < cols ? row[c] : fill;
          }
          memcpy(&dst[v], elements, sizeof dst[v]);
        }
      }
    }
  }

  // Value i of a Raw is column col(t, i), converted to A.
  template <typename U, typename A>
  __device__ static __forceinline__ void convert(const Raw<U>& in, A (&out)[kElems]) {
#pragma unroll
    for (int i = 0; i < kElems; ++i) out[i] = to_acc(vec_element<U>(in.vectors[i / Vec<U>::kSize], i % Vec<U>::kSize));
  }

  // Writes this thread's values (columns < cols) to a row of U (the row's T; the
  // accumulation type: a norm of 16-bit x written in fp32; or a 16-bit type beside float
  // rows, a pack in one NarrowPack move, the row aligned to its size), rounded to U.
  template <typename U, typename A>
  __device__ static __forceinline__ void store(U* row, int t, int64_t cols, bool aligned, const A (&in)[kElems]) {
#pragma unroll
    for (int p = 0; p < kPacks; ++p) {
      const int64_t c0 = pack_col(t, p);
      const A* src = in + p * kPack;
      if (aligned && c0 + kPack <= cols) {
        store_packed<kPack>(row + c0, src);
      } else {
#pragma unroll
        for (int k = 0; k < kPack; ++k)
          if (c0 + k < cols) row[c0 + k] = from_acc<U>(src[k]);
      }
    }
  }
};

// A row held as it is in memory: this thread's kElems values of T (RowTile's columns) as
// 16-byte vectors of raw 32-bit words, converted to the accumulation type where used. For
// rows too long to hold converted: 64 halves a thread are 32 registers, 64 floats would be
// all a 1024-thread block has. Words, not arrays of T: the compiler keeps 16-bit elements
// one to a register, which would double the registers again. Rows 16-byte aligned, of a
// whole number of vectors (cols % kPack == 0: an aligned contiguous output's rows are), so a
// vector is all in the row or all past its end.
template <typename T, int kThreads, int kElems> struct PackedRowTile {
  using Layout = RowTile<T, kThreads, kElems>;
  static constexpr int kPack = Layout::kPack;
  static constexpr int kPerWord = 4 / static_cast<int>(sizeof(T));
  static_assert(kPerWord >= 1, "elements of at most 4 bytes");
  static_assert(static_cast<int64_t>(kThreads) * kElems <= INT32_MAX, "int columns");
  uint4 packs[Layout::kPacks];

  // First column of pack p of thread t.
  __device__ static __forceinline__ int pack_col(int t, int p) { return (p * kThreads + t) * kPack; }

  // Calls f(p, col) for each pack p of thread t that lies in the row (a pack is all in the row
  // or all past its end), col its first column.
  template <typename F> __device__ static __forceinline__ void for_each_pack(int t, int cols, F&& f) {
#pragma unroll
    for (int p = 0; p < Layout::kPacks; ++p) {
      const int col = pack_col(t, p);
      if (col < cols) f(p, col);
    }
  }

  // This thread's values of the row; `fill` past `cols`.
  __device__ __forceinline__ void load(const T* row, int t, int cols, T fill) {
    T fills[kPerWord];
#pragma unroll
    for (int k = 0; k < kPerWord; ++k) fills[k] = fill;
    unsigned fill_word;
    memcpy(&fill_word, fills, sizeof fill_word);
#pragma unroll
    for (int p = 0; p < Layout::kPacks; ++p) {
      if (pack_col(t, p) < cols) FASTDL_CHECK_ALIGNED(row + pack_col(t, p), sizeof(uint4));
      packs[p] = pack_col(t, p) < cols ? *reinterpret_cast<const uint4*>(row + pack_col(t, p))
                                       : make_uint4(fill_word, fill_word, fill_word, fill_word);
    }
  }

  // Element k of a pack, converted.
  __device__ static __forceinline__ auto element(const uint4& pack, int k) { return to_acc(vec_element<T>(pack, k)); }

  // Value i of this thread, converted.
  __device__ __forceinline__ auto value(int i) const { return element(packs[i / kPack], i % kPack); }

  // Call between two sweeps over value(): the compiler must take the words as changed here
  // (an empty volatile asm, no instruction), so the next sweep converts them again rather
  // than keep every value converted by the last one, twice the registers.
  __device__ __forceinline__ void reconvert_after_here() {
#if defined(__CUDA_ARCH__)
#pragma unroll
    for (int p = 0; p < Layout::kPacks; ++p)
      asm volatile("" : "+r"(packs[p].x), "+r"(packs[p].y), "+r"(packs[p].z), "+r"(packs[p].w));
#endif
  }

  // The sum of f(value, other) over this thread's columns < cols, `other` the value at the
  // same column of row `other_row` (16-byte aligned; read a pack at a time, not kept).
  template <typename A, typename F>
  __device__ __forceinline__ A sum_with(const T* other_row, int t, int cols, F&& f) const {
    A total = 0;
    for_each_pack(t, cols, [&](int p, int col) {
      FASTDL_CHECK_ALIGNED(other_row + col, sizeof(uint4));
      const uint4 other = *reinterpret_cast<const uint4*>(other_row + col);
#pragma unroll
      for (int k = 0; k < kPack; ++k) total += f(element(packs[p], k), element(other, k));
    });
    return total;
  }

  // Writes f(value) for each of this thread's columns < cols to a row of T, rounded to T.
  template <typename F> __device__ __forceinline__ void store(T* row, int t, int cols, F&& f) const {
    store_packs(row, t, cols, [&](const uint4& pack, int, Vec<T>& out) {
#pragma unroll
      for (int k = 0; k < kPack; ++k) out.v[k] = from_acc<T>(f(element(pack, k)));
    });
  }

  // store with f(value, other), `other` the value at the same column of row `other_row`
  // (read as in sum_with).
  template <typename F>
  __device__ __forceinline__ void store_with(const T* other_row, T* row, int t, int cols, F&& f) const {
    store_packs(row, t, cols, [&](const uint4& pack, int col, Vec<T>& out) {
      FASTDL_CHECK_ALIGNED(other_row + col, sizeof(uint4));
      const uint4 other = *reinterpret_cast<const uint4*>(other_row + col);
#pragma unroll
      for (int k = 0; k < kPack; ++k) out.v[k] = from_acc<T>(f(element(pack, k), element(other, k)));
    });
  }

 private:
  // fill(pack, col, out) makes the 16 bytes written for the pack at column col, for each
  // pack before cols.
  template <typename Fill> __device__ __forceinline__ void store_packs(T* row, int t, int cols, Fill&& fill) const {
#if defined(__CUDA_ARCH__)
    asm volatile("" : "+r"(t), "+r"(cols));  // addresses worked out here, not kept from the load
#endif
    for_each_pack(t, cols, [&](int p, int col) {
      uint4 pack = packs[p];
#if defined(__CUDA_ARCH__)
      asm volatile("" : "+r"(pack.x), "+r"(pack.y), "+r"(pack.z), "+r"(pack.w));  // a pack at a time
#endif
      Vec<T> out;
      fill(pack, col, out);
      FASTDL_CHECK_ALIGNED(row + col, kVecBytes);
      *reinterpret_cast<Vec<T>*>(row + col) = out;
    });
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

// Rows that are equally far off a 16-byte boundary: row r of every tensor, given as (base,
// row stride in elements) pairs, starts as many elements past one as row r of the first.
// Rows of 50257 fp16 values (a GPT-2 vocabulary), contiguous, are such rows: only the first
// is 16-byte aligned, but x's row r and y's row r are off by the same amount. The kernels
// that walk rows in steps then cut every row alike (for_row_pieces) and still move 16 bytes
// at a time. Aligned rows (rows_aligned) are the case where all are 0 elements off.
template <typename T> inline bool rows_share_alignment(std::initializer_list<std::pair<const void*, int64_t>> rows) {
  const auto first = reinterpret_cast<uintptr_t>(rows.begin()->first);
  const int64_t first_stride = rows.begin()->second;
  for (const auto& [base, stride] : rows) {
    const auto address = reinterpret_cast<uintptr_t>(base);
    // (unsigned difference: a multiple of 16 exactly when the addresses agree modulo 16)
    if (address % sizeof(T) != 0 || (address - first) % kVecBytes != 0 || (stride - first_stride) % Vec<T>::kSize != 0)
      return false;
  }
  return true;
}

// Elements of T from `row` to its first 16-byte boundary (kVec of T a vector), at most n: the
// ragged head of a row that starts off a boundary (0 for one that starts on it).
template <int kVec, typename T, typename I> __device__ __forceinline__ I ragged_head(const T* row, I n) {
  const I off = static_cast<I>(reinterpret_cast<uintptr_t>(row) / sizeof(T) % kVec);
  return (kVec - off) % kVec < n ? (kVec - off) % kVec : n;
}

// A row cut for the packed kernels, which hold its whole 16-byte vectors (PackedRowTile from
// column head on, vec_cols of them) and give each of the fewer than kVec columns before the
// first vector (the head) and after the last (the tail) to one thread as one more value:
// threads 0.. take the head's columns, the next ones the tail's. edge_col: thread t's ragged
// column, -1 for none.
struct RaggedRow {
  int head, vec_cols, edge_col;
};
template <int kVec, typename T> __device__ __forceinline__ RaggedRow ragged_row(const T* row, int cols, int t) {
  const int head = ragged_head<kVec>(row, cols);
  const int vec_cols = (cols - head) / kVec * kVec;
  const int tail = cols - head - vec_cols;
  return {head, vec_cols, t < head ? t : t < head + tail ? head + vec_cols + (t - head) : -1};
}

// How a block of kThreads threads cuts the columns [begin, end) of `row` (for_row_pieces): whole
// 16-byte vectors over [vec_begin, vec_end), from the first column on a 16-byte boundary on,
// kThreads * kVec columns a step; the fewer than kVec columns before them (the head) and after
// the last whole vector (the tail) one a thread (edge_col). With kVec = 1 every column is in
// the steps.
struct RowCut {
  int64_t head, vec_begin, vec_end;
};
template <int kVec, typename T> __device__ __forceinline__ RowCut row_cut(const T* row, int64_t begin, int64_t end) {
  if constexpr (kVec == 1) {
    return {0, begin, end};
  } else {
    const int64_t head = ragged_head<kVec>(row + begin, end - begin);
    const int64_t vec_begin = begin + head;
    return {head, vec_begin, vec_begin + (end - vec_begin) / kVec * kVec};
  }
}
// This thread's column of the head or the tail, -1 for none: threads 0.. take the head's
// columns, the next ones the tail's.
__device__ __forceinline__ int64_t edge_col(const RowCut& cut, int64_t begin, int64_t end) {
  const int64_t edge = threadIdx.x;
  return edge < cut.head ? begin + edge : edge < cut.head + (end - cut.vec_end) ? cut.vec_end + (edge - cut.head) : -1;
}

// Calls f(col, std::integral_constant<int, n>{}) for this thread's pieces of the columns
// [begin, end) of `row` (row_cut): n = kVec for the whole 16-byte vectors, n = 1 for its column
// of the head or the tail. Tensors whose rows share `row`'s alignment (rows_share_alignment) are
// cut the same way.
template <int kThreads, int kVec, typename T, typename F>
__device__ __forceinline__ void for_row_pieces(const T* row, int64_t begin, int64_t end, F&& f) {
  static_assert(kThreads >= 2 * kVec, "a thread for each column of the head and the tail");
  constexpr int64_t kStep = static_cast<int64_t>(kThreads) * kVec;
  const RowCut cut = row_cut<kVec>(row, begin, end);
  for (int64_t col = cut.vec_begin + threadIdx.x * kVec; col < cut.vec_end; col += kStep)
    f(col, std::integral_constant<int, kVec>{});
  if constexpr (kVec > 1) {
    const int64_t edge = edge_col(cut, begin, end);
    if (edge >= 0) f(edge, std::integral_constant<int, 1>{});
  }
}

// for_row_pieces for a walk whose every step loads and then works on what it loaded, where the
// work would hold the next load back (a branch, a long chain): load(col, n) does the loads and
// returns what they gave, use(that, n, col) the rest. The steps go kUnroll at a time, all their loads
// issued before the first use; a step past the end loads the first step's columns again, for
// no use, so that no load sits in a branch. (Stepped as for_row_pieces, block_max_sum's steps
// went one 16-byte load in flight a thread: nvcc issued each after the step before, sm_90a SASS.)
template <int kThreads, int kVec, int kUnroll, typename T, typename Load, typename Use>
__device__ __forceinline__ void for_row_pieces_ahead(const T* row, int64_t begin, int64_t end, Load&& load, Use&& use) {
  using Step = std::integral_constant<int, kVec>;
  constexpr int64_t kStep = static_cast<int64_t>(kThreads) * kVec;
  static_assert(kThreads >= 2 * kVec, "a thread for each column of the head and the tail");
  const RowCut cut = row_cut<kVec>(row, begin, end);
  for (int64_t col0 = cut.vec_begin + threadIdx.x * kVec; col0 < cut.vec_end; col0 += kUnroll * kStep) {
    decltype(load(col0, Step{})) held[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) held[u] = load(col0 + u * kStep < cut.vec_end ? col0 + u * kStep : col0, Step{});
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (u == 0 || col0 + u * kStep < cut.vec_end) use(held[u], Step{}, col0 + u * kStep);
  }
  if constexpr (kVec > 1) {
    using Edge = std::integral_constant<int, 1>;
    const int64_t edge = edge_col(cut, begin, end);
    if (edge >= 0) use(load(edge, Edge{}), Edge{}, edge);
  }
}

// Calls launch(std::integral_constant<int, kVec>{}): 16-byte vectors of T when the rows are
// aligned (or, for for_row_pieces, share their alignment), else one element at a time. For
// the kernels that walk a row in steps.
template <typename T, typename F> void with_vec(bool aligned, F&& launch) {
  if (aligned) launch(std::integral_constant<int, Vec<T>::kSize>{});
  else launch(std::integral_constant<int, 1>{});
}

// The packed kernels at the tiles' lengths (norm forward and backward, softmax forward): a row
// from 2049 columns held as it is in memory, kPackedBlockElems values a thread, by a block of
// the fewest of 128, 256 and 512 threads that hold it (shorter rows take the warp tiles, a few
// registers a thread). Calls launch(std::integral_constant<int, kThreads>{}); false for rows
// outside 2049-16384 columns.
constexpr int kPackedBlockElems = 32;
constexpr int64_t kPackedBlockMinCols = 2049;
template <typename F> bool with_packed_block(int64_t cols, F&& launch) {
  if (cols < kPackedBlockMinCols) return false;
  bool launched = false;
  auto try_threads = [&](auto threads) {
    if (!launched && cols <= static_cast<int64_t>(decltype(threads)::value) * kPackedBlockElems) {
      launch(threads);
      launched = true;
    }
  };
  try_threads(std::integral_constant<int, 128>{});
  try_threads(std::integral_constant<int, 256>{});
  try_threads(std::integral_constant<int, 512>{});
  return launched;
}

// Values a thread of a tile holds before the tile takes more threads: the launch-time knob
// FASTDL_CUDA_TILE_ELEMS (8, 16 or 32; python -m fastdl.bench.tune sweeps it), or 0 when it is
// unset, for the default order of with_row_tile.
inline int64_t tile_elems_knob() {
  int64_t elems = 0;
  return env_knob("FASTDL_CUDA_TILE_ELEMS", 0, 32, &elems) ? elems : 0;
}

// Calls launch(std::integral_constant<int, kThreads>{}, std::integral_constant<int, kElems>{})
// with the first tile that holds `cols` columns, among tiles of at most kMaxThreads threads,
// kMaxElems values a thread and kMaxCols columns; false when none holds the row. Threads
// are 32 (a warp), 128, 256, 512 or 1024, values a thread 8, 16 or 32: the fewest threads
// whose tile holds the row with at most tile_elems values a thread; rows longer than all of
// those, the fewest values a thread that hold it, then the fewest threads. More values a
// thread means more bytes in flight per thread and smaller reductions, fewer means more
// threads to hide latency: which wins depends on the GPU, so the tuner times it. tile_elems
// 0 (the default) is 16 without the 256-thread tiles: a warp, 128 and 512 threads with 8
// then 16 values a thread, then 1024 x 16.
// Only the tiles allowed are instantiated; the longest row a tile takes is always kMaxCols
// (the largest tile's), whatever the order.
template <int kMaxThreads, int kMaxElems, int64_t kMaxCols, typename F>
bool with_row_tile(int64_t cols, int64_t tile_elems, F&& launch) {
  bool launched = false;
  auto try_tile = [&](auto threads, auto elems, bool allowed) {
    constexpr int kThreads = decltype(threads)::value, kElems = decltype(elems)::value;
    constexpr int64_t kCols = static_cast<int64_t>(kThreads) * kElems;
    if constexpr (kThreads <= kMaxThreads && kElems <= kMaxElems && kCols <= kMaxCols) {
      if (!launched && allowed && cols <= kCols) {
        launch(threads, elems);
        launched = true;
      }
    }
  };
  using std::integral_constant;
  using T32 = integral_constant<int, 32>;
  using T128 = integral_constant<int, 128>;
  using T256 = integral_constant<int, 256>;
  using T512 = integral_constant<int, 512>;
  using T1024 = integral_constant<int, 1024>;
  using E8 = integral_constant<int, 8>;
  using E16 = integral_constant<int, 16>;
  using E32 = integral_constant<int, 32>;
  const bool by_default = tile_elems < 8;
  if (by_default) tile_elems = 16;
  auto by_threads = [&](auto threads, bool allowed) {
    try_tile(threads, E8{}, allowed);
    try_tile(threads, E16{}, allowed && tile_elems >= 16);
    try_tile(threads, E32{}, allowed && tile_elems >= 32);
  };
  by_threads(T32{}, true);
  by_threads(T128{}, true);
  by_threads(T256{}, !by_default);
  by_threads(T512{}, true);
  by_threads(T1024{}, true);  // its x 8 never wins by default: 512 x 16 holds as many columns
  auto by_elems = [&](auto elems) {
    try_tile(T32{}, elems, true);
    try_tile(T128{}, elems, true);
    try_tile(T256{}, elems, true);
    try_tile(T512{}, elems, true);
    try_tile(T1024{}, elems, true);
  };
  by_elems(E16{});
  by_elems(E32{});
  return launched;
}

}  // namespace fastdl::kernels
