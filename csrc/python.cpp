// The Python module fastdl._C: importing it runs the op registrations of the other files,
// and it holds the eager entries of the native backends as plain Python functions,
//
//   fastdl._C.softmax_eager(x, dim, log, out_dtype=None)
//   fastdl._C.layer_norm_eager(x, residual, weight, bias, normalized_ndim, eps, rms, out_dtype=None)
//   fastdl._C.softmax_checked(x, dim, dtype, log)
//   fastdl._C.softmax_backward_checked(grad_out, out, dim, log)
//   fastdl._C.layer_norm_checked(x, residual, normalized_shape, weight, bias, eps, rms)
//
// which fastdl/ops call on every eager cpu / cuda call. They run the same C++ functions as
// torch.ops.fastdl.softmax_eager / layer_norm_eager (csrc/autograd/eager.h), without the
// boxed call of torch.ops: there each argument becomes an IValue and back again, ~0.7 us a
// call for softmax's three and ~1.8 us for layer_norm's seven on the development machine
// (aten's own _softmax / layer_norm through torch.ops against their Python bindings).
//
// They take plain tensors: torch.Tensor, or torch.nn.Parameter, whose __torch_function__ is
// disabled. Any other argument (a tensor subclass, which may override __torch_function__
// or __torch_dispatch__, a value of another type), or a TorchFunctionMode in force, goes
// to the torch.ops op, which does all that torch does for such calls. The checked entries
// (a public call, its arguments checked here) answer NotImplemented instead, and
// fastdl.ops take the call through Python.
#include <Python.h>
#include <ATen/Dispatch.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Device.h>
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <limits>

#include "csrc/autograd/eager.h"
#include "csrc/common/checks.h"

