// Element types and their accumulators, shared by the kernels. No torch here.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/dtype.h"

namespace fastdl::kernels {

// fp32 accumulation for 16- and 32-bit floats, fp64 for fp64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ T from_acc(double v);
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }
__device__ __forceinline__ float log_acc(float v) { return logf(v); }
__device__ __forceinline__ double log_acc(double v) { return log(v); }

// max that propagates NaN (fmaxf drops it): torch's softmax of a row with a NaN is all NaN.
template <typename A> __device__ __forceinline__ A nan_max(A a, A b) { return (a > b || a != a) ? a : b; }

// kVecBytes of elements moved by one load/store instruction.
constexpr int kVecBytes = 16;
template <typename T> struct alignas(kVecBytes) Vec {
  static constexpr int kSize = kVecBytes / sizeof(T);
  T v[kSize];
};

// kVec consecutive elements of U at p, converted to the accumulation type A: in whole
// 16-byte vectors when kVec > 1 (p 16-byte aligned; 8 halves are one vector, 8 floats
// two), else one element.
template <int kVec, typename U, typename A>
__device__ __forceinline__ void load_acc(const U* p, A (&out)[kVec]) {
  if constexpr (kVec == 1) {
    out[0] = to_acc(*p);
  } else {
    constexpr int kVectors = kVec * static_cast<int>(sizeof(U)) / kVecBytes;
    static_assert(kVectors * kVecBytes == kVec * static_cast<int>(sizeof(U)), "whole 16-byte vectors");
    const Vec<U>* src = reinterpret_cast<const Vec<U>*>(p);
#pragma unroll
    for (int v = 0; v < kVectors; ++v) {
      const Vec<U> vec = src[v];
#pragma unroll
      for (int k = 0; k < Vec<U>::kSize; ++k) out[v * Vec<U>::kSize + k] = to_acc(vec.v[k]);
    }
  }
}

// The same moves the other way: in[] rounded to U and stored at p.
template <int kVec, typename U, typename A>
__device__ __forceinline__ void store_acc(U* p, const A (&in)[kVec]) {
  if constexpr (kVec == 1) {
    *p = from_acc<U>(in[0]);
  } else {
    constexpr int kVectors = kVec * static_cast<int>(sizeof(U)) / kVecBytes;
    static_assert(kVectors * kVecBytes == kVec * static_cast<int>(sizeof(U)), "whole 16-byte vectors");
    Vec<U>* dst = reinterpret_cast<Vec<U>*>(p);
#pragma unroll
    for (int v = 0; v < kVectors; ++v) {
      Vec<U> vec;
#pragma unroll
      for (int k = 0; k < Vec<U>::kSize; ++k) vec.v[k] = from_acc<U>(in[v * Vec<U>::kSize + k]);
      dst[v] = vec;
    }
  }
}

}  // namespace fastdl::kernels
