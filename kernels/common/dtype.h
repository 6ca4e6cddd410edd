// The element type tags the launchers take (kernels/*.h), so that those headers stay free
// of templates and of device code: host C++ (csrc/ops) includes them with a plain compiler.
#pragma once

namespace fastdl::kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

}  // namespace fastdl::kernels
