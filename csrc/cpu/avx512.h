// AVX-512 (F, BW, VL) helpers for CPU kernels written in intrinsics. No torch here.
//
// The kernels' generic loops are C++ that GCC vectorises per ISA level (common.h), which
// serves float, double and bf16. fp16 is the exception: GCC 12 does not vectorise fp16
// conversions, so the generic loops take fp16 rows through float buffers (half_rows.h), a
// conversion pass bound by memory and then the math, one after the other. Kernels written
// with these helpers convert 16 fp16 values in the loop that loads or stores them, so the
// loads overlap the math, with masked loads and stores for a row's last columns. They are
// picked at run time (cpu_has_avx512), beside the generic code for other CPUs.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include "csrc/cpu/common.h"

#define FASTDL_AVX512_KERNELS 1
#define FASTDL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace fastdl::cpu {

inline bool cpu_has_avx512() {
#if defined(FASTDL_CPU_ISA_BASELINE) || defined(FASTDL_CPU_ISA_V3)
  return false;  // a test build for one lower level (CMakeLists.txt) runs that level's code
#else
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
#endif
}

// The mask of the first n of 16 lanes (none for n <= 0).
inline __mmask16 first_lanes(int64_t n) {
  return n <= 0 ? __mmask16(0) : n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u);
}

// The lanes of m of 16 fp16 values as floats (0 elsewhere), and v's lanes of m rounded
// into fp16 (to nearest even). Here and below, the maskz form of an intrinsic with an
// all-ones mask, where the plain one has an undefined source operand that GCC 12 warns of
// (GCC bug 105593).
FASTDL_AVX512 inline __m512 half_load16(const void* p, __mmask16 m) {
  return _mm512_maskz_cvtph_ps(0xffff, _mm256_maskz_loadu_epi16(m, p));
}
FASTDL_AVX512 inline void half_store16(void* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(p, m, _mm512_maskz_cvtps_ph(0xffff, v, _MM_FROUND_TO_NEAREST_INT));
}

// The sum of the L = 16 * R lanes held in R registers (lanes 16 r to 16 r + 15 in
// register r), in add_lanes' tree: the order sum_lanes gives L lanes.
template <int R> FASTDL_AVX512 inline float add_lanes_of(const __m512 (&regs)[R]) {
  alignas(64) float lanes[16 * R];
  for (int r = 0; r < R; ++r) _mm512_store_ps(lanes + 16 * r, regs[r]);
  return add_lanes(lanes);
}

// exp_approx (common.h) on 16 floats: the same steps, constants and clamps. NaN stays
// NaN: vmaxps / vminps return their second operand when either is NaN.
FASTDL_AVX512 inline __m512 exp_approx16(__m512 x) {
  const __mmask16 all = 0xffff;
  const __m512 round_magic = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23
  const __m512 low_clamped = _mm512_maskz_max_ps(all, _mm512_set1_ps(-88.0f), x);
  const __m512 xc = _mm512_maskz_min_ps(all, _mm512_set1_ps(88.0f), low_clamped);
  const __m512 t = _mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), round_magic);
  const __m512 n = _mm512_sub_ps(t, round_magic);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  // 2^n: n + 127 in the exponent field, n = t's bits less the magic's
  const __m512i magic_bits = _mm512_castps_si512(round_magic);
  const __m512i field = _mm512_sub_epi32(_mm512_castps_si512(t), magic_bits);
  const __m512i scale = _mm512_maskz_slli_epi32(all, _mm512_add_epi32(field, _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(scale));
}

}  // namespace fastdl::cpu
#endif
