// AVX2 + FMA + F16C (x86-64-v3) helpers for CPU kernels written in intrinsics. No torch.
//
// The kernels' generic loops are C++ that GCC vectorises per ISA level (common.h), which
// serves float, double and bf16. fp16 is the exception: GCC 12 does not vectorise fp16
// conversions, so the generic loops take fp16 rows through float buffers (half_rows.h), a
// conversion pass bound by memory and then the math, one after the other (the fp16
// layer_norm backward took twice bf16's time). Kernels written with these helpers convert
// 8 fp16 values (F16C) in the loop that loads or stores them, so the loads overlap the
// math. They are picked at run time (cpu_has_avx2), beside the generic code for older
// CPUs. (AVX-512 versions, 16 values a register, were measured too, at 4096 x 1024 on the
// dev VM's EPYC: the norm backward no faster, as it waits on memory; the log_softmax
// backward, bound by its exp, 0.81-0.84 ms against these 0.95-1.04 ms, aten 1.06-1.1.)
#pragma once
#include <cstdint>
#include <cstring>

#include "csrc/cpu/common.h"
#include "csrc/cpu/half_rows.h"

#ifdef FASTDL_F16C
#define FASTDL_AVX2_KERNELS 1
#define FASTDL_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace fastdl::cpu {

inline bool cpu_has_avx2() {
  static const bool has = cpu_has_f16c() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;  // cpu_has_f16c is false in the baseline test build (CMakeLists.txt)
}

// 8 fp16 / float values at p as floats, and v stored at p, rounded into fp16 / as floats.
FASTDL_AVX2 inline __m256 load8(const c10::Half* p) { return half_load8(p); }
FASTDL_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
FASTDL_AVX2 inline void store8(c10::Half* p, __m256 v) { half_store8(p, v); }
FASTDL_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

// load8 / store8 of the first min(k, 8) values at p (loads give 0 after them): a row's last
// k < 8 values go through 8 on the stack. (Not vmaskmovps: AVX2 has no 16-bit form, and
// the float store form is microcoded on AMD CPUs: it took the norm backward from 2.9 to
// 5.4 ms on an EPYC.)
template <typename T> FASTDL_AVX2 inline __m256 load8_first(const T* p, int64_t k) {
  if (k >= 8) return load8(p);
  alignas(32) T part[8] = {};
  std::memcpy(part, p, static_cast<size_t>(k) * sizeof(T));
  return load8(part);
}
template <typename T> FASTDL_AVX2 inline void store8_first(T* p, int64_t k, __m256 v) {
  if (k >= 8) return store8(p, v);
  alignas(32) T part[8];
  store8(part, v);
  std::memcpy(p, part, static_cast<size_t>(k) * sizeof(T));
}

// The sum of the L = 8 * R lanes held in R registers (lanes 8 r to 8 r + 7 in register r),
// in add_lanes' tree: the order sum_lanes gives L lanes.
template <int R> FASTDL_AVX2 inline float add_lanes_of(const __m256 (&regs)[R]) {
  alignas(32) float lanes[8 * R];
  for (int r = 0; r < R; ++r) _mm256_store_ps(lanes + 8 * r, regs[r]);
  return add_lanes(lanes);
}

// exp_approx (common.h) on 8 floats: the same steps, constants and clamps. NaN stays NaN:
// vmaxps / vminps return their second operand when either is NaN.
FASTDL_AVX2 inline __m256 exp_approx8(__m256 x) {
  const __m256 round_magic = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-88.0f), x));
  const __m256 t = _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), round_magic);
  const __m256 n = _mm256_sub_ps(t, round_magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  // 2^n: n + 127 in the exponent field, n = t's bits less the magic's
  const __m256i field = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(round_magic));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(field, _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

}  // namespace fastdl::cpu
#endif
