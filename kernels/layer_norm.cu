// LayerNorm / RMSNorm (optionally fused with a residual add): CUDA C++ forward and
// backward. See fastdl/reference/layer_norm.py for the math.
//
// Three shapes of kernel, picked by row length (and, for the packed one, a knob):
//   * tile (rows up to 16384 columns forward, 8192 backward; half that for fp64): a warp
//     or a block holds its row in registers (common/row_tile.cuh: 16-byte loads, 8 to 32
//     values a thread forward, 8 or 16 backward). Forward: one read of x (and the residual), one write of y (and of
//     x + residual); the variance is taken from deviations from the mean, held in
//     registers (numerically safe, unlike sum of squares minus square of sums), the mean
//     corrected by their sum (corrected_variance: a constant row's norm is exactly 0).
//   * packed (16-bit rows of 2049 to 16384 columns, 16-byte aligned, no residual;
//     FASTDL_CUDA_PACKED_NORM=0 gives them the tile): a block of 128 to 512 threads holds its
//     row as it is in memory, 32 values a thread in 16 registers (common/row_tile.cuh's
//     PackedRowTile), converting where used. The tile kernel holds 16 values a thread
//     converted, in 45 registers at 1024 threads: one block a multiprocessor at 16384 columns.
//     H200, bf16, 4096 rows (tuner, 2b1309b): 4096 / 8192 / 16384 columns 0.0242 / 0.0405 /
//     0.0736 ms packed, 0.0322 / 0.0687 / 0.159 the tile (16384: 88% of the copy bandwidth,
//     torch.compile's 88%); 2049-4095 columns untimed.
//   * loop (longer rows), a block per row: sweep 1 writes x + residual (when fused) and
//     takes the row's mean and squared deviations in one pass (Welford's update a 16-byte
//     vector at a time, the threads' states combined as Chan et al.'s: common/reduce.cuh
//     MeanM2), or its sum of squares (RMS); sweep 2 normalises and writes. Two reads of the
//     row, not three (a sweep for the mean, one for the deviations from it, one to write).
//     Sweep 2 re-reads the row, from L2 only when few rows are in flight:
//     FASTDL_CUDA_LOOP_BLOCKS_PER_SM (common/occupancy.h loop_grid; unset, a block a row) has
//     fewer blocks walk the rows, as softmax's block kernels (timed on the H200 only before
//     sweep 2's stores were whole vectors: 1 / 2 / 4 an SM within 7% of a block a row). Each
//     thread touches the same columns in both sweeps, so the sum it wrote in sweep 1 is its own
//     to read back, no barrier.
//     Rows walked in 16-byte vectors (kVec elements a step), or one element at a time
//     when some row is not 16-byte aligned.
//
// Backward (xhat = normalised input, g = dy * weight, means over the row):
//     dx = rstd * (g - mean(g) - xhat * mean(g * xhat));  RMS drops mean(g)
//     dweight = sum over rows of dy * xhat,  dbias = sum over rows of dy
// One kernel computes dx and the parameter gradients together: the grid holds as many
// blocks as fill the device once, each walks its own run of rows, keeps the running
// dweight / dbias of its columns (registers in the tile kernel; dynamic shared memory in
// the loop kernel where it holds them, else its own row of the partial buffer) and ends
// with one partial row; a second kernel sums
// the partial rows in a fixed order (dweight's and dbias's in one launch). No atomics: two
// runs give bitwise-equal gradients, and dy and x are read once, not once more for the
// parameter gradients. For 16-bit rows past 2048 columns (FASTDL_CUDA_NORM_PARAM_KERNEL=1 for
// every row up to the limit below, 0 for none) the tile kernel writes dx alone
// (a row a block, as the forward, no running sums: 2 x kElems registers a thread fewer) and
// norm_param_grad_kernel sums the partial rows' blocks of rows, reading x and dy again (as
// PyTorch's and apex's CUDA backward do): at 4097-8192 columns the tile with its sums takes
// 118 registers at 512 threads, one block an SM walking its rows' loads one at a time. 16-bit
// rows of whole vectors from 2049 to 16384 columns (dy in x's dtype) then take the packed
// backward for dx (x and dy held as they are, as the packed forward holds x), and 16-bit rows
// of 8193-16384 columns that are not, the loop kernel without its sums.
//
// weight / bias come in the row's element type or the accumulation type (W): a 16-bit
// model's parameters are read as they are, with no conversion kernel before each call, and
// the backward writes dweight / dbias in W (summed in A, rounded once at the end).
//
// A 16-bit x beside an fp32 residual is normalised as their fp32 sum; the backward of such
// rows (fp32) also writes dx rounded to x's dtype (N, a second store of the values it holds),
// the 16-bit input's gradient: 18 bytes a value moved, where a cast of the fp32 dx after
// the backward would read it again (22).
#include <algorithm>
#include <climits>
#include <type_traits>
#include <utility>

#include "common/env.h"
#include "common/occupancy.h"
#include "common/reduce.cuh"
#include "common/row_tile.cuh"
#include "layer_norm.h"