namespace fastdl {
namespace {

// A new reference to attribute path `dotted` ("ops.fastdl.softmax_eager.default") of module
// `module`, or nullptr with a Python error set.
PyObject* lookup(const char* module, const char* dotted) {
  PyObject* object = PyImport_ImportModule(module);
  std::string path(dotted);
  for (size_t start = 0; object != nullptr && start <= path.size();) {
    const size_t end = std::min(path.find('.', start), path.size());
    PyObject* next = PyObject_GetAttrString(object, path.substr(start, end - start).c_str());
    Py_DECREF(object);
    object = next;
    start = end + 1;
  }
  return object;
}

// Whether obj is a torch.Tensor or a torch.nn.Parameter (not a subclass of either).
bool plain_tensor(PyObject* obj) {
  static PyTypeObject* parameter = reinterpret_cast<PyTypeObject*>(lookup("torch.nn.parameter", "Parameter"));
  if (parameter == nullptr) PyErr_Clear();  // then only torch.Tensor counts as plain
  const PyTypeObject* type = Py_TYPE(obj);
  return type == reinterpret_cast<PyTypeObject*>(THPVariableClass) || (parameter != nullptr && type == parameter);
}

// The call through torch.ops.fastdl.<op>.default, for the arguments the fast path leaves.
PyObject* through_torch_ops(PyObject** cached, const char* op, PyObject* const* args, Py_ssize_t nargs) {
  if (*cached == nullptr) {
    *cached = lookup("torch", (std::string("ops.fastdl.") + op + ".default").c_str());
    if (*cached == nullptr) return nullptr;
  }
  return PyObject_Vectorcall(*cached, args, static_cast<size_t>(nargs), nullptr);
}

// One parsed argument of each kind; false (with no Python error) when it is not of that kind.
bool tensor_arg(PyObject* obj, at::Tensor* out) {
  if (!plain_tensor(obj)) return false;
  *out = THPVariable_Unpack(obj);
  return true;
}

bool optional_tensor_arg(PyObject* obj, std::optional<at::Tensor>* out) {
  if (obj == Py_None) return true;
  at::Tensor t;
  if (!tensor_arg(obj, &t)) return false;
  *out = std::move(t);
  return true;
}

bool int_arg(PyObject* obj, int64_t* out) {
  if (!PyLong_CheckExact(obj)) return false;
  int overflow = 0;
  *out = PyLong_AsLongLongAndOverflow(obj, &overflow);
  return overflow == 0;
}

bool bool_arg(PyObject* obj, bool* out) {
  if (!PyBool_Check(obj)) return false;
  *out = obj == Py_True;
  return true;
}

bool float_arg(PyObject* obj, double* out) {
  if (!PyFloat_CheckExact(obj)) return false;
  *out = PyFloat_AS_DOUBLE(obj);
  return true;
}

bool optional_dtype_arg(PyObject* obj, std::optional<at::ScalarType>* out) {
  if (obj == Py_None) return true;
  if (!THPDtype_Check(obj)) return false;
  *out = reinterpret_cast<THPDtype*>(obj)->scalar_type;
  return true;
}

// A new tuple (first, second) of Python tensors, or nullptr with a Python error set.
PyObject* tensor_pair(at::Tensor first, at::Tensor second) {
  PyObject* first_py = THPVariable_Wrap(std::move(first));
  PyObject* second_py = first_py != nullptr ? THPVariable_Wrap(std::move(second)) : nullptr;
  PyObject* pair = second_py != nullptr ? PyTuple_Pack(2, first_py, second_py) : nullptr;
  Py_XDECREF(first_py);
  Py_XDECREF(second_py);
  return pair;
}

// --- the checked entries' gate -------------------------------------------------------
// The checked entries (softmax_checked, softmax_backward_checked, layer_norm_checked) are
// fastdl.ops' public calls themselves: fastdl.ops calls them first, with only torch.compile
// ruled out in Python (dynamo must see that test), and takes the call through Python when
// they answer NotImplemented. So they test here what fastdl.ops' Python tests: that nothing
// records or transforms the call, and that the backend choice in force gives a native
// backend.

// Whether t has a forward-mode AD tangent (torch allows one dual level, level 0).
bool has_tangent(const at::Tensor& t) { return t._fw_grad(/*level=*/0).defined(); }
bool has_tangent(const std::optional<at::Tensor>& t) { return t.has_value() && has_tangent(*t); }

// Whether nothing records or transforms a call on x: no TorchFunctionMode in force, no
// torch.jit.trace recording, no torch.func transform (grad, vmap, jacrev ...: the dynamic
// layer front key is in the thread's dispatch keys while one runs), and no forward-mode AD
// tangent on x (the callers ask has_tangent of their other tensors). Under any of them
// fastdl.ops run torch's op or a custom op instead. (Autocast is not one of them: the
// entries cast as fastdl.ops does, autocast_dtype below.)
bool untransformed(const at::Tensor& x) {
  return !at::impl::torch_function_mode_enabled() && !torch::jit::tracer::isTracing() &&
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         !has_tangent(x);
}

// An interned Python string, made once per name (never freed, as the module).
PyObject* interned(const char* name) { return PyUnicode_InternFromString(name); }

// The ops fastdl.backends resolves for the checked entries, and the choices it takes.
enum class Op { kSoftmax, kLayerNorm, kRmsNorm, kCount };
constexpr const char* kOpNames[] = {"softmax", "layer_norm", "rms_norm"};
constexpr const char* kChoiceNames[] = {"auto", "triton", "cuda", "cpu", "torch"};
constexpr int kChoices = 5;

// What backends._resolve_cached answered for (op, device, dtype, choice), memoised here:
// 0 not asked yet, 1 a native backend, 2 another (or an error). Asking it costs ~0.2 us a
// call (its key tuple, and the garbage collections those tuples bring on); what it answers
// changes only where backends.forget_resolutions() says so (fastdl._C.forget_resolutions).
// Read and written with the GIL held.
int8_t resolutions[static_cast<int>(Op::kCount)][2][4][kChoices];

// The float dtypes the memos index: dtype_index(kIndexedDtypes[i]) == i, -1 for another.
constexpr at::ScalarType kIndexedDtypes[] = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};
int dtype_index(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    case at::kDouble: return 3;
    default: return -1;
  }
}

// The index of choice (a str) in kChoiceNames, or -1 for another value.
int choice_index(PyObject* choice) {
  static PyObject* names[kChoices] = {};
  for (int i = 0; i < kChoices; ++i) {
    if (names[i] == nullptr) names[i] = interned(kChoiceNames[i]);
    if (choice == names[i]) return i;
  }
  if (!PyUnicode_Check(choice)) return -1;
  for (int i = 0; i < kChoices; ++i) {
    if (PyUnicode_CompareWithASCIIString(choice, kChoiceNames[i]) == 0) return i;
  }
  return -1;
}

