// Warp and block reductions. No torch here.
#pragma once
#include "common/types.cuh"

namespace fastdl::kernels {

constexpr int kWarpSize = 32;

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename A> __device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Reduction over the block with warp_reduce (warp_sum, warp_max); every thread gets the
// result. `scratch` holds kThreads/32 values; `identity` fills the lanes past the warps.
template <int kThreads, typename A, typename WarpReduce>
__device__ __forceinline__ A block_reduce(A v, A* scratch, A identity, WarpReduce warp_reduce) {
  static_assert(kThreads % kWarpSize == 0 && kThreads <= 1024, "block of whole warps");
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_reduce(v);
  __syncthreads();  // scratch may still be read from a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : identity;
  return warp_reduce(v);
}

template <int kThreads, typename A> __device__ __forceinline__ A block_sum(A v, A* scratch) {
  return block_reduce<kThreads>(v, scratch, A(0), [](A u) { return warp_sum(u); });
}

template <int kThreads, typename A> __device__ __forceinline__ A block_max(A v, A* scratch) {
  return block_reduce<kThreads>(v, scratch, A(-INFINITY), [](A u) { return warp_max(u); });
}

// Reductions over a group of kThreads threads sharing a row: one warp (shuffles only, so
// warps of one block may run different rows), or the whole block (kThreads == blockDim.x,
// so every thread of the block must call them).
template <int kThreads, typename A> __device__ __forceinline__ A group_sum(A v, A* scratch) {
  if constexpr (kThreads == kWarpSize) return warp_sum(v);
  else return block_sum<kThreads>(v, scratch);
}

// Two sums over a group at once (the same as group_sum of each): one barrier round where a block
// shares the row, the two shuffles of a step independent. `scratch` holds 2 * kThreads/32 values.
template <int kThreads, typename A> __device__ __forceinline__ void group_sum2(A& a, A& b, A* scratch) {
  a = warp_sum(a);
  b = warp_sum(b);
  if constexpr (kThreads > kWarpSize) {
    static_assert(kThreads % kWarpSize == 0 && kThreads <= 1024, "block of whole warps");
    constexpr int kWarps = kThreads / kWarpSize;
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    __syncthreads();  // scratch may still be read from a previous reduction
    if (lane == 0) {
      scratch[warp] = a;
      scratch[kWarps + warp] = b;
    }
    __syncthreads();
    a = warp_sum(lane < kWarps ? scratch[lane] : A(0));
    b = warp_sum(lane < kWarps ? scratch[kWarps + lane] : A(0));
  }
}

template <int kThreads, typename A> __device__ __forceinline__ A group_max(A v, A* scratch) {
  if constexpr (kThreads == kWarpSize) return warp_max(v);
  else return block_max<kThreads>(v, scratch);
}

// Online-softmax state: running max m and sum s of exp(x - m).
// Combining two states rescales both sums to the larger max
// (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax").
template <typename A> struct MaxSum {
  A m, s;
};

template <typename A> __device__ __forceinline__ MaxSum<A> combine(MaxSum<A> a, MaxSum<A> b) {
  const A m = nan_max(a.m, b.m);
  if (m == -INFINITY) return {m, A(0)};  // nothing but -inf seen yet: exp(-inf - -inf) would be NaN
  return {m, a.s * exp_fast_acc(a.m - m) + b.s * exp_fast_acc(b.m - m)};
}

template <typename A> __device__ __forceinline__ MaxSum<A> warp_combine(MaxSum<A> v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    MaxSum<A> other{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
    v = combine(v, other);
  }
  return v;
}

template <int kThreads, typename A>
__device__ __forceinline__ MaxSum<A> block_combine(MaxSum<A> v, MaxSum<A>* scratch) {
  return block_reduce<kThreads>(v, scratch, MaxSum<A>{-INFINITY, A(0)}, [](MaxSum<A> u) { return warp_combine(u); });
}

// Count n, mean and sum of squared deviations from the mean m2 of some values, for the
// variance in one sweep (m2 / n), as stable as from deviations of a mean found first (the sum
// of squares less the squared sum cancels in fp32): Welford's running update (1962), here a
// state taken over a few values at once combined with another as Chan, Golub & LeVeque (1979).
template <typename A> struct MeanM2 {
  A n, mean, m2;
};

template <typename A> __device__ __forceinline__ MeanM2<A> combine(MeanM2<A> a, MeanM2<A> b) {
  const A n = a.n + b.n;
  if (n == A(0)) return a;
  const A delta = b.mean - a.mean, share = ratio_acc(b.n, n);
  // b's mean as it is into an empty a (not b.mean times ratio_acc's b.n / n, which may be a hair
  // off 1): then equal means, a constant row's, stay exact
  return {n, a.n == A(0) ? b.mean : a.mean + delta * share, a.m2 + b.m2 + delta * delta * a.n * share};
}

// The state of kN values held at once: their mean, then their squared deviations from it.
// The sum pairwise, so that kN (a power of 2) equal values give their value exactly as the
// mean (in order, 3 c could round), and combine keeps a constant row's mean exact.
template <int kN, typename A> __device__ __forceinline__ MeanM2<A> mean_m2(const A (&v)[kN]) {
  static_assert((kN & (kN - 1)) == 0, "a power of 2 of values");
  A part[kN];
#pragma unroll
  for (int k = 0; k < kN; ++k) part[k] = v[k];
#pragma unroll
  for (int width = kN / 2; width > 0; width /= 2) {
#pragma unroll
    for (int k = 0; k < width; ++k) part[k] += part[k + width];
  }
  const A mean = part[0] / static_cast<A>(kN);
  A m2 = 0;
#pragma unroll
  for (int k = 0; k < kN; ++k) m2 += (v[k] - mean) * (v[k] - mean);
  return {static_cast<A>(kN), mean, m2};
}

// The block's threads' states (of n values in all) as one, every thread getting it (Chan et
// al.: the mean of the means weighted by their counts, then the squared deviations plus each
// mean's from it, count times). The means are weighted as differences from the first thread's
// (the row's first values): equal means, a constant row's, then give that mean exactly, where
// the sum of c times each count, over n, may round. Block sums: the same bits in every thread.
// Thread 0 holds values (n >= 1).
template <int kThreads, typename A>
__device__ __forceinline__ MeanM2<A> block_mean_m2(MeanM2<A> v, A n, A* scratch) {
  __syncthreads();  // scratch may still be read from a previous reduction
  if (threadIdx.x == 0) scratch[0] = v.mean;
  __syncthreads();
  const A first = scratch[0];
  const A mean = first + block_sum<kThreads>(v.n * (v.mean - first), scratch) / n;
  const A dev = v.mean - mean;
  return {n, mean, block_sum<kThreads>(v.m2 + v.n * dev * dev, scratch)};
}

}  // namespace fastdl::kernels
