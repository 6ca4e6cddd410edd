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

// Vector sums without -ffast-math: `kLanes` independent running sums (lane k adds the
// terms j = k, k + kLanes, ...), added at the end in a fixed tree (lanes k and k + w, for
// w = kLanes / 2, ..., 1). GCC keeps the lanes in registers (4 AVX-512 or 8 AVX2 ones,
// so 4-8 chains of adds overlap their latency) and vectorises both the loop and the tree.
// The order of the adds is fixed by n alone, the same in every ISA clone, so the result
// is deterministic. (The `omp simd reduction` form this replaces ended each sum with a
// chain of 16-64 scalar adds through the stack: ~200 cycles of a 700-cycle 256-column
// softmax row.)
#define FASTDL_LAMBDA_INLINE __attribute__((always_inline))
template <typename A> constexpr int kLanes = 256 / static_cast<int>(sizeof(A));  // 64 floats, 32 doubles

// Folds lanes [W, 2W) onto [0, W), then W / 2, ..., 1: acc[0] ends with the tree's
// result. One template level per step, so each step is a loop of constant length that
// GCC unrolls and vectorises (a loop over the steps was left scalar in large functions).
template <int W, typename A, int L, typename Combine> FASTDL_INLINE void fold_lanes(A (&acc)[L], Combine combine) {
#pragma omp simd
  for (int k = 0; k < W; ++k) acc[k] = combine(acc[k], acc[k + W]);
  if constexpr (W > 1) fold_lanes<W / 2>(acc, combine);
}

// acc[0] = the sum of the lanes, in the tree order above.
template <typename A, int L> FASTDL_INLINE A add_lanes(A (&acc)[L]) {
  fold_lanes<L / 2>(acc, [](A a, A b) FASTDL_LAMBDA_INLINE { return a + b; });
  return acc[0];
}

// Calls step(j, k) for j in [0, n) with k = j % L, its lane: L lanes at a time, then the
// rest, each a loop over lanes that GCC vectorises.
template <int L, typename Step> FASTDL_INLINE void for_each_lane(int64_t n, Step step) {
  int64_t j = 0;
  for (; j + L <= n; j += L) {
#pragma omp simd
    for (int k = 0; k < L; ++k) step(j + k, k);
  }
  const int64_t rest = n - j;
#pragma omp simd
  for (int64_t k = 0; k < rest; ++k) step(j + k, k);
}

// The sum over j in [0, n) of term(j) (which may also store), in L lanes.
template <typename A, int L = kLanes<A>, typename Term> FASTDL_INLINE A sum_lanes(int64_t n, Term term) {
  A acc[L] = {};
  for_each_lane<L>(n, [&](int64_t j, int64_t k) FASTDL_LAMBDA_INLINE { acc[k] += term(j); });
  return add_lanes(acc);
}

// Two sums over j in [0, n) in one pass, each in half of sum_lanes's lanes (the same
// registers): terms(j, a, b) sets a and b to the two terms of j.
template <typename A, typename Terms> FASTDL_INLINE void sum_lanes2(int64_t n, Terms terms, A& sum_a, A& sum_b) {
  constexpr int L = kLanes<A> / 2;
  A acc_a[L] = {}, acc_b[L] = {};
  for_each_lane<L>(n, [&](int64_t j, int64_t k) FASTDL_LAMBDA_INLINE {
    A a, b;
    terms(j, a, b);
    acc_a[k] += a;
    acc_b[k] += b;
  });
  sum_a = add_lanes(acc_a);
  sum_b = add_lanes(acc_b);
}

// The max over j in [0, n) of value(j) (init if n is 0), in lanes as sum_lanes. NaNs
// are skipped (v > m ? v : m keeps m), so a row's max is the max of its other values.
template <typename A, typename Value> FASTDL_INLINE A max_lanes(int64_t n, A init, Value value) {
  constexpr int L = kLanes<A>;
  A acc[L];
  for (int k = 0; k < L; ++k) acc[k] = init;
  for_each_lane<L>(n, [&](int64_t j, int64_t k) FASTDL_LAMBDA_INLINE {
    const A v = value(j);
    acc[k] = v > acc[k] ? v : acc[k];
  });
  fold_lanes<L / 2>(acc, [](A a, A b) FASTDL_LAMBDA_INLINE { return b > a ? b : a; });
  return acc[0];
}

// exp_approx's constants (below), shared with avx2.h's exp_approx8 (the same steps on 8 floats).
namespace exp_approx_constants {
constexpr float kClamp = 88.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: t = y + m rounds y to an integer n in t's low bits
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
// e^r ~ 1 + r + r^2 * (kPoly[0] r^5 + kPoly[1] r^4 + ... + kPoly[5]), Horner's order
constexpr float kPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace exp_approx_constants

// exp(x) for float, max relative error 8.3e-8 (1 ulp) on [-87.3, 88]
// (tests/cpp/exp_approx_check.cpp).
// Cody & Waite range reduction: n = round(x / ln2), r = x - n*ln2 with ln2 split in a
// high part (exact in float) and a low part, then Cephes' degree-7 polynomial for e^r
// and 2^n built in the exponent field. No libm call, no branch and no select past the
// clamp, so a loop over it becomes AVX2 / AVX-512 code.
// Meant for x <= ~88 (softmax feeds x - max <= 0). Below -87.34 the result is 0 or a
// subnormal: x is clamped at -88, where n = -127 gives 2^n's field 0 and so 0, so -inf
// gives 0. NaN gives NaN: the clamps keep it (x < c ? c : x is x for NaN) and every step
// after carries it.
__attribute__((always_inline)) inline float exp_approx(float x) {
  using namespace exp_approx_constants;
  float xc = x < -kClamp ? -kClamp : x;
  xc = xc > kClamp ? kClamp : xc;
  const float t = xc * kLog2e + kRoundMagic;
  const float n = t - kRoundMagic;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = kPoly[0];
  p = p * r + kPoly[1];
  p = p * r + kPoly[2];
  p = p * r + kPoly[3];
  p = p * r + kPoly[4];
  p = p * r + kPoly[5];
  p = p * (r * r) + r + 1.0f;
  // 2^n: n + 127 in the exponent field, n = t's bits less the magic's (no float -> int conversion)
  uint32_t t_bits, magic_bits;
  std::memcpy(&t_bits, &t, sizeof(t_bits));
  std::memcpy(&magic_bits, &kRoundMagic, sizeof(magic_bits));
  const uint32_t scale_bits = (t_bits - magic_bits + 127u) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return p * scale;
}

}  // namespace fastdl::cpu
