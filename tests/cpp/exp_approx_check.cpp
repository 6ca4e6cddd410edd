// Checks csrc/cpu/common.h's exp_approx against double-precision exp, over every 16th
// float of [-inf, 88] (and NaN), in a vector loop as the kernels run it; and, where the CPU
// has AVX2, csrc/cpu/avx2.h's exp_approx8 the same way. Built and run by
// tests/test_build.py. What it asserts of each:
//   [-87.3, 88]:  relative error <= 1.2e-7 (1 ulp)
//   [-88, -87.3): within 2^-126 of exp(x) (0 or a subnormal: the smallest normal float is
//                 exp(-87.34))
//   below -88, -inf: exactly 0;  NaN: NaN
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "csrc/cpu/avx2.h"
#include "csrc/cpu/common.h"

using fastdl::cpu::exp_approx;

#ifdef FASTDL_AVX2_KERNELS
FASTDL_AVX2 void exp_approx8_all(const float* x, float* y, int64_t n) {
  using namespace fastdl::cpu;
  for (int64_t i = 0; i < n; i += 8) store_cols8(y, i, n, exp_approx8(load_cols8(x, i, n)));
}
#endif

// The failures of y = exp(x) against the bounds above, printed under `name`.
int64_t check(const char* name, const std::vector<float>& x, const std::vector<float>& y) {
  int64_t failures = 0;
  double worst_rel = 0;
  float worst_x = 0;
  auto fail = [&](float xi, float got, double want) {
    if (++failures <= 10) std::printf("%s(%a) = %a, exp gives %a\n", name, xi, got, want);
  };
  for (size_t i = 0; i < x.size(); ++i) {
    const float xi = x[i], got = y[i];
    const double want = std::exp(static_cast<double>(xi));
    if (std::isnan(xi)) {
      if (!std::isnan(got)) fail(xi, got, want);
    } else if (xi < -88.0f) {
      if (got != 0.0f) fail(xi, got, want);
    } else if (xi < -87.3f) {
      if (!(std::fabs(got - want) <= 0x1p-126)) fail(xi, got, want);
    } else {
      const double rel = std::fabs(got - want) / want;
      if (rel > worst_rel) worst_rel = rel, worst_x = xi;
      if (!(rel <= 1.2e-7)) fail(xi, got, want);
    }
  }
  std::printf("%s: %zu values, worst relative error %.3g at %a, %lld failures\n", name, x.size(), worst_rel, worst_x,
              static_cast<long long>(failures));
  return failures;
}

int main() {
  std::vector<float> x, y;
  // every 16th bit pattern of the negative floats (-0 to -inf) and of the positive ones up to 88
  for (uint64_t bits = 0x80000000u; bits <= 0xff800000u; bits += 16) {
    float f;
    const uint32_t b = static_cast<uint32_t>(bits);
    std::memcpy(&f, &b, sizeof(f));
    x.push_back(f);
  }
  for (uint32_t bits = 0; ; bits += 16) {
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    if (f > 88.0f) break;
    x.push_back(f);
  }
  x.push_back(-INFINITY);
  x.push_back(88.0f);
  x.push_back(-87.3f);
  x.push_back(-88.0f);
  x.push_back(NAN);
  x.push_back(-NAN);
  y.resize(x.size());
  const int64_t n = static_cast<int64_t>(x.size());
  const float* xp = x.data();
  float* yp = y.data();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) yp[i] = exp_approx(xp[i]);

  int64_t failures = check("exp_approx", x, y);
#ifdef FASTDL_AVX2_KERNELS
  if (fastdl::cpu::cpu_has_avx2()) {
    std::vector<float> y8(x.size());
    exp_approx8_all(x.data(), y8.data(), n);
    failures += check("exp_approx8", x, y8);
  } else {
    std::printf("exp_approx8: not checked, this CPU has no AVX2\n");
  }
#endif
  std::printf("ok: %lld failures\n", static_cast<long long>(failures));
  return failures == 0 ? 0 : 1;
}
