// Launch-time knobs read from the environment, for tuning on a GPU without a rebuild
// (python -m fastdl.bench.tune sweeps them). Host code only; no torch here.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace fastdl::kernels {

// The integer in environment variable `name`, clamped to [lo, hi]; false (value untouched)
// when it is unset or not a whole number, so the caller keeps its default.
inline bool env_knob(const char* name, int64_t lo, int64_t hi, int64_t* value) {
  const char* text = std::getenv(name);
  if (text == nullptr) return false;
  char* end = nullptr;
  const long long parsed = std::strtoll(text, &end, 10);
  if (end == text || *end != '\0') return false;
  *value = std::max<int64_t>(lo, std::min<int64_t>(parsed, hi));
  return true;
}

}  // namespace fastdl::kernels