// Whether fastdl.backends resolves `op` for a cpu or cuda (`cuda`) tensor of a float dtype
// to a native backend now, as backends.resolve would. The choice is read as
// backends.get_backend reads it (use_backend's context variable, then set_backend's, then
// FASTDL_BACKEND's, then "auto"), from the module's globals on every call (tests patch
// them). 1 yes, 0 no, -1 with a Python error set (an unknown backend name, which
// backends._resolve_cached reports).
int resolves_native(Op op, bool cuda, at::ScalarType dtype) {
  static PyObject* backends = nullptr;  // a reference kept
  if (backends == nullptr && (backends = PyImport_ImportModule("fastdl.backends")) == nullptr) return -1;
  static PyObject* const scoped_name = interned("_scoped_choice");
  static PyObject* const global_name = interned("_global_choice");
  static PyObject* const env_name = interned("_env_choice");
  PyObject* globals = PyModule_GetDict(backends);  // borrowed
  PyObject* scoped = PyDict_GetItemWithError(globals, scoped_name);
  PyObject* choice = nullptr;  // a new reference
  if (scoped == nullptr || PyContextVar_Get(scoped, Py_None, &choice) < 0) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "fastdl.backends has no _scoped_choice");
    return -1;
  }
  for (PyObject* name : {global_name, env_name}) {
    if (choice != Py_None) break;
    Py_DECREF(choice);
    choice = PyDict_GetItemWithError(globals, name);
    if (choice == nullptr) {
      if (!PyErr_Occurred()) PyErr_Format(PyExc_RuntimeError, "fastdl.backends has no %U", name);
      return -1;
    }
    Py_INCREF(choice);
  }
  const int choice_at = choice == Py_None ? 0 : choice_index(choice);  // None: "auto"
  const int dtype_at = dtype_index(dtype);
  int8_t* memo =
      choice_at >= 0 && dtype_at >= 0 ? &resolutions[static_cast<int>(op)][cuda ? 1 : 0][dtype_at][choice_at] : nullptr;
  if (memo != nullptr && *memo != 0) {
    Py_DECREF(choice);
    return *memo == 1;
  }
  // not asked yet, or a name backends rejects: ask it (and let it raise)
  static PyObject* const resolve_name = interned("_resolve_cached");
  static PyObject* const cpu_name = interned("cpu");
  static PyObject* const cuda_name = interned("cuda");
  static PyObject* const auto_name = interned("auto");
  static PyObject* op_names[static_cast<int>(Op::kCount)] = {};
  PyObject*& op_name = op_names[static_cast<int>(op)];
  if (op_name == nullptr) op_name = interned(kOpNames[static_cast<int>(op)]);
  PyObject* resolve = PyDict_GetItemWithError(globals, resolve_name);
  PyObject* result = nullptr;
  if (resolve != nullptr) {
    PyObject* args[] = {op_name, cuda ? cuda_name : cpu_name, reinterpret_cast<PyObject*>(torch::getTHPDtype(dtype)),
                        choice == Py_None ? auto_name : choice};
    result = PyObject_Vectorcall(resolve, args, 4, nullptr);
  } else if (!PyErr_Occurred()) {
    PyErr_SetString(PyExc_RuntimeError, "fastdl.backends has no _resolve_cached");
  }
  Py_DECREF(choice);
  if (result == nullptr) return -1;
  bool native = false;  // result: (backend or None, error or None)
  if (PyTuple_Check(result) && PyTuple_GET_SIZE(result) == 2) {
    PyObject* backend = PyTuple_GET_ITEM(result, 0);
    native = PyUnicode_Check(backend) && (PyUnicode_Compare(backend, cpu_name) == 0 ||
                                          PyUnicode_Compare(backend, cuda_name) == 0);
  }
  Py_DECREF(result);
  if (memo != nullptr) *memo = native ? 1 : 2;
  return native;
}

// torch's ops whose dtype under autocast fastdl's follow: the keys of
// fastdl.ops._common._AUTOCAST_PROBES.
enum class Probe { kSoftmax, kLogSoftmax, kLayerNorm, kRmsNorm, kCount };
constexpr const char* kProbeNames[] = {"softmax", "log_softmax", "layer_norm", "rms_norm"};

// What fastdl.ops._common._autocast_probe answered for (op, device, x's dtype, autocast
// dtype), memoised here as resolutions are: 0 not asked yet, else 1 + the dtype_index of
// the dtype torch's op computes in. Read and written with the GIL held.
int8_t autocast_answers[static_cast<int>(Probe::kCount)][2][4][4];

