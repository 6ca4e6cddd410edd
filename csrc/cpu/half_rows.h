// 16-bit float rows (bf16, fp16) to and from float, for the CPU kernels. No torch here.
//
// The conversions are written with integer shifts, masks and selects, no branches and no
// libm, so that GCC turns loops over them into vector code: c10's scalar conversions do
// not vectorise, which left the 16-bit kernels 3-18x slower than torch's. Rounding is to
// nearest even, NaN stays NaN, as c10::BFloat16 / c10::Half convert.
//
// bf16 (a shift to load) is converted element by element inside the kernels' own loops
// (load_acc / store_acc): no extra pass over the row. fp16 in software costs ~20 vector
// ops an element, twice bf16's kernel time; so fp16 rows are converted whole, with F16C
// where the CPU has it, into float buffers (L1/L2) that the float kernels run on, and the
// result is rounded once into the output row. (On AVX2 CPUs the norms' fp16 kernels and
// the fp16 softmax backward convert in their own loops instead: csrc/cpu/avx2.h.)
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "csrc/cpu/common.h"

namespace fastdl::cpu {

template <typename T>
constexpr bool kIs16Bit = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

FASTDL_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
FASTDL_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// bf16 is the top half of a float.
FASTDL_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

FASTDL_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // to nearest, ties to even
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);  // NaN: c10's quiet NaN
}

// fp16 -> float: move exponent and mantissa into place and rescale by 2^112, which also
// normalises subnormals; inf / NaN take the float's all-ones exponent (F. Giesen, "half to float done quic").
FASTDL_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t u = float_to_bits(bits_to_float(uint32_t(h & 0x7fffu) << 13) * 0x1p112f);
  u |= (h & 0x7c00u) == 0x7c00u ? 0x7f800000u : 0u;
  return bits_to_float(u | sign);
}

// float -> fp16, to nearest even (F. Giesen's float_to_half_fast3_rtne, with selects for branches).
FASTDL_INLINE uint16_t float_to_half(float f) {
  uint32_t u = float_to_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  constexpr uint32_t kF32Inf = 255u << 23, kF16Max = (127u + 16u) << 23;
  constexpr uint32_t kDenormMagic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  // the three cases, each computed, then picked with masks (selects GCC keeps branch-free)
  const uint32_t overflow = 0x7c00u | ((0u - uint32_t(u > kF32Inf)) & 0x0200u);  // NaN stays NaN, the rest is inf
  const uint32_t subnormal = float_to_bits(bits_to_float(u) + bits_to_float(kDenormMagic)) - kDenormMagic;
  const uint32_t normal = (u + ((15u - 127u) << 23) + 0xfffu + ((u >> 13) & 1u)) >> 13;
  const uint32_t is_overflow = 0u - uint32_t(u >= kF16Max), is_subnormal = 0u - uint32_t(u < (113u << 23));
  const uint32_t finite = (subnormal & is_subnormal) | (normal & ~is_subnormal);
  return static_cast<uint16_t>((overflow & is_overflow) | (finite & ~is_overflow) | (sign >> 16));
}

// fp16 rows in software: the loops above, vectorised by the compiler.
FASTDL_INLINE void half_row_to_float_soft(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = half_to_float(src[j]);
}
FASTDL_INLINE void half_row_from_float_soft(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = float_to_half(src[j]);
}

// h = x + r rounded to fp16 (as the unfused add stores it), and h as float in sum.
FASTDL_INLINE void half_rows_add_soft(const uint16_t* __restrict x, const uint16_t* __restrict r,
                                      uint16_t* __restrict h, float* __restrict sum, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t rounded = float_to_half(half_to_float(x[j]) + half_to_float(r[j]));
    h[j] = rounded;
    sum[j] = half_to_float(rounded);
  }
}

// fp16 rows in hardware: F16C (every x86-64 since Ivy Bridge / Piledriver) converts 8 values
// an instruction, rounding to nearest even as the software path does; about half the time
// of the software loops, which took half of an fp16 kernel's time. Picked per row at run
// time (cpu_has_f16c), since the kernels' AVX2 clone does not assume F16C. A baseline test
// build (CMakeLists.txt) leaves them out, as a build for a CPU other than x86-64 (aarch64,
// e.g. a GH200's Grace) does: it compiles and runs the code those get.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(FASTDL_CPU_ISA_BASELINE)
#define FASTDL_F16C 1
inline bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}