namespace fastdl::kernels {
namespace {

constexpr int kLoopThreads = 1024;  // threads of the loop kernels (rows past the tiles)
// Largest tiles: forward 1024 threads x 16 values (or 512 x 32), backward 512 x 16 (it
// holds five values a column: x, dy, weight, and the running dweight and dbias, so no more
// than 16 a thread); fp64 holds half. The launch takes the first tile that holds the row
// (with_row_tile).
template <typename T> constexpr int kForwardMaxThreads = sizeof(T) == 8 ? 512 : 1024;
constexpr int kForwardMaxElems = 32;
template <typename T> constexpr int64_t kForwardMaxCols = static_cast<int64_t>(kForwardMaxThreads<T>) * 16;
constexpr int kBackwardMaxThreads = 512;
template <typename T> constexpr int kBackwardMaxElems = sizeof(T) == 8 ? 8 : 16;
template <typename T> constexpr int64_t kBackwardMaxCols = int64_t{kBackwardMaxThreads} * kBackwardMaxElems<T>;

// Call launch(threads, elems) with the tile for rows of `cols`; false past the tiles.
template <typename T, typename F> bool with_forward_tile(int64_t cols, F&& launch) {
  return with_row_tile<kForwardMaxThreads<T>, kForwardMaxElems, kForwardMaxCols<T>>(cols, tile_elems_knob(), launch);
}
template <typename T, typename F> bool with_backward_tile(int64_t cols, F&& launch) {
  return with_row_tile<kBackwardMaxThreads, kBackwardMaxElems<T>, kBackwardMaxCols<T>>(cols, tile_elems_knob(), launch);
}
// The param kernel (16-bit rows of 2049 columns on; FASTDL_CUDA_NORM_PARAM_KERNEL=1 every row
// up to kParamKernelMaxCols, 0 none): the tile backward writes dx alone, a row a block (or a
// warp group), and norm_param_grad_kernel sums dweight / dbias, reading x and dy again over
// blocks of columns x blocks of rows; else the tile's blocks sum them. Rows past the tiles keep
// the loop kernel either way. H200, bf16 fwd+bwd (tuner, 2b1309b): 4096 rows of 4096 / 8192 /
// 16384 columns 0.0854 / 0.161 / 0.340 ms with it, 0.101 / 0.216 / 0.372 without; at 1024
// columns 4096 rows 0.0350 against 0.0392, but 16384 rows 0.1000 against 0.0932 (so not at
// 1024); 2049-4095 columns and fp32 untimed.
// 16-bit rows past the tiles up to 16384 columns too: dx from the packed backward where the rows
// are aligned (else the loop kernel, without its sums).
template <typename T> constexpr int64_t kParamKernelMaxCols = sizeof(T) == 2 ? 16384 : kBackwardMaxCols<T>;
template <typename T> bool uses_param_kernel(int64_t cols) {
  int64_t on = sizeof(T) == 2 && cols > 2048 ? 1 : 0;
  env_knob("FASTDL_CUDA_NORM_PARAM_KERNEL", 0, 1, &on);
  return on == 1 && cols <= kParamKernelMaxCols<T>;
}
// norm_param_grad_kernel's blocks: 8 warps, a column of 16-byte vectors a lane; at least 4
// resident an SM (64 registers a thread: a loop unrolled twice spilled 4-8 bytes in 16 bits),
// 32 KiB of loads in flight an SM.
constexpr int kParamWarps = 8;
constexpr int kParamBlocksPerSm = 4;
template <int kVec> constexpr int kParamWidth = kWarpSize * kVec;
// Its row blocks (the partial rows): with the column blocks of 16-byte vectors, about
// FASTDL_CUDA_NORM_BLOCKS_PER_SM (default 8: 2048 threads) blocks an SM, none of fewer rows
// than it has warps unless that is all there is.
template <typename T> int64_t param_row_blocks(int64_t rows, int64_t cols, int sms) {
  int64_t per_sm = 8;
  env_knob("FASTDL_CUDA_NORM_BLOCKS_PER_SM", 1, 1 << 16, &per_sm);
  const int64_t col_blocks = (cols + kParamWidth<Vec<T>::kSize> - 1) / kParamWidth<Vec<T>::kSize>;
  const int64_t wanted = (static_cast<int64_t>(sms) * per_sm + col_blocks - 1) / col_blocks;
  return std::max<int64_t>(1, std::min({wanted, (rows + kParamWarps - 1) / kParamWarps, int64_t{65535}}));  // grid.y
}

// The packed forward's block (row_tile.cuh's with_packed_block): none when FASTDL_CUDA_PACKED_NORM
// is 0.
template <typename F> bool with_packed_norm(int64_t cols, F&& launch) {
  int64_t enabled = 1;
  env_knob("FASTDL_CUDA_PACKED_NORM", 0, 1, &enabled);
  return enabled == 1 && with_packed_block(cols, launch);
}
// The partial-row sum's block: kSumCols columns (a 32-byte sector of a partial row) by
// kSumRowThreads threads, each summing every kSumRowThreads-th partial row of its column. At
// 32 x 8 the 660 partial rows of a 4096 x 1024 backward took 8.7 us, as long as the forward:
// 64 blocks on 132 SMs, 12% occupancy, waiting on its loads (Nsight Compute, H200, 2b1309b).
// 8 x 32 gives four times the blocks (two an SM at hidden 1024). UNTIMED.
constexpr int kSumCols = 8;
constexpr int kSumRowThreads = 32;

// ---------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------
// The corrected two-pass algorithm (Chan, Golub & LeVeque 1983, "Algorithms for computing the
// sample variance", eq. 1.7), for the row kernels: from the deviations of n values from their
// mean as first found (the sum / n, rounded), their sum `dev` (near 0: n times that mean's
// error) and their sum of squares `sq`, the variance. It corrects `mean` by dev / n and gives
// `shift` = dev / n, what each deviation is then off. A constant row comes out exact: its
// deviations are all the first mean's error e, so dev = n e and sq = n e^2 exactly, the mean
// is the row's value and the variance 0. The sum / n alone left that row's norm e / sqrt(eps)
// from 0 (fp32 rows of 3.7, 4096 wide: 5.8e-4 off float64 in the CPU kernel, which did the same;
// torch's Welford kernels give 0).
// The correction is taken only where it is more than its own error (kShiftFloor2): x - mean
// rounds away the mean's bits below x's last one (16-bit x, or |x| > |mean|), the same way for
// all of a binade's values, so dev / n can be off by up to half an ulp of the deviations. For a
// row centred near 0 that is more than the first mean's error (fp16 rows of 20000 randn: the
// corrected mean 2e-5 off float64, the sum / n 2e-6). Below 8 eps of the deviations' root mean
// square the shift changes y by less than that, and is left out.
// shift is the one IEEE division (exact for a constant row: dev is n e); the first mean and the
// variance need no more than ratio_acc (2 ulp): a third division's slow-path call cost the fp32
// warp tile of 32 x 32 values 4 bytes of spill (sm_90a).
template <typename A> constexpr A kShiftFloor2 = std::is_same_v<A, double> ? 0x1p-98 : 0x1p-40f;  // (8 eps)^2

template <typename A> __device__ __forceinline__ A corrected_variance(A sq, A dev, int64_t n, A& mean, A& shift) {
  shift = dev / static_cast<A>(n);
  const A sq_mean = ratio_acc(sq, static_cast<A>(n));
  if (!(shift * shift > kShiftFloor2<A> * sq_mean)) shift = A(0);  // (NaN: the row's NaN anyway)
  mean += shift;
  const A var = sq_mean - shift * shift;
  return var < A(0) ? A(0) : var;  // rounding may leave it a hair below 0 (NaN stays NaN)
}

// The row's variance (of its deviations from `mean`, each thread's sums of squares `sq` and of the
// deviations `dev` over a group of kThreads): sq / n for rms_norm (mean 0, no shift), else the
// corrected variance, which also corrects `mean` and sets `shift`.
template <int kThreads, typename A>
__device__ __forceinline__ A row_variance(A sq, A dev, int64_t n, bool rms, A& mean, A& shift, A* scratch) {
  shift = A(0);
  if (rms) return group_sum<kThreads>(sq, scratch) / static_cast<A>(n);
  group_sum2<kThreads>(sq, dev, scratch);
  return corrected_variance(sq, dev, n, mean, shift);
}

template <typename T, typename W, typename Y, typename R, int kThreads, int kElems>
__global__ void __launch_bounds__(kTileBlockThreads<kThreads>)
    norm_forward_tile_kernel(const T* __restrict__ x, const R* __restrict__ residual, const W* __restrict__ weight,
                             const W* __restrict__ bias, Y* __restrict__ y, R* __restrict__ sum,
                             typename Acc<T>::type* __restrict__ mean_out, typename Acc<T>::type* __restrict__ rstd_out,
                             int64_t rows, int64_t cols, int64_t x_row_stride, int64_t residual_row_stride,
                             typename Acc<T>::type eps, bool rms, bool aligned) {
  using A = typename Acc<T>::type;
  using Tile = RowTile<T, kThreads, kElems>;
  __shared__ A scratch[2 * kThreads / kWarpSize];  // group_sum2's
  const int64_t row = tile_row<kThreads>();
  if (row >= rows) return;  // whole groups only (tile_row)
  const int t = threadIdx.x % kThreads;
  A v[kElems];
  Tile::load(x + row * x_row_stride, t, cols, aligned, v, A(0));
  if (residual != nullptr) {
    A r[kElems];
    Tile::load(residual + row * residual_row_stride, t, cols, aligned, r, A(0));
#pragma unroll
    for (int i = 0; i < kElems; ++i) v[i] = to_acc(from_acc<R>(v[i] + r[i]));  // rounded, as the unfused add
    Tile::store(sum + row * cols, t, cols, aligned, v);
  }
  A mean = 0;
  if (!rms) {
    A total = 0;
#pragma unroll
    for (int i = 0; i < kElems; ++i) total += v[i];  // padding holds 0
    mean = ratio_acc(group_sum<kThreads>(total, scratch), static_cast<A>(cols));  // corrected below
  }
  A sq = 0, dev = 0;
#pragma unroll
  for (int i = 0; i < kElems; ++i) {
    v[i] = Tile::col(t, i) < cols ? v[i] - mean : A(0);
    sq += v[i] * v[i];
    dev += v[i];
  }
  A shift;
  const A var = row_variance<kThreads>(sq, dev, cols, rms, mean, shift, scratch);
  const A rstd = A(1) / sqrt(var + eps);
  if (t == 0) {
    if (!rms) mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
#pragma unroll
  for (int i = 0; i < kElems; ++i) v[i] = (v[i] - shift) * rstd;
  if (weight != nullptr) {
    A w[kElems];
    Tile::load(weight, t, cols, aligned, w, A(0));
#pragma unroll
    for (int i = 0; i < kElems; ++i) v[i] *= w[i];
  }
  if (bias != nullptr) {
    A b[kElems];
    Tile::load(bias, t, cols, aligned, b, A(0));
#pragma unroll
    for (int i = 0; i < kElems; ++i) v[i] += b[i];
  }
  Tile::store(y + row * cols, t, cols, aligned, v);
}

// v[k] *= p[k] (a weight), or v[k] += p[k] (kAdd: a bias), for a pack of kN values: the packed
// kernels' parameters, read a 16-byte vector of W at a time where used (half a pack of 16-bit
// values when W is fp32).
template <bool kAdd, int kN, typename W, typename A>
__device__ __forceinline__ void apply_param(const W* p, A (&v)[kN]) {
  constexpr int kParamVec = Vec<W>::kSize;
#pragma unroll
  for (int h = 0; h < kN; h += kParamVec) {
    A w[kParamVec];
    load_acc<kParamVec>(p + h, w);
#pragma unroll
    for (int k = 0; k < kParamVec; ++k) v[h + k] = kAdd ? v[h + k] + w[k] : v[h + k] * w[k];
  }
}

// Rows of 16-bit x held as they are (PackedRowTile), a block of kThreads each; y in x's
// dtype; weight / bias (W: x's dtype or fp32) read a 16-byte vector at a time as y is
// written. Rows 16-byte aligned, of a whole number of vectors (PackedRowTile's). The bound of
// 1024 threads an SM at least: with kThreads alone, ptxas (CUDA 13.0) held the fp32-weight
// instantiations to 40 registers and spilled 4-84 bytes; with it they take 46, no spill, and
// those of 16-bit weights 40 (three 512-thread blocks an SM).
template <typename T, typename W, int kThreads>
__global__ void __launch_bounds__(kThreads, 1024 / kThreads)
    norm_forward_packed_kernel(const T* __restrict__ x, const W* __restrict__ weight, const W* __restrict__ bias,
                               T* __restrict__ y, typename Acc<T>::type* __restrict__ mean_out,
                               typename Acc<T>::type* __restrict__ rstd_out, int cols, int64_t x_row_stride,
                               typename Acc<T>::type eps, bool rms) {
  using A = typename Acc<T>::type;
  using Tile = PackedRowTile<T, kThreads, kPackedBlockElems>;
  constexpr int kPack = Tile::kPack;
  __shared__ A scratch[2 * kThreads / kWarpSize];  // group_sum2's
  const int64_t row = blockIdx.x;
  const int t = threadIdx.x;
  Tile tile;
  tile.load(x + row * x_row_stride, t, cols, from_acc<T>(A(0)));  // past the row: 0, nothing to the sum
  A mean = 0;
  if (!rms) {
    A total = 0;
#pragma unroll
    for (int i = 0; i < kPackedBlockElems; ++i) total += tile.value(i);
    mean = ratio_acc(block_sum<kThreads>(total, scratch), static_cast<A>(cols));  // corrected below
    tile.reconvert_after_here();
  }
  A sq = 0, dev = 0;
  Tile::for_each_pack(t, cols, [&](int p, int) {
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      const A d = Tile::element(tile.packs[p], k) - mean;
      sq += d * d;
      dev += d;
    }
  });
  A shift;
  const A var = row_variance<kThreads>(sq, dev, cols, rms, mean, shift, scratch);
  const A rstd = A(1) / sqrt(var + eps);
  if (t == 0) {
    if (!rms) mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
  tile.reconvert_after_here();
  T* y_row = y + row * cols;
  Tile::for_each_pack(t, cols, [&](int p, int col) {
    A v[kPack];
    // from the corrected mean (exact for a constant row), not the tile's deviation less shift:
    // a 16-bit row gains nothing from the latter, which held both means in registers (40 -> 44-48
    // registers, two 512-thread blocks an SM where there are three)
#pragma unroll
    for (int k = 0; k < kPack; ++k) v[k] = (Tile::element(tile.packs[p], k) - mean) * rstd;
    if (weight != nullptr) apply_param<false>(weight + col, v);
    if (bias != nullptr) apply_param<true>(bias + col, v);
    store_acc<kPack>(y_row + col, v);
  });
}

// A block a row, or with FASTDL_CUDA_LOOP_BLOCKS_PER_SM fewer blocks, each walking rows
// blockIdx.x, + gridDim.x, ... (loop_grid): the second sweep reads the row from L2 only with few
// rows in flight.
template <typename T, typename W, typename Y, typename R, int kVec>
__global__ void __launch_bounds__(kLoopThreads)
    norm_forward_loop_kernel(const T* __restrict__ x, const R* __restrict__ residual, const W* __restrict__ weight,
                             const W* __restrict__ bias, Y* __restrict__ y, R* __restrict__ sum,
                             typename Acc<T>::type* __restrict__ mean_out, typename Acc<T>::type* __restrict__ rstd_out,
                             int64_t rows, int64_t cols, int64_t x_row_stride, int64_t residual_row_stride,
                             typename Acc<T>::type eps, bool rms) {
  using A = typename Acc<T>::type;
  __shared__ A scratch[kLoopThreads / kWarpSize];
  constexpr int64_t kStep = static_cast<int64_t>(kLoopThreads) * kVec;
  const int64_t first_col = static_cast<int64_t>(threadIdx.x) * kVec;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* x_row = x + row * x_row_stride;
    const R* r_row = residual != nullptr ? residual + row * residual_row_stride : nullptr;
    R* h_row = residual != nullptr ? sum + row * cols : nullptr;
    // the row sweep 2 reads: the sum when fused, else x (R is T but for a residual wider than
    // x, which the launch never leaves out)
    const R* src = h_row;
    if constexpr (std::is_same_v<R, T>) {
      if (residual == nullptr) src = x_row;
    }
    // sweep 1: the sum (written when fused) and the row's statistics: its sum of squares (RMS),
    // or this thread's count, mean and squared deviations (MeanM2: a vector's, combined into the
    // running state), then the block's. kUnroll steps at a time, their loads issued together: a
    // step past the row loads the first step's columns again (no use of them), so no load waits
    // in a branch. One step at a time, nvcc issued each load after the step before it (sm_90a
    // SASS, 12f6ed2: one 16-byte load in flight a thread, and one 1024-thread block an SM).
    A sq = 0;
    MeanM2<A> stats{A(0), A(0), A(0)};
    auto sweep1 = [&](auto fused) {
      constexpr bool kFused = decltype(fused)::value;
      constexpr int kUnroll = kFused ? 2 : 4;  // the residual's steps too: twice the registers a step
      for (int64_t col0 = first_col; col0 < cols; col0 += kUnroll * kStep) {
        A v[kUnroll][kVec];
        A r[kFused ? kUnroll : 1][kVec];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t col = col0 + u * kStep < cols ? col0 + u * kStep : col0;
          load_acc<kVec>(x_row + col, v[u]);
          if constexpr (kFused) load_acc<kVec>(r_row + col, r[u]);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int64_t col = col0 + u * kStep;
          if (u > 0 && col >= cols) break;
          if constexpr (kFused) {
            // rounded, as the unfused add
#pragma unroll
            for (int k = 0; k < kVec; ++k) v[u][k] = to_acc(from_acc<R>(v[u][k] + r[u][k]));
            store_acc<kVec>(h_row + col, v[u]);
          }
          if (rms) {
#pragma unroll
            for (int k = 0; k < kVec; ++k) sq += v[u][k] * v[u][k];
          } else {
            stats = combine(stats, mean_m2(v[u]));
          }
        }
      }
    };
    if (residual != nullptr) sweep1(std::true_type{});
    else sweep1(std::false_type{});
    A mean = 0;
    if (rms) {
      sq = block_sum<kLoopThreads>(sq, scratch);
    } else {
      stats = block_mean_m2<kLoopThreads>(stats, static_cast<A>(cols), scratch);
      mean = stats.mean;
      sq = stats.m2;
    }
    const A rstd = A(1) / sqrt(sq / static_cast<A>(cols) + eps);
    if (threadIdx.x == 0) {
      if (!rms) mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
    // sweep 2: normalise and write. Each thread reads the columns it wrote in sweep 1. y goes
    // out by store_acc_whole: stored as a Vec, nvcc split this unrolled loop's 16-byte y stores
    // into 2- and 4-byte ones (sm_90a, 2b1309b: 8 STG.E.U16 a bf16 vector, 4 STG.E an fp32 one;
    // at bf16 1024 x 65536 7.4x y's L2 write sectors and a third of Triton's speed, Nsight
    // Compute on the H200). 7c856bd kept them whole by not unrolling, with one load in flight a
    // thread and 4 bytes of fp32 spill; unrolled, nvcc issues the loads of two steps at once.
    Y* y_row = y + row * cols;
    for (int64_t col = first_col; col < cols; col += kStep) {
      A v[kVec];
      load_acc<kVec>(src + col, v);
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[k] = (v[k] - mean) * rstd;
      if (weight != nullptr) {
        A w[kVec];
        load_acc<kVec>(weight + col, w);
#pragma unroll
        for (int k = 0; k < kVec; ++k) v[k] *= w[k];
      }
      if (bias != nullptr) {
        A b[kVec];
        load_acc<kVec>(bias + col, b);
#pragma unroll
        for (int k = 0; k < kVec; ++k) v[k] += b[k];
      }
      store_acc_whole<kVec>(y_row + col, v);
    }
  }
}

// ---------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------
// Sums one value a column over the groups of a block, in group order, and writes the
// block's row of a partial buffer. `combined` holds kThreads x kElems values (unused
// when the block is one group).
template <typename T, int kThreads, int kElems, typename A>
__device__ __forceinline__ void write_block_partial(const A (&v)[kElems], A* __restrict__ partial_row, A* combined,
                                                    int64_t cols) {
  using Tile = RowTile<T, kThreads, kElems>;
  constexpr int kGroups = kTileBlockThreads<kThreads> / kThreads;
  const int t = threadIdx.x % kThreads, group = threadIdx.x / kThreads;
  if constexpr (kGroups == 1) {  // the block is the group: nothing to combine
#pragma unroll
    for (int i = 0; i < kElems; ++i)
      if (Tile::col(t, i) < cols) partial_row[Tile::col(t, i)] = v[i];
    return;
  }
  __syncthreads();  // `combined` may still be read from the previous call
#pragma unroll 1
  for (int g = 0; g < kGroups; ++g) {
    if (group == g) {
#pragma unroll
      for (int i = 0; i < kElems; ++i) {
        const A total = (g == 0 ? A(0) : combined[i * kThreads + t]) + v[i];
        if (g + 1 < kGroups) combined[i * kThreads + t] = total;
        else if (Tile::col(t, i) < cols) partial_row[Tile::col(t, i)] = total;
      }
    }
    if (g + 1 < kGroups) __syncthreads();
  }
}

// kParamSums: the block also sums its rows' dweight / dbias (in registers: 2 x kElems a
// thread) and writes its partial rows; without, dx alone (norm_param_grad_kernel sums them).
template <typename T, typename W, typename D, typename N, int kThreads, int kElems, bool kParamSums>
__global__ void __launch_bounds__(kTileBlockThreads<kThreads>)
    norm_backward_tile_kernel(const D* __restrict__ dy, const T* __restrict__ dsum, const T* __restrict__ x,
                              const W* __restrict__ weight,
                              const typename Acc<T>::type* __restrict__ mean,
                              const typename Acc<T>::type* __restrict__ rstd, T* __restrict__ dx,
                              N* __restrict__ dx_narrow, typename Acc<T>::type* __restrict__ dweight_partial,
                              typename Acc<T>::type* __restrict__ dbias_partial, int64_t rows, int64_t cols,
                              int64_t rows_per_block, int64_t dy_row_stride, int64_t dsum_row_stride,
                              int64_t x_row_stride, bool rms, bool aligned) {
  using A = typename Acc<T>::type;
  using Tile = RowTile<T, kThreads, kElems>;
  constexpr int kGroups = kTileBlockThreads<kThreads> / kThreads;
  __shared__ A scratch[kThreads / kWarpSize];
  __shared__ A combined[kParamSums && kGroups > 1 ? kThreads * kElems : 1];
  const int t = threadIdx.x % kThreads, group = threadIdx.x / kThreads;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t end = begin + rows_per_block < rows ? begin + rows_per_block : rows;
  A w[kElems];
  if (weight != nullptr) {
    Tile::load(weight, t, cols, aligned, w, A(0));
  } else {
#pragma unroll
    for (int i = 0; i < kElems; ++i) w[i] = A(1);
  }
  A dw[kElems], db[kElems];
#pragma unroll
  for (int i = 0; i < kElems; ++i) dw[i] = db[i] = A(0);
  // The groups of a block take its rows in turn. Warp groups reduce with shuffles, so
  // their trip counts may differ; a block group is the whole block.
  // A row's x and dy as they lie in memory, its mean and rstd: all loaded before any is used
  // (load_raw), one DRAM latency a row where the tile waited for each in turn. kPrefetch: the
  // group loads its next row before this row's sums and dx store, so that two rows are in
  // flight. Without either, the 4096 x 1024 backward (bf16, 128 x 8, 92 registers: 31%
  // occupancy) took 21.9 us for its 24 MiB, its warps stalled on loads (Nsight Compute, H200,
  // 2b1309b). Tiles of 512 threads have no registers to spare (up to 128 a thread); the
  // dx-alone tiles take one row a group. The sum's gradient (fused add) is still loaded after
  // the sums: loaded with the row, it cost up to 70 registers a thread and spilled fp64. UNTIMED.
  constexpr bool kPrefetch = kParamSums && kThreads < 512;
  struct RowIn {
    typename Tile::template Raw<T> x;
    typename Tile::template Raw<D> dy;
    A m, r;
  };
  auto load_row = [&](int64_t row, RowIn& in) {
    Tile::load_raw(x + row * x_row_stride, t, cols, aligned, in.x, from_acc<T>(A(0)));
    Tile::load_raw(dy + row * dy_row_stride, t, cols, aligned, in.dy, from_acc<D>(A(0)));
    in.m = rms ? A(0) : mean[row];
    in.r = rstd[row];
  };
  RowIn in{};
  if constexpr (kPrefetch) {
    if (begin + group < end) load_row(begin + group, in);
  }
  for (int64_t row = begin + group; row < end; row += kGroups) {
    RowIn next{};
    if constexpr (kPrefetch) {
      if (row + kGroups < end) load_row(row + kGroups, next);
    } else {
      load_row(row, in);
    }
    A xhat[kElems], g[kElems];
    Tile::convert(in.x, xhat);
    Tile::convert(in.dy, g);
    const A m = in.m, r = in.r;
    A sum_gx = 0, sum_g = 0;
#pragma unroll
    for (int i = 0; i < kElems; ++i) {
      xhat[i] = Tile::col(t, i) < cols ? (xhat[i] - m) * r : A(0);
      if constexpr (kParamSums) {
        dw[i] += g[i] * xhat[i];  // g holds dy here
        db[i] += g[i];
      }
      g[i] *= w[i];
      sum_gx += g[i] * xhat[i];
      sum_g += g[i];
    }
    const A c1 = group_sum<kThreads>(sum_gx, scratch) / static_cast<A>(cols);
    const A c2 = rms ? A(0) : group_sum<kThreads>(sum_g, scratch) / static_cast<A>(cols);
#pragma unroll
    for (int i = 0; i < kElems; ++i) xhat[i] = (g[i] - c2 - xhat[i] * c1) * r;  // now dx
    if (dsum != nullptr) {
      Tile::load(dsum + row * dsum_row_stride, t, cols, aligned, g, A(0));
#pragma unroll
      for (int i = 0; i < kElems; ++i) xhat[i] += g[i];
    }
    Tile::store(dx + row * cols, t, cols, aligned, xhat);
    if constexpr (!std::is_same_v<N, T>) Tile::store(dx_narrow + row * cols, t, cols, aligned, xhat);
    if constexpr (kPrefetch) in = next;
  }
  // Every block writes its partial row, zeros when it had no rows.
  if constexpr (kParamSums) {
    if (dweight_partial != nullptr)
      write_block_partial<T, kThreads, kElems>(dw, dweight_partial + static_cast<int64_t>(blockIdx.x) * cols, combined,
                                               cols);
    if (dbias_partial != nullptr)
      write_block_partial<T, kThreads, kElems>(db, dbias_partial + static_cast<int64_t>(blockIdx.x) * cols, combined,
                                               cols);
  }
}

// dweight / dbias of the rows [begin, begin + rows_per_block) of block (blockIdx.x, blockIdx.y)
// at its kParamWidth<kVec> columns, for the tile backward without kParamSums: lane l of every
// warp holds kVec consecutive columns (a warp reads 32 x 16 bytes of a row), warp w the rows
// begin + w, + kParamWarps, ...; the warps' sums are then added in warp order and written as
// the block's partial row blockIdx.y. x and dy are read a second time (after the dx kernel),
// but by as many blocks as fill the device, where the tile's own sums held 2 x kElems
// registers a thread (118 at 512 x 16 bf16: one block an SM, its rows' loads one at a time).
// no 16-byte stores accepted: norm_param_grad_kernel: one partial value a column, once a block
template <typename T, typename D, int kVec>
__global__ void __launch_bounds__(kParamWarps* kWarpSize, kParamBlocksPerSm)
    norm_param_grad_kernel(const D* __restrict__ dy, const T* __restrict__ x,
                           const typename Acc<T>::type* __restrict__ mean,
                           const typename Acc<T>::type* __restrict__ rstd,
                           typename Acc<T>::type* __restrict__ dweight_partial,
                           typename Acc<T>::type* __restrict__ dbias_partial, int64_t rows, int64_t cols,
                           int64_t rows_per_block, int64_t dy_row_stride, int64_t x_row_stride, bool rms) {
  using A = typename Acc<T>::type;
  __shared__ A sums[2][kParamWarps][kParamWidth<kVec>];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kParamWidth<kVec> + static_cast<int64_t>(lane) * kVec;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t end = begin + rows_per_block < rows ? begin + rows_per_block : rows;
  const bool whole = col + kVec <= cols;  // else the row's last columns, one at a time
  A dw[kVec] = {}, db[kVec] = {};
  if (col < cols) {
#pragma unroll 1
    for (int64_t row = begin + warp; row < end; row += kParamWarps) {
      A xs[kVec], ds[kVec];
      if (whole) {
        load_acc<kVec>(x + row * x_row_stride + col, xs);
        load_acc<kVec>(dy + row * dy_row_stride + col, ds);
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          xs[k] = col + k < cols ? to_acc(x[row * x_row_stride + col + k]) : A(0);
          ds[k] = col + k < cols ? to_acc(dy[row * dy_row_stride + col + k]) : A(0);
        }
      }
      const A m = rms ? A(0) : mean[row];
      const A r = rstd[row];
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        dw[k] += ds[k] * ((xs[k] - m) * r);
        db[k] += ds[k];
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kVec; ++k) {
    sums[0][warp][lane * kVec + k] = dw[k];
    sums[1][warp][lane * kVec + k] = db[k];
  }
  __syncthreads();
  // the warps' sums added in warp order, a column of dweight or dbias a thread at a time
  for (int i = threadIdx.x; i < 2 * kParamWidth<kVec>; i += kParamWarps * kWarpSize) {
    const int which = i / kParamWidth<kVec>, c = i % kParamWidth<kVec>;
    A* partial = which == 0 ? dweight_partial : dbias_partial;
    const int64_t out_col = static_cast<int64_t>(blockIdx.x) * kParamWidth<kVec> + c;
    if (partial != nullptr && out_col < cols) {
      A total = 0;
#pragma unroll
      for (int w = 0; w < kParamWarps; ++w) total += sums[which][w][c];
      partial[static_cast<int64_t>(blockIdx.y) * cols + out_col] = total;
    }
  }
}

// The backward's steps over kN values of a row (loop and packed kernels): this thread's sums of g * xhat
// and of g; the row's means of them (c1, c2: 0 for RMS) from every thread's; dx of the values
// (plus, when fused, the gradient dsum reaching x + residual from elsewhere, at dsum_at).
template <int kN, typename A>
__device__ __forceinline__ void add_row_sums(const A (&xhat)[kN], const A (&g)[kN], A& sum_gx, A& sum_g) {
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    sum_gx += g[k] * xhat[k];
    sum_g += g[k];
  }
}
template <int kThreads, typename A>
__device__ __forceinline__ void row_means(A sum_gx, A sum_g, int64_t cols, bool rms, A* scratch, A& c1, A& c2) {
  c1 = block_sum<kThreads>(sum_gx, scratch) / static_cast<A>(cols);
  c2 = rms ? A(0) : block_sum<kThreads>(sum_g, scratch) / static_cast<A>(cols);
}
template <int kN, typename T, typename A>
__device__ __forceinline__ void dx_values(const A (&xhat)[kN], const A (&g)[kN], A c1, A c2, A r, const T* dsum_at,
                                          A (&v)[kN]) {
#pragma unroll
  for (int k = 0; k < kN; ++k) v[k] = (g[k] - c2 - xhat[k] * c1) * r;
  if (dsum_at != nullptr) {
    A ds[kN];
    load_acc<kN>(dsum_at, ds);
#pragma unroll
    for (int k = 0; k < kN; ++k) v[k] += ds[k];
  }
}

// kSharedSums: the block's running dweight / dbias sums are kept in dynamic shared memory
// (dweight's cols values, then dbias's) and written to its partial rows once, at the end.
// Otherwise they sit in its partial rows, a read and a write of each per row: at hidden
// 16384 four times the row's own DRAM traffic, through L2.
template <typename T, typename W, typename D, typename N, int kVec, bool kSharedSums>
__global__ void __launch_bounds__(kLoopThreads)
    norm_backward_loop_kernel(const D* __restrict__ dy, const T* __restrict__ dsum, const T* __restrict__ x,
                              const W* __restrict__ weight,
                              const typename Acc<T>::type* __restrict__ mean,
                              const typename Acc<T>::type* __restrict__ rstd, T* __restrict__ dx,
                              N* __restrict__ dx_narrow, typename Acc<T>::type* __restrict__ dweight_partial,
                              typename Acc<T>::type* __restrict__ dbias_partial, int64_t rows, int64_t cols,
                              int64_t rows_per_block, int64_t dy_row_stride, int64_t dsum_row_stride,
                              int64_t x_row_stride, bool rms) {
  using A = typename Acc<T>::type;
  __shared__ A scratch[kLoopThreads / kWarpSize];
  constexpr int64_t kStep = static_cast<int64_t>(kLoopThreads) * kVec;
  const int64_t first_col = static_cast<int64_t>(threadIdx.x) * kVec;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t end = begin + rows_per_block < rows ? begin + rows_per_block : rows;
  // This block's partial rows and running sums: each thread reads and writes only its own
  // columns (in shared memory too, so no barrier orders them).
  A* dw_row = dweight_partial != nullptr ? dweight_partial + static_cast<int64_t>(blockIdx.x) * cols : nullptr;
  A* db_row = dbias_partial != nullptr ? dbias_partial + static_cast<int64_t>(blockIdx.x) * cols : nullptr;
  // in shared memory: dweight's sums at [0, cols), dbias's after them (32-bit offsets)
  extern __shared__ __align__(16) unsigned char norm_shared_sums[];
  A* const shared_sums = reinterpret_cast<A*>(norm_shared_sums);
  const int db_shared_at = dw_row != nullptr ? static_cast<int>(cols) : 0;
  if constexpr (kSharedSums) {
    const A zeros[kVec] = {};
    for (int64_t col = first_col; col < cols; col += kStep) {
      if (dw_row != nullptr) store_acc<kVec>(shared_sums + static_cast<int>(col), zeros);
      if (db_row != nullptr) store_acc<kVec>(shared_sums + db_shared_at + static_cast<int>(col), zeros);
    }
  }
  if (begin >= end) {
    const A zeros[kVec] = {};
    for (int64_t col = first_col; col < cols; col += kStep) {
      if (dw_row != nullptr) store_acc<kVec>(dw_row + col, zeros);
      if (db_row != nullptr) store_acc<kVec>(db_row + col, zeros);
    }
    return;
  }
  for (int64_t row = begin; row < end; ++row) {
    const D* dy_row = dy + row * dy_row_stride;
    const T* x_row = x + row * x_row_stride;
    const A m = rms ? A(0) : mean[row];
    const A r = rstd[row];
    // xhat and dy of this thread's kVec columns at col; g = dy * weight
    auto load_step = [&](int64_t col, A (&xhat)[kVec], A (&d)[kVec], A (&g)[kVec]) {
      load_acc<kVec>(x_row + col, xhat);
      load_acc<kVec>(dy_row + col, d);
      A w[kVec];
      if (weight != nullptr) load_acc<kVec>(weight + col, w);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        xhat[k] = (xhat[k] - m) * r;
        g[k] = weight != nullptr ? d[k] * w[k] : d[k];
      }
    };
    A sum_gx = 0, sum_g = 0;
    for (int64_t col = first_col; col < cols; col += kStep) {
      A xhat[kVec], d[kVec], g[kVec];
      load_step(col, xhat, d, g);
      add_row_sums(xhat, g, sum_gx, sum_g);
    }
    A c1, c2;
    row_means<kLoopThreads>(sum_gx, sum_g, cols, rms, scratch, c1, c2);
    const bool first = row == begin;
    T* dx_row = dx + row * cols;
    for (int64_t col = first_col; col < cols; col += kStep) {
      A xhat[kVec], d[kVec], g[kVec], v[kVec];
      load_step(col, xhat, d, g);
      // dx_values's steps written out: called here, the fp64 instantiation spilled 4 bytes
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[k] = (g[k] - c2 - xhat[k] * c1) * r;
      if (dsum != nullptr) {
        A ds[kVec];
        load_acc<kVec>(dsum + row * dsum_row_stride + col, ds);
#pragma unroll
        for (int k = 0; k < kVec; ++k) v[k] += ds[k];
      }
      store_acc<kVec>(dx_row + col, v);
      if constexpr (!std::is_same_v<N, T>) store_acc<kVec>(dx_narrow + row * cols + col, v);
      // add to this block's sums at these columns (in the partial rows, its first row
      // starts them from zero; shared memory starts at zero)
      auto accumulate = [&](A* partial_row, int shared_at, const A (&add)[kVec]) {
        A* sums = kSharedSums ? shared_sums + (shared_at + static_cast<int>(col)) : partial_row + col;
        A p[kVec] = {};
        if (kSharedSums || !first) load_acc<kVec>(sums, p);
#pragma unroll
        for (int k = 0; k < kVec; ++k) p[k] += add[k];
        store_acc<kVec>(sums, p);
      };
      if (dw_row != nullptr) {
        A dy_xhat[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) dy_xhat[k] = d[k] * xhat[k];
        accumulate(dw_row, 0, dy_xhat);
      }
      if (db_row != nullptr) accumulate(db_row, db_shared_at, d);
    }
  }
  if constexpr (kSharedSums) {  // the sums to the partial rows
    for (int64_t col = first_col; col < cols; col += kStep) {
      A p[kVec];
      if (dw_row != nullptr) {
        load_acc<kVec>(shared_sums + static_cast<int>(col), p);
        store_acc<kVec>(dw_row + col, p);
      }
      if (db_row != nullptr) {
        load_acc<kVec>(shared_sums + db_shared_at + static_cast<int>(col), p);
        store_acc<kVec>(db_row + col, p);
      }
    }
  }
}

