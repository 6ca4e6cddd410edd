// The schemas of fastdl's native ops, in the `fastdl` namespace.
//
// Each op works on a 2-D (rows, cols) view whose last dim is contiguous; the Python
// layer (fastdl/ops) moves the reduced dim last and handles dtype, autograd and
// torch.compile. Implementations register per device:
//   CPU  -> csrc/cpu/<op>.cpp        CUDA -> csrc/ops/<op>.cpp (+ kernels/<op>.cu)
//
// Importing fastdl._C (its module: csrc/python.cpp) runs the static registrations below,
// and the ops are reached as torch.ops.fastdl.<name>.
#include <torch/library.h>

#include <stdexcept>

#include "csrc/common/outputs.h"

TORCH_LIBRARY(fastdl, m) {
  // true when this build has the CUDA kernels (FASTDL_BUILD_CUDA=ON)
  m.def("native_built_with_cuda() -> bool");
  // test hook: fill every output with NaN before kernels write it (csrc/common/outputs.h)
  m.def("set_poison_outputs(bool enabled) -> ()");
  // debugging aid (scripts/diagnose_exceptions.py): raises an error, kind 0 through
  // TORCH_CHECK (a c10::Error that captures a backtrace), 1 as a c10::Error without one,
  // 2 as a std::runtime_error; each reaches Python as a RuntimeError
  m.def("raise_for_test(int kind) -> ()");
  // softmax / log_softmax over the last dim of a (rows, cols) tensor; the output is a
  // new contiguous tensor of out_dtype: None (the input's), or float32 for a float16 /
  // bfloat16 input (its softmax computed and written in fp32, the cast fused)
  m.def("softmax_rows_forward(Tensor x, bool log, ScalarType? out_dtype=None) -> Tensor");
  // grad_x from grad_out and the forward's output (one dtype), in grad_in_dtype: None (out's),
  // or float16 / bfloat16 for a float32 out (the input's dtype of such a forward)
  m.def("softmax_rows_backward(Tensor grad_out, Tensor out, bool log, ScalarType? grad_in_dtype=None) -> Tensor");
  // the eager path of the native backends (csrc/autograd/softmax.cpp): softmax of x of any
  // shape along dim (normalised, >= 0), through softmax_rows_forward, with its backward
  // recorded as a C++ autograd node when x requires grad; out_dtype as softmax_rows_forward's
  // (x's gradient then comes back in x's dtype)
  m.def("softmax_eager(Tensor x, int dim, bool log, ScalarType? out_dtype=None) -> Tensor");
  // layer_norm / rms_norm over the last dim of (rows, cols), with an optional residual
  // added first (fused add); returns (y, x + residual or empty, mean or empty (rms),
  // rstd), statistics in float32 (float64 for float64). The residual in x's dtype, or
  // float32 beside a float16 / bfloat16 x (or the other way round): the sum then in float32,
  // as torch's add promotes. y in out_dtype: None (the sum's, x's without a residual), or the
  // statistics' dtype (16-bit rows normalised into fp32 in one pass)
  m.def("layer_norm_rows_forward(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms,"
        " ScalarType? out_dtype=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // (dx, dweight or empty, dbias or empty, dx in narrow_dtype or empty); dx in x's dtype, dy
  // in x's or the statistics' dtype (after an out_dtype forward); dweight / dbias in weight's
  // dtype when it is x's and dy is too, else the statistics' dtype, summed in the statistics'
  // dtype deterministically; dsum is the gradient reaching x + residual from elsewhere.
  // narrow_dtype: float16 / bfloat16 beside float32 rows (the fp32 sum of a 16-bit x and an
  // fp32 residual): dx also written rounded to it in the same pass, the 16-bit one's gradient
  m.def("layer_norm_rows_backward(Tensor dy, Tensor? dsum, Tensor x, Tensor? weight, Tensor? mean, Tensor rstd,"
        " bool has_bias, bool rms, ScalarType? narrow_dtype=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // the eager path of the native backends (csrc/autograd/layer_norm.cpp): x of any shape,
  // normalised over its last normalized_ndim dims (weight / bias of those dims' shape),
  // through layer_norm_rows_forward, with its backward recorded as a C++ autograd node
  // when a gradient is wanted; returns (y, x + residual or empty); out_dtype as
  // layer_norm_rows_forward's (the backward then gives x's gradient in x's dtype)
  m.def("layer_norm_eager(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, int normalized_ndim, float eps,"
        " bool rms, ScalarType? out_dtype=None) -> (Tensor, Tensor)");
}

static bool native_built_with_cuda() {
#ifdef FASTDL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

static void set_poison_outputs(bool enabled) { fastdl::poison_outputs_flag().store(enabled); }

// On the H200 machine (torch 2.11) every TORCH_CHECK failure in fastdl._C segfaulted; these
// three ways of raising tell the backtrace capture, c10::Error and plain C++ unwinding apart.
static void raise_for_test(int64_t kind) {
  TORCH_CHECK(kind != 0, "fastdl.raise_for_test: TORCH_CHECK");
  if (kind == 1) throw c10::Error("fastdl.raise_for_test: c10::Error without a backtrace");
  throw std::runtime_error("fastdl.raise_for_test: std::runtime_error");
}

TORCH_LIBRARY_IMPL(fastdl, CompositeExplicitAutograd, m) {
  m.impl("native_built_with_cuda", &native_built_with_cuda);
  m.impl("set_poison_outputs", &set_poison_outputs);
  m.impl("raise_for_test", &raise_for_test);
}
