// Element types and their accumulators, shared by the kernels. No torch here.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

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
// e^v for the softmax forward's v = x - max <= 0, as 2^(v log2(e)) (Triton's tl.exp too): exp2f
// is MUFU.EX2 and a fix-up for subnormal results, 5 instructions on sm_90a, where expf's range
// reduction to 1 ulp takes 8. For the kernels that take it twice a value (the sum, then y: the
// packed, block and chunk kernels; the packed ones were issue-bound in part, 58% of the SMs'
// issue rate, Nsight Compute on the H200 at 2b1309b). Its error: exp2f's 2 ulp plus the
// product's rounding, |v| log2(e) 2^-24 relative, so the values far below the max, which weigh
// least, err most (4e-7 at v = -10); a softmax's norm-wise error stays near 2e-7 (simulated in
// float32 on rows of randn x 1 to 1000, 1000 and 50257 wide). The tiles, which take it once
// (fp32 1024 x 16: 32 -> 43 registers with this one, one block an SM where there were two),
// and the backward (the fp32 log_softmax block kernel spilled 8 bytes on sm_80) keep exp_acc.
__device__ __forceinline__ float exp_fast_acc(float v) { return exp2f(v * 1.44269504088896341f); }
__device__ __forceinline__ double exp_fast_acc(double v) { return exp(v); }
__device__ __forceinline__ float log_acc(float v) { return logf(v); }
__device__ __forceinline__ double log_acc(double v) { return log(v); }
// a / b where 2 ulp will do (weights of running means): fp32's fast divide, no IEEE slow path
// (a subroutine call, which cost some instantiations a stack frame and spills)
__device__ __forceinline__ float ratio_acc(float a, float b) { return __fdividef(a, b); }
__device__ __forceinline__ double ratio_acc(double a, double b) { return a / b; }

// max that propagates NaN (fmaxf drops it): torch's softmax of a row with a NaN is all NaN.
template <typename A> __device__ __forceinline__ A nan_max(A a, A b) { return (a > b || a != a) ? a : b; }

// Where a vector access's address must be aligned: a no-op here (on a GPU a misaligned one
// faults); the CPU emulator of the tests (tests/cpp/cuda_emu) defines it to check, since its
// sanitizer does not see every misaligned access of a 16-bit element type's vector.
#ifndef FASTDL_CHECK_ALIGNED
#define FASTDL_CHECK_ALIGNED(p, bytes)
#endif

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
    FASTDL_CHECK_ALIGNED(p, kVecBytes);
    const Vec<U>* src = reinterpret_cast<const Vec<U>*>(p);
#pragma unroll
    for (int v = 0; v < kVectors; ++v) {
      const Vec<U> vec = src[v];
#pragma unroll
      for (int k = 0; k < Vec<U>::kSize; ++k) out[v * Vec<U>::kSize + k] = to_acc(vec.v[k]);
    }
  }
}

// kN elements of U moved as one aligned access of kN * sizeof(U) bytes: a pack of a row
// narrower than the rows a kernel walks in 16-byte vectors (4 floats a step, whose gradient
// also rounded to bf16 is 4 x 2 bytes). p aligned to the pack's size.
template <typename U, int kN> struct alignas(sizeof(U) * kN) NarrowPack {
  U v[kN];
};

// kN values of in[] rounded to U and stored at p, as whole 16-byte vectors, or as one
// NarrowPack when kN values of U are less than a vector.
template <int kN, typename U, typename A> __device__ __forceinline__ void store_packed(U* p, const A* in) {
  if constexpr (kN * sizeof(U) < kVecBytes) {
    NarrowPack<U, kN> pack;
#pragma unroll
    for (int k = 0; k < kN; ++k) pack.v[k] = from_acc<U>(in[k]);
    FASTDL_CHECK_ALIGNED(p, sizeof pack);
    *reinterpret_cast<NarrowPack<U, kN>*>(p) = pack;
  } else {
    constexpr int kVectors = kN * static_cast<int>(sizeof(U)) / kVecBytes;
    static_assert(kVectors * kVecBytes == kN * static_cast<int>(sizeof(U)), "whole 16-byte vectors");
    FASTDL_CHECK_ALIGNED(p, kVecBytes);
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

// The same moves the other way: in[] rounded to U and stored at p (a U narrower than the
// kernel's rows: one NarrowPack, p aligned to its size).
template <int kVec, typename U, typename A>
__device__ __forceinline__ void store_acc(U* p, const A (&in)[kVec]) {
  if constexpr (kVec == 1) {
    *p = from_acc<U>(in[0]);
  } else {
    store_packed<kVec>(p, in);
  }
}

// store_acc for the loops that walk a row in 16-byte steps (softmax's block and chunk write
// kernels, the norm forward loop kernel's sweep 2): each vector's bits gathered into one
// 128-bit integer and stored as one, so that it goes out as one STG.E.128. Stored as a Vec<U>
// in those loops, nvcc split some into 2- and 4-byte stores (a bf16 vector as 8 STG.E.U16,
// sm_90a; the norm forward loop kernel ran at a third of Triton's speed with them, 2b1309b), and
// a uint4 into four 4-byte ones. Inline PTX keeps them whole too, but nvcc then orders every
// load after the store before it (one 16-byte load in flight a thread, and no ld.global.nc).
// The tiles keep store_acc: built this way, some of theirs took up to 15 more registers a thread.
template <int kVec, typename U, typename A>
__device__ __forceinline__ void store_acc_whole(U* p, const A (&in)[kVec]) {
  if constexpr (kVec * sizeof(U) < kVecBytes) {
    store_acc<kVec>(p, in);
  } else {
    using Bits = std::conditional_t<sizeof(U) == 2, uint16_t, std::conditional_t<sizeof(U) == 4, uint32_t, uint64_t>>;
    static_assert(sizeof(Bits) == sizeof(U), "elements of 2, 4 or 8 bytes");
    constexpr int kVectors = kVec * static_cast<int>(sizeof(U)) / kVecBytes;
    FASTDL_CHECK_ALIGNED(p, kVecBytes);
#pragma unroll
    for (int v = 0; v < kVectors; ++v) {
      unsigned __int128 word = 0;
#pragma unroll
      for (int k = 0; k < Vec<U>::kSize; ++k) {
        const U element = from_acc<U>(in[v * Vec<U>::kSize + k]);
        Bits bits;
        memcpy(&bits, &element, sizeof bits);
        // little-endian: column k at byte k * size
        word |= static_cast<unsigned __int128>(bits) << (8 * sizeof(U) * k);
      }
      reinterpret_cast<unsigned __int128*>(p)[v] = word;
    }
  }
}

}  // namespace fastdl::kernels