// dx of a 16-bit row of 2049 to 16384 columns (16-byte aligned, dy in x's dtype, no narrow copy)
// for the backward without its sums (FASTDL_CUDA_NORM_PARAM_KERNEL=1): a block of kThreads holds
// the row's x and dy as they are in memory, 32 values a thread in 16 registers each
// (PackedRowTile), and converts where used; the weight is read a 16-byte vector at a time
// where used (L1), twice. A block of the tile kernel held them converted, and at 4097-8192
// columns 88 registers a thread (one block of 512 an SM).
template <typename T, typename W, int kThreads>
__global__ void __launch_bounds__(kThreads, 1024 / kThreads)
    norm_backward_packed_kernel(const T* __restrict__ dy, const T* __restrict__ dsum, const T* __restrict__ x,
                                const W* __restrict__ weight, const typename Acc<T>::type* __restrict__ mean,
                                const typename Acc<T>::type* __restrict__ rstd, T* __restrict__ dx, int cols,
                                int64_t dy_row_stride, int64_t dsum_row_stride, int64_t x_row_stride, bool rms) {
  using A = typename Acc<T>::type;
  using Tile = PackedRowTile<T, kThreads, kPackedBlockElems>;
  constexpr int kPack = Tile::kPack;
  __shared__ A scratch[kThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const int t = threadIdx.x;
  Tile xs, dys;
  xs.load(x + row * x_row_stride, t, cols, from_acc<T>(A(0)));
  dys.load(dy + row * dy_row_stride, t, cols, from_acc<T>(A(0)));
  const A m = rms ? A(0) : mean[row];
  const A r = rstd[row];
  // xhat and g = dy * weight at pack p of this thread (its first column col, within the row)
  auto pack_values = [&](int p, int col, A (&xhat)[kPack], A (&g)[kPack]) {
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      xhat[k] = (Tile::element(xs.packs[p], k) - m) * r;
      g[k] = Tile::element(dys.packs[p], k);
    }
    if (weight != nullptr) apply_param<false>(weight + col, g);
  };
  A sum_gx = 0, sum_g = 0;
  Tile::for_each_pack(t, cols, [&](int p, int col) {
    A xhat[kPack], g[kPack];
    pack_values(p, col, xhat, g);
    add_row_sums(xhat, g, sum_gx, sum_g);
  });
  A c1, c2;
  row_means<kThreads>(sum_gx, sum_g, cols, rms, scratch, c1, c2);
  xs.reconvert_after_here();
  dys.reconvert_after_here();
  T* dx_row = dx + row * cols;
  Tile::for_each_pack(t, cols, [&](int p, int col) {
    A xhat[kPack], g[kPack], v[kPack];
    pack_values(p, col, xhat, g);
    dx_values(xhat, g, c1, c2, r, dsum != nullptr ? dsum + row * dsum_row_stride + col : nullptr, v);
    store_acc<kPack>(dx_row + col, v);
  });
}

