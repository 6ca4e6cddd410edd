// Exhaustive check of csrc/cpu/half_rows.h against c10's own conversions: every 16-bit
// pattern to float, and float -> 16-bit for every pattern's neighbourhood plus random
// floats (ties, overflow, subnormals, NaN). Built and run by tests/test_build.py.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "csrc/cpu/half_rows.h"

using fastdl::cpu::bf16_to_float;
using fastdl::cpu::bits_to_float;
using fastdl::cpu::float_to_bf16;
using fastdl::cpu::float_to_bits;
using fastdl::cpu::float_to_half;
using fastdl::cpu::half_to_float;

static int failures = 0;

static void check_to_float(const char* what, uint16_t h, float got, float want) {
  if (std::isnan(want) ? !std::isnan(got) : float_to_bits(got) != float_to_bits(want)) {
    if (++failures <= 10) std::printf("%s(0x%04x) = %a, c10 gives %a\n", what, h, got, want);
  }
}

static void check_from_float(float f) {
  const uint16_t bf = float_to_bf16(f), bf_want = c10::BFloat16(f).x;
  const uint16_t hf = float_to_half(f), hf_want = c10::Half(f).x;
  const bool bf_ok = std::isnan(f) ? std::isnan(bf16_to_float(bf)) : bf == bf_want;
  const bool hf_ok = std::isnan(f) ? std::isnan(half_to_float(hf)) : hf == hf_want;
  if (!(bf_ok && hf_ok) && ++failures <= 10)
    std::printf("%a -> bf16 0x%04x (c10 0x%04x), fp16 0x%04x (c10 0x%04x)\n", f, bf, bf_want, hf, hf_want);
}

int main() {
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t h = static_cast<uint16_t>(i);
    check_to_float("bf16_to_float", h, bf16_to_float(h), static_cast<float>(c10::BFloat16(h, c10::BFloat16::from_bits())));
    check_to_float("half_to_float", h, half_to_float(h), static_cast<float>(c10::Half(h, c10::Half::from_bits())));
    // every 16-bit value, the floats just around it and halfway to the next (ties)
    for (float f : {bf16_to_float(h), half_to_float(h)}) {
      const uint32_t u = float_to_bits(f);
      for (int64_t d : {-4097, -4096, -4095, -1, 0, 1, 4095, 4096, 4097, 32767, 32768, 32769})
        check_from_float(bits_to_float(static_cast<uint32_t>(static_cast<int64_t>(u) + d)));
    }
  }
  std::mt19937 rng(0);
  std::vector<float> floats(2000000);
  for (float& f : floats) {
    f = bits_to_float(rng());
    check_from_float(f);
  }
  // the row loops (vectorised) agree with c10 too
  std::vector<c10::BFloat16> bf_row(floats.size());
  std::vector<c10::Half> half_row(floats.size());
  fastdl::cpu::row_from_float(floats.data(), bf_row.data(), static_cast<int64_t>(floats.size()));
  fastdl::cpu::row_from_float(floats.data(), half_row.data(), static_cast<int64_t>(floats.size()));
  std::vector<float> back(floats.size());
  for (size_t i = 0; i < floats.size(); ++i) {
    const bool nan = std::isnan(floats[i]);
    if ((nan ? !std::isnan(float(bf_row[i])) : bf_row[i].x != c10::BFloat16(floats[i]).x) ||
        (nan ? !std::isnan(float(half_row[i])) : half_row[i].x != c10::Half(floats[i]).x)) {
      if (++failures <= 10) std::printf("row_from_float(%a) differs from c10\n", floats[i]);
    }
  }
  fastdl::cpu::row_to_float(half_row.data(), back.data(), static_cast<int64_t>(back.size()));
  for (size_t i = 0; i < back.size(); ++i) check_to_float("row_to_float", half_row[i].x, back[i], float(half_row[i]));
  // fp16 rows take F16C where the CPU has it: the software loops must agree as well, on
  // odd lengths too (the hardware path's scalar tail)
  const int64_t n = static_cast<int64_t>(floats.size()) - 5;
  std::vector<uint16_t> soft(floats.size(), 0);
  fastdl::cpu::half_row_from_float_soft(floats.data(), soft.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    const bool nan = std::isnan(floats[i]);
    if ((nan ? !std::isnan(half_to_float(soft[i])) : soft[i] != half_row[i].x) && ++failures <= 10)
      std::printf("half_row_from_float_soft(%a) = 0x%04x, row_from_float 0x%04x\n", floats[i], soft[i], half_row[i].x);
  }
  std::vector<uint16_t> every(65536);
  for (uint32_t i = 0; i < 65536; ++i) every[i] = static_cast<uint16_t>(i);
  std::vector<float> every_float(65536);
  fastdl::cpu::half_row_to_float_soft(every.data(), every_float.data(), 65536);
  for (uint32_t i = 0; i < 65536; ++i)
    check_to_float("half_row_to_float_soft", every[i], every_float[i], float(c10::Half(every[i], c10::Half::from_bits())));
  fastdl::cpu::half_row_to_float_soft(soft.data(), back.data(), n);
  for (int64_t i = 0; i < n; ++i) check_to_float("half_row_to_float_soft", soft[i], back[i], half_to_float(soft[i]));
