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

// Sum over the block; every thread gets the result. `scratch` holds kThreads/32 values.
template <int kThreads, typename A> __device__ __forceinline__ A block_sum(A v, A* scratch) {
  static_assert(kThreads % kWarpSize == 0 && kThreads <= 1024, "block of whole warps");
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read from a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : A(0);
  return warp_sum(v);
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
  return {m, a.s * exp_acc(a.m - m) + b.s * exp_acc(b.m - m)};
}

template <typename A> __device__ __forceinline__ MaxSum<A> warp_combine(MaxSum<A> v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    MaxSum<A> other{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
    v = combine(v, other);
  }
  return v;
}

template <int kThreads, typename A> __device__ __forceinline__ MaxSum<A> block_combine(MaxSum<A> v, MaxSum<A>* scratch) {
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_combine(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : MaxSum<A>{-INFINITY, A(0)};
  return warp_combine(v);
}

}  // namespace fastdl::kernels