// out[col] = sum over the partial rows of partial[row][col], in a fixed order, rounded to
// Out (the parameters' type W) once: thread (tx, ty) sums rows ty, ty + 8, ... of column tx,
// then row-thread sums are added in order. blockIdx.y picks the buffer: dweight's and
// dbias's sums are one launch.
// A warp moves 32 consecutive fp32 columns, 128 bytes, in one transaction:
// no 16-byte loads accepted: sum_partial_rows_kernel: 4-byte loads, coalesced across the warp
// no 16-byte stores accepted: sum_partial_rows_kernel: one value a column
template <typename A, typename Out>
__global__ void __launch_bounds__(kSumCols* kSumRowThreads)
    sum_partial_rows_kernel(const A* __restrict__ partial0, Out* __restrict__ out0, const A* __restrict__ partial1,
                            Out* __restrict__ out1, int64_t partial_rows, int64_t cols) {
  __shared__ A sums[kSumRowThreads][kSumCols + 1];
  const A* partial = blockIdx.y == 0 ? partial0 : partial1;
  Out* out = blockIdx.y == 0 ? out0 : out1;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kSumCols + threadIdx.x;
  A total = 0;
  if (col < cols) {
#pragma unroll 4
    for (int64_t r = threadIdx.y; r < partial_rows; r += kSumRowThreads) total += partial[r * cols + col];
  }
  sums[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    for (int k = 1; k < kSumRowThreads; ++k) total += sums[k][threadIdx.x];
    out[col] = from_acc<Out>(total);
  }
}