#ifdef FASTDL_F16C
  if (fastdl::cpu::cpu_has_f16c()) {
    std::vector<uint16_t> hard(floats.size(), 0);
    fastdl::cpu::half_row_from_float_f16c(floats.data(), hard.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      const bool nan = std::isnan(floats[i]);
      if ((nan ? !std::isnan(half_to_float(hard[i])) : hard[i] != soft[i]) && ++failures <= 10)
        std::printf("half_row_from_float_f16c(%a) = 0x%04x, software 0x%04x\n", floats[i], hard[i], soft[i]);
    }
    fastdl::cpu::half_row_to_float_f16c(every.data(), every_float.data(), 65536 - 3);
    for (uint32_t i = 0; i < 65536 - 3; ++i)
      check_to_float("half_row_to_float_f16c", every[i], every_float[i],
                     float(c10::Half(every[i], c10::Half::from_bits())));
    fastdl::cpu::half_row_to_float_f16c(hard.data(), back.data(), n);
    for (int64_t i = 0; i < n; ++i) check_to_float("half_row_to_float_f16c", hard[i], back[i], half_to_float(hard[i]));
    std::printf("F16C path checked\n");
  }
#endif
  // the fused residual add of fp16 rows (software and F16C): h = fp16(x + r) as c10 rounds
  // it, and its float; every fp16 value against a random partner, an odd length
  std::vector<uint16_t> partner(every), sum_half(65536);
  std::vector<float> sum_float(65536);
  std::shuffle(partner.begin(), partner.end(), rng);
  auto check_add = [&](const char* what) {
    for (uint32_t i = 0; i < 65536 - 3; ++i) {
      const float want = float(c10::Half(float(c10::Half(every[i], c10::Half::from_bits())) +
                                         float(c10::Half(partner[i], c10::Half::from_bits()))));
      check_to_float(what, every[i], half_to_float(sum_half[i]), want);
      check_to_float(what, every[i], sum_float[i], want);
    }
  };
  fastdl::cpu::half_rows_add_soft(every.data(), partner.data(), sum_half.data(), sum_float.data(), 65536 - 3);
  check_add("half_rows_add_soft");
#ifdef FASTDL_F16C
  if (fastdl::cpu::cpu_has_f16c()) {
    std::fill(sum_half.begin(), sum_half.end(), 0);
    std::fill(sum_float.begin(), sum_float.end(), 0.0f);
    fastdl::cpu::half_rows_add_f16c(every.data(), partner.data(), sum_half.data(), sum_float.data(), 65536 - 3);
    check_add("half_rows_add_f16c");
  }
#endif
  fastdl::cpu::row_to_float(bf_row.data(), back.data(), static_cast<int64_t>(back.size()));
  for (size_t i = 0; i < back.size(); ++i) check_to_float("row_to_float", bf_row[i].x, back[i], float(bf_row[i]));
  std::printf("%s: %d mismatches\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
