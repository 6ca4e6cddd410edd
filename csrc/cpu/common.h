// Shared by the CPU kernels: multiversioning, accumulation types, work split, and
// branch-free float math that GCC vectorises inside `#pragma omp simd` loops.
#pragma once
#include <cstdint>
#include <cstring>

namespace fastdl::cpu {

// Row kernels are built once per ISA level and the dynamic loader picks one at load
// time (GCC function multiversioning), so the wheel runs on any x86-64. Per-row helpers
// are forced inline so that each clone gets its own vector code. The levels, not single
// ISAs: x86-64-v4 (AVX-512 F/BW/DQ/VL) converts and packs 16-bit rows in 512-bit
// registers, where an "avx512f" clone, lacking BW, did so in 256-bit ones; x86-64-v3 is
// AVX2 with FMA and F16C.
// A test build can ask for one level (FASTDL_CPU_ISA, CMakeLists.txt), to run the code of
// a level this machine would not pick.
#if defined(FASTDL_CPU_ISA_BASELINE)
#define FASTDL_MULTIVERSION
#elif defined(FASTDL_CPU_ISA_V3)
#define FASTDL_MULTIVERSION __attribute__((target("arch=x86-64-v3")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTDL_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTDL_MULTIVERSION
#endif
#define FASTDL_INLINE inline __attribute__((always_inline))

// Accumulation type: float for 16/32-bit floats, double for double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Rows per parallel task: at least `work` elements each (~32k by default), so threads
// are not woken for tiny rows. softmax takes 8k: its exp makes each element dearer, and
// a 32 x 512 input then runs on two threads (10.8 -> 7.4 us, torch 6.9 us, 2-core VM).
inline int64_t grain_rows(int64_t cols, int64_t work = 32768) {
  return cols >= work ? 1 : work / (cols > 0 ? cols : 1);
}

// The sum over j in [0, n) of term(j) (which may also store), as four vector sums over
// the four quarters of the range, added at the end. One vector accumulator is a chain of
// dependent adds, 4 cycles each on current x86 cores: a loop that only loads and adds
// waits on it (half of a LayerNorm forward's time went to its mean's adds); four chains
// overlap. The order of the adds is fixed by n alone, so the result is deterministic.
#define FASTDL_LAMBDA_INLINE __attribute__((always_inline))
template <typename A, typename Term> FASTDL_INLINE A sum_quarters(int64_t n, Term term) {
  const int64_t q = n / 4;
  A s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t j = 0; j < q; ++j) {
    s0 += term(j);
    s1 += term(q + j);
    s2 += term(2 * q + j);
    s3 += term(3 * q + j);
  }
  A tail = 0;
  for (int64_t j = 4 * q; j < n; ++j) tail += term(j);
  return ((s0 + s1) + (s2 + s3)) + tail;
}

// The max over j in [0, n) of value(j), four chains as sum_quarters. NaNs are skipped
// (as a > b ? a : b does), so a row's max is the max of its other values.
template <typename A, typename Value> FASTDL_INLINE A max_quarters(int64_t n, A init, Value value) {
  const int64_t q = n / 4;
  A m0 = init, m1 = init, m2 = init, m3 = init;
#pragma omp simd reduction(max : m0, m1, m2, m3)
  for (int64_t j = 0; j < q; ++j) {
    const A v0 = value(j), v1 = value(q + j), v2 = value(2 * q + j), v3 = value(3 * q + j);
    m0 = v0 > m0 ? v0 : m0;
    m1 = v1 > m1 ? v1 : m1;
    m2 = v2 > m2 ? v2 : m2;
    m3 = v3 > m3 ? v3 : m3;
  }
  for (int64_t j = 4 * q; j < n; ++j) {
    const A v = value(j);
    m0 = v > m0 ? v : m0;
  }
  m0 = m1 > m0 ? m1 : m0;
  m2 = m3 > m2 ? m3 : m2;
  return m2 > m0 ? m2 : m0;
}

// exp(x) for float, max relative error 8e-8 (1 ulp) on [-87.3, 1].
// Cody & Waite range reduction: n = round(x / ln2), r = x - n*ln2 with ln2 split in a
// high part (exact in float) and a low part, then Cephes' degree-7 polynomial for e^r
// and 2^n built in the exponent field. No libm call and no branch, so a loop over it
// becomes AVX2 / AVX-512 code. Meant for x <= ~88 (softmax feeds x - max <= 0):
// x < -87.34 gives 0, so -inf gives 0; NaN gives NaN.
__attribute__((always_inline)) inline float exp_approx(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: (t + m) - m rounds t to an integer
  const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  float xc = x < -88.0f ? -88.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  const float n = (xc * kLog2e + kRoundMagic) - kRoundMagic;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float result = x < -87.34f ? 0.0f : p * scale;
  return x != x ? x : result;
}

}  // namespace fastdl::cpu