// ---------------------------------------------------------------------------------
// launch
// ---------------------------------------------------------------------------------
template <typename T, typename W, typename Y, typename R>
cudaError_t forward_typed(const void* x_, const void* residual_, const void* weight_, const void* bias_, void* y_,
                          void* sum_, void* mean_, void* rstd_, int64_t rows, int64_t cols, int64_t x_stride,
                          int64_t residual_stride, double eps, bool rms, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const T* x = static_cast<const T*>(x_);
  const R* residual = static_cast<const R*>(residual_);
  const W* weight = static_cast<const W*>(weight_);
  const W* bias = static_cast<const W*>(bias_);
  Y* y = static_cast<Y*>(y_);
  R* sum = static_cast<R*>(sum_);
  A* mean = static_cast<A*>(mean_);
  A* rstd = static_cast<A*>(rstd_);
  // outputs are contiguous: their rows start aligned when cols is a whole number of vectors
  // of each (the sum's in R, y's in Y: an fp32 y's vectors are half as long as a 16-bit sum's).
  // The tiles and steps are laid out by T's vectors; rows of a wider R read or written at
  // those columns are aligned too when their strides are whole numbers of T's vectors.
  const bool aligned = rows_aligned<T>(x, x_stride) &&
                       (residual == nullptr || rows_aligned<T>(residual, residual_stride)) &&
                       rows_aligned<Y>(y, cols) && (sum == nullptr || rows_aligned<T>(sum, cols)) &&
                       (weight == nullptr || ptr_aligned(weight)) && (bias == nullptr || ptr_aligned(bias));
  if constexpr (sizeof(T) == 2 && std::is_same_v<Y, T> && std::is_same_v<R, T>) {
    // rows 16-byte aligned and of whole vectors: y's rows (cols apart) are aligned
    const bool packed = residual == nullptr && aligned && with_packed_norm(cols, [&](auto threads) {
      constexpr int kThreads = decltype(threads)::value;
      norm_forward_packed_kernel<T, W, kThreads><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
          x, weight, bias, y, mean, rstd, static_cast<int>(cols), x_stride, static_cast<A>(eps), rms);
    });
    if (packed) return cudaGetLastError();
  }
  const bool tiled = with_forward_tile<T>(cols, [&](auto threads, auto elems) {
    constexpr int kThreads = decltype(threads)::value, kElems = decltype(elems)::value;
    constexpr int kRowsPerBlock = kTileBlockThreads<kThreads> / kThreads;
    const auto grid = static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
    norm_forward_tile_kernel<T, W, Y, R, kThreads, kElems><<<grid, kTileBlockThreads<kThreads>, 0, stream>>>(
        x, residual, weight, bias, y, sum, mean, rstd, rows, cols, x_stride, residual_stride, static_cast<A>(eps), rms,
        aligned);
  });
  if (!tiled) {
    with_vec<T>(aligned, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      norm_forward_loop_kernel<T, W, Y, R, kVec><<<loop_grid(rows), kLoopThreads, 0, stream>>>(
          x, residual, weight, bias, y, sum, mean, rstd, rows, cols, x_stride, residual_stride, static_cast<A>(eps),
          rms);
    });
  }
  return cudaGetLastError();
}