// 8 fp16 values (c10::Half or their uint16_t bits) as floats, and 8 floats rounded into
// fp16 (to nearest even): the F16C loops below are built from these two.
__attribute__((target("avx,f16c"))) inline __m256 half_load8(const void* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}
__attribute__((target("avx,f16c"))) inline void half_store8(void* p, __m256 v) {
  _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

__attribute__((target("avx,f16c"))) inline void half_row_to_float_f16c(const uint16_t* __restrict src,
                                                                       float* __restrict dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(dst + j, half_load8(src + j));
  for (; j < n; ++j) dst[j] = _cvtsh_ss(src[j]);
}

__attribute__((target("avx,f16c"))) inline void half_row_from_float_f16c(const float* __restrict src,
                                                                         uint16_t* __restrict dst, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) half_store8(dst + j, _mm256_loadu_ps(src + j));
  for (; j < n; ++j) dst[j] = _cvtss_sh(src[j], _MM_FROUND_TO_NEAREST_INT);
}

// half_rows_add_soft's result in one pass over F16C (the fused forward's first pass took
// five: x and r to float, the add, the sum to fp16 and back to float).
__attribute__((target("avx,f16c"))) inline void half_rows_add_f16c(const uint16_t* __restrict x,
                                                                   const uint16_t* __restrict r,
                                                                   uint16_t* __restrict h, float* __restrict sum,
                                                                   int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 a = half_load8(x + j), b = half_load8(r + j);
    const __m128i rounded = _mm256_cvtps_ph(_mm256_add_ps(a, b), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + j), rounded);
    _mm256_storeu_ps(sum + j, _mm256_cvtph_ps(rounded));
  }
  for (; j < n; ++j) {
    h[j] = _cvtss_sh(_cvtsh_ss(x[j]) + _cvtsh_ss(r[j]), _MM_FROUND_TO_NEAREST_INT);
    sum[j] = _cvtsh_ss(h[j]);
  }
}

// An fp16 row into float `dst`, returning its max (a NaN skipped: vmaxps(v, m) gives m).
__attribute__((target("avx,f16c"))) inline float half_row_to_float_max_f16c(const uint16_t* __restrict src,
                                                                           float* __restrict dst, int64_t n) {
  __m256 m0 = _mm256_set1_ps(-__builtin_inff()), m1 = m0;  // two chains (vmaxps latency)
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 a = half_load8(src + j), b = half_load8(src + j + 8);
    _mm256_storeu_ps(dst + j, a);
    _mm256_storeu_ps(dst + j + 8, b);
    m0 = _mm256_max_ps(a, m0);
    m1 = _mm256_max_ps(b, m1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(m0, m1));
  float m = lanes[0];
  for (int k = 1; k < 8; ++k) m = lanes[k] > m ? lanes[k] : m;
  for (; j < n; ++j) {
    const float v = _cvtsh_ss(src[j]);
    dst[j] = v;
    m = v > m ? v : m;
  }
  return m;
}

// src * scale + offset rounded into an fp16 row.
__attribute__((target("avx,f16c"))) inline void half_row_from_float_affine_f16c(const float* __restrict src,
                                                                                float scale, float offset,
                                                                                uint16_t* __restrict dst, int64_t n) {
  const __m256 s = _mm256_set1_ps(scale), o = _mm256_set1_ps(offset);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) half_store8(dst + j, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(src + j), s), o));
  for (; j < n; ++j) dst[j] = _cvtss_sh(src[j] * scale + offset, _MM_FROUND_TO_NEAREST_INT);
}
#endif

// half_rows_add_soft, with F16C where the CPU has it.
FASTDL_INLINE void half_rows_add(const c10::Half* x, const c10::Half* r, c10::Half* h, float* __restrict sum,
                                 int64_t n) {
  const uint16_t* xr = reinterpret_cast<const uint16_t*>(x);
  const uint16_t* rr = reinterpret_cast<const uint16_t*>(r);
  uint16_t* hr = reinterpret_cast<uint16_t*>(h);
#ifdef FASTDL_F16C
  if (cpu_has_f16c()) return half_rows_add_f16c(xr, rr, hr, sum, n);
#endif
  half_rows_add_soft(xr, rr, hr, sum, n);
}

// n values of a 16-bit row to float, and back.
template <typename T> FASTDL_INLINE void row_to_float(const T* __restrict src, float* __restrict dst, int64_t n) {
  const uint16_t* raw = reinterpret_cast<const uint16_t*>(src);
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dst[j] = bf16_to_float(raw[j]);
  } else {
#ifdef FASTDL_F16C
    if (cpu_has_f16c()) return half_row_to_float_f16c(raw, dst, n);
#endif
    half_row_to_float_soft(raw, dst, n);
  }
}

template <typename T> FASTDL_INLINE void row_from_float(const float* __restrict src, T* __restrict dst, int64_t n) {
  uint16_t* raw = reinterpret_cast<uint16_t*>(dst);
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) raw[j] = float_to_bf16(src[j]);
  } else {
#ifdef FASTDL_F16C
    if (cpu_has_f16c()) return half_row_from_float_f16c(src, raw, n);
#endif
    half_row_from_float_soft(src, raw, n);
  }
}