// The dtype a fastdl.ops call on x computes in, as fastdl.ops._common.autocast_dtype gives
// it: x's own, unless autocast is on on x's device, where it is the dtype torch's own op
// computes in (CUDA autocast runs softmax and the norms in fp32, CPU autocast leaves them
// alone; the probe asks torch, once per key). 1 with *dtype set; 0 where the answer is not
// one memoised here (the call goes to Python); -1 with a Python error set.
int autocast_dtype(Probe probe, const at::Tensor& x, at::ScalarType* dtype) {
  *dtype = x.scalar_type();
  const c10::DeviceType device = x.device().type();
  if (!at::autocast::is_autocast_enabled(device)) return 1;
  const int from = dtype_index(x.scalar_type());
  const at::ScalarType low = at::autocast::get_autocast_dtype(device);
  const int low_at = dtype_index(low);
  if (from < 0 || low_at < 0) return 0;
  int8_t& memo = autocast_answers[static_cast<int>(probe)][x.is_cuda() ? 1 : 0][from][low_at];
  if (memo == 0) {
    static PyObject* names[static_cast<int>(Probe::kCount)] = {};
    PyObject*& name = names[static_cast<int>(probe)];
    if (name == nullptr) name = interned(kProbeNames[static_cast<int>(probe)]);
    PyObject* ask = lookup("fastdl.ops._common", "_autocast_probe");  // on every miss: tests patch it
    PyObject* device_py = ask != nullptr ? THPDevice_New(x.device()) : nullptr;
    PyObject* answer = nullptr;
    if (device_py != nullptr) {
      PyObject* args[] = {name, device_py, reinterpret_cast<PyObject*>(torch::getTHPDtype(x.scalar_type())),
                          reinterpret_cast<PyObject*>(torch::getTHPDtype(low))};
      answer = PyObject_Vectorcall(ask, args, 4, nullptr);
    }
    Py_XDECREF(ask);
    Py_XDECREF(device_py);
    if (answer == nullptr) return -1;
    const int answer_at = THPDtype_Check(answer) ? dtype_index(reinterpret_cast<THPDtype*>(answer)->scalar_type) : -1;
    Py_DECREF(answer);
    if (answer_at < 0) return 0;
    memo = static_cast<int8_t>(answer_at + 1);
  }
  *dtype = kIndexedDtypes[memo - 1];
  return 1;
}

// fastdl._C.forget_resolutions(): backends' answers may have changed (its cache cleared),
// or the autocast probe's (tests patch it).
PyObject* forget_resolutions_py(PyObject*, PyObject*) {
  std::memset(resolutions, 0, sizeof(resolutions));
  std::memset(autocast_answers, 0, sizeof(autocast_answers));
  Py_RETURN_NONE;
}