// The dynamic shared memory norm_backward_loop_kernel takes to keep `sums` (0-2) running
// sums of a row of `cols` in A there: 0 (the partial rows instead) when they do not fit in
// what a block may opt in to, or when FASTDL_CUDA_NORM_SHARED_SUMS is 0.
template <typename A> cudaError_t loop_shared_bytes(int64_t cols, int sums, size_t* bytes) {
  *bytes = 0;
  int64_t enabled = 1;
  env_knob("FASTDL_CUDA_NORM_SHARED_SUMS", 0, 1, &enabled);
  if (sums == 0 || enabled == 0) return cudaSuccess;
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  const int64_t needed = static_cast<int64_t>(sums) * cols * static_cast<int64_t>(sizeof(A));
  // 1 KiB of the limit left to the kernel's static shared memory (its reduction scratch)
  if (needed <= optin - 1024) *bytes = static_cast<size_t>(needed);
  return cudaSuccess;
}

// Calls f(std::bool_constant<kSharedSums>{}) for the loop kernel that takes `shared_bytes`
// of dynamic shared memory (none: the sums in the partial rows).
template <typename F> void with_shared_sums(size_t shared_bytes, F&& f) {
  if (shared_bytes > 0) f(std::true_type{});
  else f(std::false_type{});
}