// h = x + r of two 16-bit rows, rounded to their dtype (as torch's add stores it), and h as
// float in `sum`.
template <typename T>
FASTDL_INLINE void rows_add_to_float(const T* x, const T* r, T* h, float* __restrict sum, int64_t n) {
  if constexpr (std::is_same_v<T, c10::Half>) {
    half_rows_add(x, r, h, sum, n);
  } else {
    const uint16_t* xr = reinterpret_cast<const uint16_t*>(x);
    const uint16_t* rr = reinterpret_cast<const uint16_t*>(r);
    uint16_t* hr = reinterpret_cast<uint16_t*>(h);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t v = float_to_bf16(bf16_to_float(xr[j]) + bf16_to_float(rr[j]));
      hr[j] = v;
      sum[j] = bf16_to_float(v);
    }
  }
}

// A 16-bit row into float `dst`, returning its max (NaNs skipped, as max_lanes does).
template <typename T> FASTDL_INLINE float row_to_float_max(const T* __restrict src, float* __restrict dst, int64_t n) {
  const uint16_t* raw = reinterpret_cast<const uint16_t*>(src);
  if constexpr (std::is_same_v<T, c10::Half>) {
#ifdef FASTDL_F16C
    if (cpu_has_f16c()) return half_row_to_float_max_f16c(raw, dst, n);
#endif
    half_row_to_float_soft(raw, dst, n);
    return max_lanes<float>(n, -__builtin_inff(), [&](int64_t j) FASTDL_LAMBDA_INLINE { return dst[j]; });
  } else {
    return max_lanes<float>(n, -__builtin_inff(), [&](int64_t j) FASTDL_LAMBDA_INLINE {
      const float v = bf16_to_float(raw[j]);
      dst[j] = v;
      return v;
    });
  }
}

// src * scale + offset rounded into a 16-bit row (with scale 1 or offset 0, exactly the
// one operation: a fused multiply-add of either rounds once, as the plain one does).
template <typename T>
FASTDL_INLINE void row_from_float_affine(const float* __restrict src, float scale, float offset, T* __restrict dst,
                                         int64_t n) {
  uint16_t* raw = reinterpret_cast<uint16_t*>(dst);
  if constexpr (std::is_same_v<T, c10::Half>) {
#ifdef FASTDL_F16C
    if (cpu_has_f16c()) return half_row_from_float_affine_f16c(src, scale, offset, raw, n);
#endif
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) raw[j] = float_to_half(src[j] * scale + offset);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) raw[j] = float_to_bf16(src[j] * scale + offset);
  }
}

// One element as its accumulation type, and back, inside vector loops: 16-bit values
// through the branch-free conversions above (float and double as they are).
template <typename A, typename T> FASTDL_INLINE A load_acc(const T* p, int64_t j) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return bf16_to_float(reinterpret_cast<const uint16_t*>(p)[j]);
  else if constexpr (std::is_same_v<T, c10::Half>) return half_to_float(reinterpret_cast<const uint16_t*>(p)[j]);
  else return static_cast<A>(p[j]);
}
template <typename T, typename A> FASTDL_INLINE void store_acc(T* p, int64_t j, A v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) reinterpret_cast<uint16_t*>(p)[j] = float_to_bf16(v);
  else if constexpr (std::is_same_v<T, c10::Half>) reinterpret_cast<uint16_t*>(p)[j] = float_to_half(v);
  else p[j] = static_cast<T>(v);
}

// v rounded to T's precision, still in A: what a T store and load give back.
template <typename T, typename A> FASTDL_INLINE A round_acc(A v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return bf16_to_float(float_to_bf16(v));
  else if constexpr (std::is_same_v<T, c10::Half>) return half_to_float(float_to_half(v));
  else return static_cast<A>(static_cast<T>(v));
}

// Float rows for one task of a 16-bit kernel: `count` buffers of n floats each. They lie
// n + 32 floats apart: n apart, with n a multiple of 1024, element j of every buffer had the
// same address modulo 4 KiB, and each load waited on the store before it to another buffer
// (4K aliasing; the fp16 layer_norm backward through these buffers, 4096 x 1024, one
// thread: 3.3-3.65 ms -> 2.7-3.3 ms, 2-core VM, AMD EPYC).
struct FloatRows {
  FloatRows(int count, int64_t n)
      : stride_(n + 32), data_(static_cast<size_t>(count) * static_cast<size_t>(stride_)) {}
  float* operator[](int i) { return data_.data() + static_cast<int64_t>(i) * stride_; }

 private:
  int64_t stride_;
  std::vector<float> data_;
};

}  // namespace fastdl::cpu
