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
// backward, bound by its exp, 0.81-0.84 ms against these 0.93-1.04 ms, aten 1.06-1.1.)
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
  return has;
}

// 8 fp16 / float values at p as floats, and v stored at p, rounded into fp16 / as floats.
FASTDL_AVX2 inline __m256 load8(const c10::Half* p) { return half_load8(p); }
FASTDL_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
FASTDL_AVX2 inline void store8(c10::Half* p, __m256 v) { half_store8(p, v); }
FASTDL_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

// All ones in the lanes below k of 8, 0 elsewhere (to zero what a tail's padding gives).
FASTDL_AVX2 inline __m256 first_lanes8(int64_t k) {
  return _mm256_cmp_ps(_mm256_set1_ps(static_cast<float>(k < 8 ? k : 8)), _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7),
                       _CMP_GT_OQ);
}

// Columns [at, at + 8) of a row that ends at column n, as floats (0 past the end), and v
// into those of them before the end (rounded into fp16 for fp16 rows). A row's last, partial
// block: loaded as the row's last 8 values moved down by a lane permute where the row has
// 8 or more (through the stack, a load would wait on the stores before it), else through 8
// on the stack; stored through 8 on the stack. (Not vmaskmovps: AVX2 has no 16-bit form,
// and the float store form is microcoded on AMD CPUs: it took the norm backward from 2.9
// to 5.4 ms on an EPYC.) The copy loops have a constant length: memcpy(k) was a libc call.
template <typename T> FASTDL_AVX2 inline __m256 load_cols8(const T* row, int64_t at, int64_t n) {
  const int64_t k = n - at;
  if (k >= 8) return load8(row + at);
  if (n >= 8) {
    const __m256i down = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                          _mm256_set1_epi32(static_cast<int>(8 - k)));
    return _mm256_and_ps(_mm256_permutevar8x32_ps(load8(row + n - 8), down), first_lanes8(k));
  }
  alignas(32) T part[8] = {};
  for (int i = 0; i < 8; ++i)
    if (i < k) part[i] = row[at + i];
  return load8(part);
}
template <typename T> FASTDL_AVX2 inline void store_cols8(T* row, int64_t at, int64_t n, __m256 v) {
  const int64_t k = n - at;
  if (k >= 8) return store8(row + at, v);
  alignas(32) T part[8];
  store8(part, v);
  for (int i = 0; i < 8; ++i)
    if (i < k) row[at + i] = part[i];
}

// v rounded to fp16 precision (to nearest even), as floats: what an fp16 store and load give.
FASTDL_AVX2 inline __m256 half_round8(__m256 v) {
  return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

// For lambdas called in FASTDL_AVX2 functions: the same target, inlined.
#define FASTDL_AVX2_LAMBDA __attribute__((target("avx2,fma,f16c"), always_inline))

// body(at, end) for the columns [at, at + 8) of a row of n, 8 at a time, where body loads
// and stores with load_cols8 / store_cols8(.., at, end, ..). end is at + 8 in the loop over
// whole blocks, so the compiler drops the tail code there (inside the loop it took
// registers: the fp16 log_softmax backward went from 0.95 to 1.15 ms), and n for a row's
// last, partial block.
template <typename Body> FASTDL_AVX2 inline void for_cols8(int64_t n, Body body) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) body(j, j + 8);
  if (j < n) body(j, n);
}

// S sums over a row of n columns: add(at, end, acc) adds the terms of columns [at, at + 8)
// into acc[0..S), as for_cols8's body (those past the row must add 0). Four registers a
// sum (column j in lane j % 32), then add_lanes' tree: the order is fixed by n alone.
template <int S, typename Add> FASTDL_AVX2 inline void sum_row8(int64_t n, Add add, float (&sums)[S]) {
  __m256 acc[4][S];
  for (int part = 0; part < 4; ++part)
    for (int s = 0; s < S; ++s) acc[part][s] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
#pragma GCC unroll 4
    for (int part = 0; part < 4; ++part) add(j + 8 * part, j + 8 * part + 8, acc[part]);
  }
#pragma GCC unroll 4
  for (int part = 0; part < 4; ++part)  // the last n % 32 columns
    if (j + 8 * part < n) add(j + 8 * part, n, acc[part]);
  for (int s = 0; s < S; ++s) {
    alignas(32) float lanes[32];
    for (int part = 0; part < 4; ++part) _mm256_store_ps(lanes + 8 * part, acc[part][s]);
    sums[s] = add_lanes(lanes);
  }
}

// exp_approx (common.h) on 8 floats: the same steps, constants and clamps. NaN stays NaN:
// vmaxps / vminps return their second operand when either is NaN.
FASTDL_AVX2 inline __m256 exp_approx8(__m256 x) {
  using namespace exp_approx_constants;
  const __m256 round_magic = _mm256_set1_ps(kRoundMagic);
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(kClamp), _mm256_max_ps(_mm256_set1_ps(-kClamp), x));
  const __m256 t = _mm256_fmadd_ps(xc, _mm256_set1_ps(kLog2e), round_magic);
  const __m256 n = _mm256_sub_ps(t, round_magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kPoly[0]);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kPoly[1]));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kPoly[2]));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kPoly[3]));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kPoly[4]));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kPoly[5]));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  // 2^n: n + 127 in the exponent field, n = t's bits less the magic's
  const __m256i field = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(round_magic));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(field, _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

}  // namespace fastdl::cpu
#endif