// Calls use(kernel, block_threads, rows_per_block_step, shared_bytes) for each backward
// kernel that may run at this row length: rows_per_block_step is the number of rows a
// block works on at once, shared_bytes its dynamic shared memory (with both sums). The
// loop kernel has two (16-byte vectors or single elements, by the rows' alignment).
template <typename T, typename W, typename D, typename N, typename F>
cudaError_t with_backward_kernels(int64_t cols, F&& use) {
  const bool tiled = with_backward_tile<T>(cols, [&](auto threads, auto elems) {
    constexpr int kThreads = decltype(threads)::value, kElems = decltype(elems)::value;
    use(norm_backward_tile_kernel<T, W, D, N, kThreads, kElems, true>, kTileBlockThreads<kThreads>,
        kTileBlockThreads<kThreads> / kThreads, size_t{0});
  });
  if (tiled) return cudaSuccess;
  size_t bytes = 0;
  const cudaError_t err = loop_shared_bytes<typename Acc<T>::type>(cols, 2, &bytes);
  if (err != cudaSuccess) return err;
  with_shared_sums(bytes, [&](auto shared) {
    constexpr bool kShared = decltype(shared)::value;
    use(norm_backward_loop_kernel<T, W, D, N, Vec<T>::kSize, kShared>, kLoopThreads, 1, bytes);
    use(norm_backward_loop_kernel<T, W, D, N, 1, kShared>, kLoopThreads, 1, bytes);
  });
  return cudaSuccess;
}

// Blocks that fill the device once (as many as are resident together), but no more than
// there are rows to deal out. Each block writes a partial row of dweight (and dbias) that
// the reduce then reads: FASTDL_CUDA_NORM_BLOCKS_PER_SM (at least 1) sets the blocks per SM
// instead, to weigh that traffic against parallelism. Where two kernels may run (the loop
// kernel's two variants: which one depends on pointers not known here), the fewer blocks.
// Asked of every kernel that may run for T and N (dx's narrow copy, N = T for none):
// parameters in T or in A, dy in T or (with the parameters in A) in A; the caller does not
// say which (for fp32 and fp64 rows, A = T: one set). Each is asked as it would launch
// (resident_blocks opts it in to its shared memory first), so the answer, and with it the
// order dweight / dbias are summed in, is the same at every call.
template <typename T, typename N> cudaError_t backward_blocks(int64_t rows, int64_t cols, int64_t* blocks) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  if (uses_param_kernel<T>(cols)) {  // the row blocks of norm_param_grad_kernel
    *blocks = param_row_blocks<T>(rows, cols, sms);
    return cudaSuccess;
  }
  *blocks = INT64_MAX;
  auto fewest = [&](auto kernel, int threads, int rows_at_once, size_t shared_bytes) {
    int64_t per_sm = 0;
    if (!env_knob("FASTDL_CUDA_NORM_BLOCKS_PER_SM", 1, 1 << 16, &per_sm)) {
      int resident = 0;
      const auto* function = reinterpret_cast<const void*>(kernel);
      const cudaError_t query = resident_blocks(function, threads, shared_bytes, &resident);
      if (err == cudaSuccess) err = query;
      per_sm = std::max(resident, 1);
    }
    const int64_t fill = static_cast<int64_t>(sms) * per_sm, needed = (rows + rows_at_once - 1) / rows_at_once;
    *blocks = std::min(*blocks, std::max<int64_t>(1, std::min<int64_t>(fill, needed)));
  };
  using A = typename Acc<T>::type;
  cudaError_t asked = with_backward_kernels<T, T, T, N>(cols, fewest);
  if constexpr (!std::is_same_v<A, T>) {  // 16-bit rows: the parameters, then dy too, in fp32
    if (asked == cudaSuccess) asked = with_backward_kernels<T, A, T, N>(cols, fewest);
    if (asked == cudaSuccess) asked = with_backward_kernels<T, A, A, N>(cols, fewest);
  }
  if (err == cudaSuccess) err = asked;
  return err;
}

template <typename T, typename W, typename D, typename N>
cudaError_t backward_typed(const void* dy_, const void* dsum_, const void* x_, const void* weight_,
                           const void* mean_, const void* rstd_, void* dx_, void* dx_narrow_, void* dweight_partial_,
                           void* dbias_partial_, int64_t partial_rows, void* dweight_, void* dbias_, int64_t rows,
                           int64_t cols, int64_t dy_stride, int64_t dsum_stride, int64_t x_stride, bool rms,
                           cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const D* dy = static_cast<const D*>(dy_);
  const T* dsum = static_cast<const T*>(dsum_);
  const T* x = static_cast<const T*>(x_);
  const W* weight = static_cast<const W*>(weight_);
  const A* mean = static_cast<const A*>(mean_);
  const A* rstd = static_cast<const A*>(rstd_);
  T* dx = static_cast<T*>(dx_);
  N* dx_narrow = std::is_same_v<N, T> ? nullptr : static_cast<N*>(dx_narrow_);
  W* dweight = static_cast<W*>(dweight_);
  W* dbias = static_cast<W*>(dbias_);
  // partial rows are written only for the gradients asked for
  A* dweight_partial = dweight != nullptr ? static_cast<A*>(dweight_partial_) : nullptr;
  A* dbias_partial = dbias != nullptr ? static_cast<A*>(dbias_partial_) : nullptr;
  const int64_t rows_per_block = (rows + partial_rows - 1) / partial_rows;
  const auto grid = static_cast<unsigned>(partial_rows);
  const bool param_kernel = uses_param_kernel<T>(cols);
  // partial rows are cols apart too: aligned with the rows of dx when their base is; so are
  // the narrow copy's rows to its packs' size (a pack of T's kPack elements of N)
  const bool aligned = rows_aligned<D>(dy, dy_stride) && (dsum == nullptr || rows_aligned<T>(dsum, dsum_stride)) &&
                       rows_aligned<T>(x, x_stride) && rows_aligned<T>(dx, cols) &&
                       (dx_narrow == nullptr || ptr_aligned(dx_narrow)) &&
                       (weight == nullptr || ptr_aligned(weight)) &&
                       (dweight_partial == nullptr || ptr_aligned(dweight_partial)) &&
                       (dbias_partial == nullptr || ptr_aligned(dbias_partial));
  // dx, and without the param kernel the blocks' partial rows; with it, dx alone (a row a
  // block or warp group, as the forward) and then the param kernel's partial rows
  bool launched = false;
  if constexpr (sizeof(T) == 2 && std::is_same_v<D, T> && std::is_same_v<N, T>) {
    if (param_kernel && aligned) {
      launched = with_packed_block(cols, [&](auto threads) {
        constexpr int kThreads = decltype(threads)::value;
        norm_backward_packed_kernel<T, W, kThreads><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
            dy, dsum, x, weight, mean, rstd, dx, static_cast<int>(cols), dy_stride, dsum_stride, x_stride, rms);
      });
    }
  }
  if (!launched) {
    launched = with_backward_tile<T>(cols, [&](auto threads, auto elems) {
      constexpr int kThreads = decltype(threads)::value, kElems = decltype(elems)::value;
      if (!param_kernel) {
        norm_backward_tile_kernel<T, W, D, N, kThreads, kElems, true><<<grid, kTileBlockThreads<kThreads>, 0, stream>>>(
            dy, dsum, x, weight, mean, rstd, dx, dx_narrow, dweight_partial, dbias_partial, rows, cols, rows_per_block,
            dy_stride, dsum_stride, x_stride, rms, aligned);
        return;
      }
      constexpr int kRowsPerBlock = kTileBlockThreads<kThreads> / kThreads;
      const auto dx_grid = static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
      norm_backward_tile_kernel<T, W, D, N, kThreads, kElems, false>
          <<<dx_grid, kTileBlockThreads<kThreads>, 0, stream>>>(dy, dsum, x, weight, mean, rstd, dx, dx_narrow, nullptr,
                                                                 nullptr, rows, cols, kRowsPerBlock, dy_stride,
                                                                 dsum_stride, x_stride, rms, aligned);
    });
  }
  cudaError_t err = cudaSuccess;
  if (!launched) {
    // the loop kernel: with the param kernel, a block a row and no sums (no partial rows)
    A* const dw_sums = param_kernel ? nullptr : dweight_partial;
    A* const db_sums = param_kernel ? nullptr : dbias_partial;
    const auto loop_grid = param_kernel ? static_cast<unsigned>(rows) : grid;
    const int64_t loop_rows_per_block = param_kernel ? 1 : rows_per_block;
    size_t shared_bytes = 0;
    err = loop_shared_bytes<A>(cols, (dw_sums != nullptr) + (db_sums != nullptr), &shared_bytes);
    if (err != cudaSuccess) return err;
    with_vec<T>(aligned, [&](auto vec) {
      with_shared_sums(shared_bytes, [&](auto shared) {
        constexpr int kVec = decltype(vec)::value;
        constexpr bool kShared = decltype(shared)::value;
        if (shared_bytes > kDefaultDynamicShared)
          err = opt_in_shared_memory(
              reinterpret_cast<const void*>(norm_backward_loop_kernel<T, W, D, N, kVec, kShared>), shared_bytes);
        if (err != cudaSuccess) return;
        norm_backward_loop_kernel<T, W, D, N, kVec, kShared><<<loop_grid, kLoopThreads, shared_bytes, stream>>>(
            dy, dsum, x, weight, mean, rstd, dx, dx_narrow, dw_sums, db_sums, rows, cols, loop_rows_per_block,
            dy_stride, dsum_stride, x_stride, rms);
      });
    });
  }
  if (err == cudaSuccess && param_kernel && (dweight_partial != nullptr || dbias_partial != nullptr)) {
    with_vec<T>(aligned, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      const dim3 param_grid(static_cast<unsigned>((cols + kParamWidth<kVec> - 1) / kParamWidth<kVec>), grid);
      norm_param_grad_kernel<T, D, kVec><<<param_grid, kParamWarps * kWarpSize, 0, stream>>>(
          dy, x, mean, rstd, dweight_partial, dbias_partial, rows, cols, rows_per_block, dy_stride, x_stride, rms);
    });
  }
  if (err == cudaSuccess) err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // one launch sums the partial rows of every parameter gradient asked for (grid.y of them)
  const A* partials[2];
  W* outs[2];
  unsigned wanted = 0;
  if (dweight != nullptr) partials[wanted] = dweight_partial, outs[wanted++] = dweight;
  if (dbias != nullptr) partials[wanted] = dbias_partial, outs[wanted++] = dbias;
  if (wanted == 0) return cudaSuccess;
  const dim3 sum_grid(static_cast<unsigned>((cols + kSumCols - 1) / kSumCols), wanted);
  const dim3 sum_block(kSumCols, kSumRowThreads);
  sum_partial_rows_kernel<A, W><<<sum_grid, sum_block, 0, stream>>>(
      partials[0], outs[0], partials[wanted - 1], outs[wanted - 1], partial_rows, cols);
  return cudaGetLastError();
}

}  // namespace