PyObject* softmax_eager_py(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static PyObject* fallback = nullptr;
  at::Tensor x;
  int64_t dim = 0;
  bool log = false;
  std::optional<at::ScalarType> out_dtype;
  if ((nargs != 3 && nargs != 4) || at::impl::torch_function_mode_enabled() || !tensor_arg(args[0], &x) ||
      !int_arg(args[1], &dim) || !bool_arg(args[2], &log) || (nargs == 4 && !optional_dtype_arg(args[3], &out_dtype))) {
    return through_torch_ops(&fallback, "softmax_eager", args, nargs);
  }
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;  // as torch's bindings: other Python threads run meanwhile
    y = softmax_eager(x, dim, log, out_dtype);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyObject* layer_norm_eager_py(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static PyObject* fallback = nullptr;
  at::Tensor x;
  std::optional<at::Tensor> residual, weight, bias;
  int64_t normalized_ndim = 0;
  double eps = 0;
  bool rms = false;
  std::optional<at::ScalarType> out_dtype;
  if ((nargs != 7 && nargs != 8) || at::impl::torch_function_mode_enabled() || !tensor_arg(args[0], &x) ||
      !optional_tensor_arg(args[1], &residual) || !optional_tensor_arg(args[2], &weight) ||
      !optional_tensor_arg(args[3], &bias) || !int_arg(args[4], &normalized_ndim) || !float_arg(args[5], &eps) ||
      !bool_arg(args[6], &rms) || (nargs == 8 && !optional_dtype_arg(args[7], &out_dtype))) {
    return through_torch_ops(&fallback, "layer_norm_eager", args, nargs);
  }
  at::Tensor y, h;
  {
    pybind11::gil_scoped_release no_gil;
    std::tie(y, h) = layer_norm_eager(x, residual, weight, bias, normalized_ndim, eps, rms, out_dtype);
  }
  return tensor_pair(std::move(y), std::move(h));
  END_HANDLE_TH_ERRORS
}

// A float tensor fastdl's norms take as x / residual / weight / bias: fp32, fp16, bf16 or
// fp64, strided (not sparse), not nested.
bool float_strided(const at::Tensor& t) {
  const at::ScalarType type = t.scalar_type();
  return (type == at::kFloat || type == at::kHalf || type == at::kBFloat16 || type == at::kDouble) &&
         t.layout() == at::kStrided && !t.is_nested();
}

// normalized_shape as the modules and most callers give it: an int, or a tuple of one int.
bool one_dim_shape(PyObject* obj, int64_t* n) {
  if (PyTuple_CheckExact(obj) && PyTuple_GET_SIZE(obj) == 1) obj = PyTuple_GET_ITEM(obj, 0);
  return int_arg(obj, n);
}

// A weight / bias fastdl's norms take for rows of n on x's device: None, or a float vector of n.
bool param_arg(PyObject* obj, const at::Tensor& x, int64_t n, std::optional<at::Tensor>* out) {
  if (!optional_tensor_arg(obj, out)) return false;
  if (!out->has_value()) return true;
  const at::Tensor& p = **out;
  return float_strided(p) && p.dim() == 1 && p.size(0) == n && p.device() == x.device();
}

// eps as a float; None is rms_norm's default, the machine epsilon of the dtype the norm
// computes in (as torch).
bool eps_arg(PyObject* obj, at::ScalarType dtype, bool rms, double* eps) {
  if (obj == Py_None && rms) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastdl.norm eps", [&] {
      *eps = static_cast<double>(std::numeric_limits<scalar_t>::epsilon());
    });
    return true;
  }
  int64_t value = 0;
  if (int_arg(obj, &value)) {
    *eps = static_cast<double>(value);
    return true;
  }
  return float_arg(obj, eps);
}

// x on a device a native backend runs (cpu, cuda).
bool native_device(const at::Tensor& x) { return x.is_cpu() || x.is_cuda(); }

// For a softmax call along dim of t, computed in dtype, its other arguments checked: 1 (dim
// made non-negative) when dim is in range and the backend chosen is native, 0 when not, -1
// with a Python error set. A CUDA t of 2^31 rows or columns or more is left to Python, whose
// "auto" takes the next backend for it (backends.SIZE_LIMITS: the CUDA kernels' int sizes).
int softmax_dim_on_native(const at::Tensor& t, at::ScalarType dtype, int64_t* dim) {
  const int64_t rank = std::max<int64_t>(t.dim(), 1);  // a 0-d t takes dim 0 or -1, as torch
  if (*dim < -rank || *dim >= rank) return 0;
  *dim = (*dim + rank) % rank;
  if (t.is_cuda() && t.numel() > INT_MAX) {
    const int64_t cols = t.dim() == 0 ? 1 : t.size(*dim);
    if (cols > INT_MAX || (cols > 0 && t.numel() / cols > INT_MAX)) return 0;
  }
  return resolves_native(Op::kSoftmax, t.is_cuda(), dtype);
}

