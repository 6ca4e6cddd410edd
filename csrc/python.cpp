// The Python module fastdl._C: importing it runs the op registrations of the other files,
// and it holds the eager entries of the native backends as plain Python functions,
//
//   fastdl._C.softmax_eager(x, dim, log)
//   fastdl._C.layer_norm_eager(x, residual, weight, bias, normalized_ndim, eps, rms)
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
// to the torch.ops op, which does all that torch does for such calls. layer_norm_checked
// (a public norm call, its arguments checked here) answers NotImplemented instead, and
// fastdl.ops take the call through Python.
#include <Python.h>
#include <ATen/Dispatch.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <limits>

#include "csrc/autograd/eager.h"

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

// A new tuple (first, second) of Python tensors, or nullptr with a Python error set.
PyObject* tensor_pair(at::Tensor first, at::Tensor second) {
  PyObject* first_py = THPVariable_Wrap(std::move(first));
  PyObject* second_py = first_py != nullptr ? THPVariable_Wrap(std::move(second)) : nullptr;
  PyObject* pair = second_py != nullptr ? PyTuple_Pack(2, first_py, second_py) : nullptr;
  Py_XDECREF(first_py);
  Py_XDECREF(second_py);
  return pair;
}

PyObject* softmax_eager_py(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static PyObject* fallback = nullptr;
  at::Tensor x;
  int64_t dim = 0;
  bool log = false;
  if (nargs != 3 || at::impl::torch_function_mode_enabled() || !tensor_arg(args[0], &x) ||
      !int_arg(args[1], &dim) || !bool_arg(args[2], &log)) {
    return through_torch_ops(&fallback, "softmax_eager", args, nargs);
  }
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;  // as torch's bindings: other Python threads run meanwhile
    y = softmax_eager(x, dim, log);
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
  if (nargs != 7 || at::impl::torch_function_mode_enabled() || !tensor_arg(args[0], &x) ||
      !optional_tensor_arg(args[1], &residual) || !optional_tensor_arg(args[2], &weight) ||
      !optional_tensor_arg(args[3], &bias) || !int_arg(args[4], &normalized_ndim) || !float_arg(args[5], &eps) ||
      !bool_arg(args[6], &rms)) {
    return through_torch_ops(&fallback, "layer_norm_eager", args, nargs);
  }
  at::Tensor y, h;
  {
    pybind11::gil_scoped_release no_gil;
    std::tie(y, h) = layer_norm_eager(x, residual, weight, bias, normalized_ndim, eps, rms);
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

// eps as a float; None is rms_norm's default, the machine epsilon of x's dtype (as torch).
bool eps_arg(PyObject* obj, const at::Tensor& x, bool rms, double* eps) {
  if (obj == Py_None && rms) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastdl.norm eps", [&] {
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

// fastdl._C.layer_norm_checked(x, residual, normalized_shape, weight, bias, eps, rms): a
// fastdl.ops norm call (layer_norm, rms_norm, add_layer_norm, add_rms_norm) whose arguments
// are the common case, checked here instead of in Python (~1 us a call there): plain
// tensors; x a float tensor whose last dim is normalized_shape (an int or a tuple of one);
// residual of x's shape, dtype and device; weight / bias float vectors of that length on
// x's device; eps a number (None: rms_norm's default). Returns y, or (x + residual, y) when
// fused, as fastdl.ops do. Anything else, a TorchFunctionMode in force included, gets
// NotImplemented, and fastdl.ops checks (and reports) it in Python. The caller has seen to
// the rest: a native backend, no torch.compile, jit trace, autocast, torch.func transform
// or forward-mode AD.
PyObject* layer_norm_checked_py(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  at::Tensor x;
  std::optional<at::Tensor> residual, weight, bias;
  int64_t n = 0;
  double eps = 0;
  bool rms = false;
  if (nargs != 7 || at::impl::torch_function_mode_enabled() || !bool_arg(args[6], &rms) ||
      !tensor_arg(args[0], &x) || !float_strided(x) || x.dim() < 1 || !one_dim_shape(args[2], &n) ||
      x.size(-1) != n || !optional_tensor_arg(args[1], &residual) || !param_arg(args[3], x, n, &weight) ||
      !param_arg(args[4], x, n, &bias) || !eps_arg(args[5], x, rms, &eps)) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  if (residual.has_value() && (!float_strided(*residual) || residual->scalar_type() != x.scalar_type() ||
                               residual->device() != x.device() || residual->sizes() != x.sizes())) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  at::Tensor y, h;
  {
    pybind11::gil_scoped_release no_gil;
    std::tie(y, h) = layer_norm_eager(x, residual, weight, bias, 1, eps, rms);
  }
  if (!residual.has_value()) return THPVariable_Wrap(std::move(y));
  return tensor_pair(std::move(h), std::move(y));  // (x + residual, y), as fastdl.ops' fused norms
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"softmax_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&softmax_eager_py)), METH_FASTCALL,
     "softmax_eager(x, dim, log): as torch.ops.fastdl.softmax_eager, without its boxed call"},
    {"layer_norm_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&layer_norm_eager_py)),
     METH_FASTCALL,
     "layer_norm_eager(x, residual, weight, bias, normalized_ndim, eps, rms): as "
     "torch.ops.fastdl.layer_norm_eager, without its boxed call"},
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