// The element type T of x; the parameters' type W: T itself or the accumulation type A; the
// type of y (forward) or dy (backward): T, or A when W is A; and the forward's residual and
// sum type R: T, or A when W and Y are A too (a 16-bit x beside an fp32 residual). Any other
// combination is refused.
#define FASTDL_DTYPE_CASES(CALL)                \
  case DType::kFloat32: return CALL(float);     \
  case DType::kFloat16: return CALL(__half);    \
  case DType::kBFloat16: return CALL(__nv_bfloat16); \
  case DType::kFloat64: return CALL(double);

namespace {
DType acc_dtype(DType dtype) { return dtype == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32; }

// The parameters in x's dtype or the accumulation type; y / dy in x's dtype, or in the
// accumulation type when the parameters are (CUDA autocast's fp32 norm of 16-bit x).
bool valid_types(DType dtype, DType param_dtype, DType out_dtype) {
  const DType acc = acc_dtype(dtype);
  if (param_dtype != dtype && param_dtype != acc) return false;
  return out_dtype == dtype || (out_dtype == acc && param_dtype == acc);
}

// dx's narrow copy: none (x's own dtype), or fp16 / bf16 beside fp32 rows.
bool valid_narrow(DType dtype, DType dx_narrow_dtype) {
  return dx_narrow_dtype == dtype ||
         (dtype == DType::kFloat32 && (dx_narrow_dtype == DType::kFloat16 || dx_narrow_dtype == DType::kBFloat16));
}
}  // namespace

cudaError_t norm_forward(DType dtype, DType param_dtype, DType out_dtype, DType residual_dtype, const void* x,
                         const void* residual, const void* weight, const void* bias, void* y, void* sum, void* mean,
                         void* rstd, int64_t rows, int64_t cols, int64_t x_row_stride, int64_t residual_row_stride,
                         double eps, bool rms, cudaStream_t stream) {
  if (!valid_types(dtype, param_dtype, out_dtype)) return cudaErrorInvalidValue;
  const bool residual_in_t = residual_dtype == dtype;
  if (!residual_in_t && (residual == nullptr || residual_dtype != acc_dtype(dtype) || out_dtype == dtype))
    return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (rows > INT_MAX) return cudaErrorInvalidValue;  // at most one block per row
  const bool params_in_t = param_dtype == dtype, out_in_t = out_dtype == dtype;
#define FASTDL_FORWARD(T, W, Y, R)                                                                                 \
  forward_typed<T, W, Y, R>(x, residual, weight, bias, y, sum, mean, rstd, rows, cols, x_row_stride,                \
                            residual_row_stride, eps, rms, stream)
#define FASTDL_CALL(T)                                                                    \
  params_in_t     ? FASTDL_FORWARD(T, T, T, T)                                            \
  : out_in_t      ? FASTDL_FORWARD(T, typename Acc<T>::type, T, T)                        \
  : residual_in_t ? FASTDL_FORWARD(T, typename Acc<T>::type, typename Acc<T>::type, T)    \
                  : FASTDL_FORWARD(T, typename Acc<T>::type, typename Acc<T>::type, typename Acc<T>::type)
  switch (dtype) { FASTDL_DTYPE_CASES(FASTDL_CALL) }
#undef FASTDL_CALL
#undef FASTDL_FORWARD
  return cudaErrorInvalidValue;
}

cudaError_t norm_backward_partial_rows(DType dtype, DType dx_narrow_dtype, int64_t rows, int64_t cols,
                                       int64_t* partial_rows) {
  *partial_rows = 1;
  if (!valid_narrow(dtype, dx_narrow_dtype)) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (dx_narrow_dtype != dtype) {  // fp32 rows (valid_narrow)
    return dx_narrow_dtype == DType::kFloat16 ? backward_blocks<float, __half>(rows, cols, partial_rows)
                                              : backward_blocks<float, __nv_bfloat16>(rows, cols, partial_rows);
  }
#define FASTDL_CALL(T) backward_blocks<T, T>(rows, cols, partial_rows)
  switch (dtype) { FASTDL_DTYPE_CASES(FASTDL_CALL) }
#undef FASTDL_CALL
  return cudaErrorInvalidValue;
}

cudaError_t norm_backward(DType dtype, DType param_dtype, DType dy_dtype, DType dx_narrow_dtype, const void* dy,
                          const void* dsum, const void* x, const void* weight, const void* mean, const void* rstd,
                          void* dx, void* dx_narrow, void* dweight_partial, void* dbias_partial, int64_t partial_rows,
                          void* dweight, void* dbias, int64_t rows, int64_t cols, int64_t dy_row_stride,
                          int64_t dsum_row_stride, int64_t x_row_stride, bool rms, cudaStream_t stream) {
  if (!valid_types(dtype, param_dtype, dy_dtype) || !valid_narrow(dtype, dx_narrow_dtype)) return cudaErrorInvalidValue;
  if (dx_narrow_dtype != dtype && dx_narrow == nullptr) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  if (partial_rows < 1 || partial_rows > INT_MAX) return cudaErrorInvalidValue;
  const bool params_in_t = param_dtype == dtype, dy_in_t = dy_dtype == dtype;
#define FASTDL_BACKWARD(T, W, D, N)                                                                                  \
  backward_typed<T, W, D, N>(dy, dsum, x, weight, mean, rstd, dx, dx_narrow, dweight_partial, dbias_partial,         \
                             partial_rows, dweight, dbias, rows, cols, dy_row_stride, dsum_row_stride, x_row_stride, \
                             rms, stream)
  // fp32 rows (valid_narrow; params and dy in fp32 too) whose dx is also written in fp16 / bf16
  if (dx_narrow_dtype != dtype) {
    return dx_narrow_dtype == DType::kFloat16 ? FASTDL_BACKWARD(float, float, float, __half)
                                              : FASTDL_BACKWARD(float, float, float, __nv_bfloat16);
  }
#define FASTDL_CALL(T)                                                                       \
  params_in_t ? FASTDL_BACKWARD(T, T, T, T)                                                  \
  : dy_in_t   ? FASTDL_BACKWARD(T, typename Acc<T>::type, T, T)                              \
              : FASTDL_BACKWARD(T, typename Acc<T>::type, typename Acc<T>::type, T)
  switch (dtype) { FASTDL_DTYPE_CASES(FASTDL_CALL) }
#undef FASTDL_CALL
#undef FASTDL_BACKWARD
  return cudaErrorInvalidValue;
}

#undef FASTDL_DTYPE_CASES

}  // namespace fastdl::kernels