// fastdl._C.softmax_checked(x, dim, dtype, log): a fastdl.ops softmax / log_softmax call
// whose arguments are the common case, checked here instead of in Python: x a plain float
// tensor, dim an int in range, dtype None or a float dtype, nothing recording or
// transforming the call (untransformed) and a native backend chosen. x is cast first to
// dtype, or when none is given to the dtype autocast computes in, as fastdl.ops casts it;
// a 16-bit x computed in fp32 is not cast but read as it is, y written in fp32.
// Anything else gets NotImplemented, and fastdl.ops checks (and reports) it in Python. The
// caller has ruled out torch.compile.
PyObject* softmax_checked_py(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  at::Tensor x;
  int64_t dim = 0;
  bool log = false;
  if (nargs != 4 || !bool_arg(args[3], &log) || !tensor_arg(args[0], &x) || !float_strided(x) ||
      !native_device(x) || !int_arg(args[1], &dim) || !untransformed(x)) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  at::ScalarType dtype = at::kFloat;
  int taken = 0;
  if (args[2] == Py_None) {
    taken = autocast_dtype(log ? Probe::kLogSoftmax : Probe::kSoftmax, x, &dtype);
  } else if (THPDtype_Check(args[2])) {  // as torch: cast, then compute in dtype (no autocast cast)
    dtype = reinterpret_cast<THPDtype*>(args[2])->scalar_type;
    taken = dtype_index(dtype) >= 0 ? 1 : 0;
  }
  // the cast fused into the kernels (out_dtype), as fastdl.ops' _softmax decides it
  const bool fused_cast = taken > 0 && dtype != x.scalar_type() && fused_cast_dtypes(x.scalar_type(), dtype);
  if (taken > 0) taken = softmax_dim_on_native(x, fused_cast ? x.scalar_type() : dtype, &dim);
  if (taken < 0) return nullptr;
  if (taken == 0) Py_RETURN_NOTIMPLEMENTED;
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    if (fused_cast) y = softmax_eager(x, dim, log, dtype);
    else y = softmax_eager(dtype == x.scalar_type() ? x : x.to(dtype), dim, log);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// fastdl._C.softmax_backward_checked(grad_out, out, dim, log): a fastdl.ops.softmax_backward
// call of the common case, checked here: out a plain float tensor, grad_out one of its
// shape, dtype and device, dim an int in range, log a bool, nothing recording or
// transforming the call and a native backend chosen. NotImplemented for any other. (No
// cast under autocast: fastdl.ops.softmax_backward makes none.)
PyObject* softmax_backward_checked_py(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  at::Tensor grad_out, out;
  int64_t dim = 0;
  bool log = false;
  if (nargs != 4 || !bool_arg(args[3], &log) || !tensor_arg(args[1], &out) || !float_strided(out) ||
      !native_device(out) || !tensor_arg(args[0], &grad_out) || !float_strided(grad_out) ||
      grad_out.scalar_type() != out.scalar_type() || grad_out.device() != out.device() ||
      grad_out.sizes() != out.sizes() || !int_arg(args[2], &dim) || !untransformed(out) || has_tangent(grad_out)) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const int taken = softmax_dim_on_native(out, out.scalar_type(), &dim);
  if (taken < 0) return nullptr;
  if (taken == 0) Py_RETURN_NOTIMPLEMENTED;
  at::Tensor grad_in;
  {
    pybind11::gil_scoped_release no_gil;
    grad_in = softmax_backward_eager(grad_out, out, dim, log);
  }
  return THPVariable_Wrap(std::move(grad_in));
  END_HANDLE_TH_ERRORS
}

// fastdl._C.layer_norm_checked(x, residual, normalized_shape, weight, bias, eps, rms): a
// fastdl.ops norm call (layer_norm, rms_norm, add_layer_norm, add_rms_norm) whose arguments
// are the common case, checked here instead of in Python (~1 us a call there): plain
// tensors; x a float tensor whose last dim is normalized_shape (an int or a tuple of one);
// residual of x's shape and device, in x's dtype or, for a 16-bit x, fp32 (or the other way
// round: the sum in fp32, as torch's add promotes); weight / bias float vectors of that
// length on x's device; eps a number (None: rms_norm's default). Under autocast the tensors
// are cast as fastdl.ops casts them: 16-bit rows that would be cast to fp32 are read as they
// are (x, and the residual with it), y written in fp32 (out_dtype), weight / bias cast; else
// every tensor.
// Returns y, or (x + residual, y) when fused, as fastdl.ops do. Anything else, a
// TorchFunctionMode in force included, gets NotImplemented, and fastdl.ops checks (and
// reports) it in Python; so does a call that something records or transforms
// (untransformed), or whose backend is not native. The caller has ruled out torch.compile.
PyObject* layer_norm_checked_py(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  at::Tensor x;
  std::optional<at::Tensor> residual, weight, bias;
  int64_t n = 0;
  double eps = 0;
  bool rms = false;
  if (nargs != 7 || !bool_arg(args[6], &rms) ||
      !tensor_arg(args[0], &x) || !float_strided(x) || x.dim() < 1 || !one_dim_shape(args[2], &n) ||
      x.size(-1) != n || !optional_tensor_arg(args[1], &residual) || !param_arg(args[3], x, n, &weight) ||
      !param_arg(args[4], x, n, &bias)) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  // a residual of x's dtype, or a 16-bit one beside an fp32 one, read as they are (the sum then
  // in fp32); other pairs fastdl.ops casts first
  if (residual.has_value() &&
      (!float_strided(*residual) || residual->device() != x.device() || residual->sizes() != x.sizes() ||
       !fused_sum_dtypes(x.scalar_type(), residual->scalar_type()))) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const bool mixed = residual.has_value() && residual->scalar_type() != x.scalar_type();
  if (!native_device(x) || !untransformed(x) || has_tangent(residual) || has_tangent(weight) || has_tangent(bias)) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  // the input in the dtype of the rows the norm reads: x's, or the fp32 one of a mixed pair
  const at::Tensor& wide = mixed && wider_of_pair(x.scalar_type(), residual->scalar_type()) ? *residual : x;
  at::ScalarType dtype;
  int native = autocast_dtype(rms ? Probe::kRmsNorm : Probe::kLayerNorm, wide, &dtype);
  // the cast fused into the norm (out_dtype), as fastdl.ops' _norm decides it
  const bool fused_cast =
      native > 0 && dtype != wide.scalar_type() && fused_cast_dtypes(wide.scalar_type(), dtype);
  if (native > 0) native = eps_arg(args[5], dtype, rms, &eps) ? 1 : 0;  // rms_norm's default: dtype's epsilon
  // the backend resolved by x's dtype, as fastdl.ops resolves it, but where every operand is cast
  if (native > 0) {
    const bool cast_all = dtype != wide.scalar_type() && !fused_cast;
    native = resolves_native(rms ? Op::kRmsNorm : Op::kLayerNorm, x.is_cuda(), cast_all ? dtype : x.scalar_type());
  }
  if (native < 0) return nullptr;
  if (native == 0) Py_RETURN_NOTIMPLEMENTED;
  at::Tensor y, h;
  {
    pybind11::gil_scoped_release no_gil;
    std::optional<at::ScalarType> out_dtype;
    if (dtype != wide.scalar_type()) {  // the operands in the dtype torch computes in, as fastdl.ops
      if (fused_cast) {
        out_dtype = dtype;
      } else {
        x = x.to(dtype);
        if (residual.has_value()) residual = residual->to(dtype);
      }
      for (std::optional<at::Tensor>* t : {&weight, &bias})
        if (t->has_value()) *t = (*t)->to(dtype);
    }
    std::tie(y, h) = layer_norm_eager(x, residual, weight, bias, 1, eps, rms, out_dtype);
  }
  if (!residual.has_value()) return THPVariable_Wrap(std::move(y));
  return tensor_pair(std::move(h), std::move(y));  // (x + residual, y), as fastdl.ops' fused norms
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"softmax_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&softmax_eager_py)), METH_FASTCALL,
     "softmax_eager(x, dim, log, out_dtype=None): as torch.ops.fastdl.softmax_eager, without its boxed call"},
    {"layer_norm_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&layer_norm_eager_py)),
     METH_FASTCALL,
     "layer_norm_eager(x, residual, weight, bias, normalized_ndim, eps, rms, out_dtype=None): as "
     "torch.ops.fastdl.layer_norm_eager, without its boxed call"},
    {"softmax_checked", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&softmax_checked_py)),
     METH_FASTCALL,
     "softmax_checked(x, dim, dtype, log): a fastdl.ops softmax call of the common case, its arguments checked "
     "in C++; NotImplemented for any other"},
    {"forget_resolutions", &forget_resolutions_py, METH_NOARGS,
     "forget_resolutions(): what the checked entries memoised of fastdl.backends' and the autocast probe's "
     "answers"},
    {"softmax_backward_checked",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&softmax_backward_checked_py)), METH_FASTCALL,
     "softmax_backward_checked(grad_out, out, dim, log): a fastdl.ops.softmax_backward call of the common case, "
     "its arguments checked in C++; NotImplemented for any other"},
    {"layer_norm_checked", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&layer_norm_checked_py)),
     METH_FASTCALL,
     "layer_norm_checked(x, residual, normalized_shape, weight, bias, eps, rms): a fastdl.ops norm call of the "
     "common case, its arguments checked in C++; NotImplemented for any other"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace fastdl

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fastdl::methods,
                                      nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
