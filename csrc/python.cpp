// The Python module fastdl._C: importing it runs the op registrations of the other files,
// and it holds the eager entries of the native backends as plain Python functions,
//
//   fastdl._C.softmax_eager(x, dim, log)
//   fastdl._C.layer_norm_eager(x, residual, weight, bias, normalized_ndim, eps, rms)
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
// to the torch.ops op, which does all that torch does for such calls.
#include <Python.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

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
  PyObject* y_py = THPVariable_Wrap(std::move(y));
  PyObject* h_py = y_py != nullptr ? THPVariable_Wrap(std::move(h)) : nullptr;
  PyObject* pair = h_py != nullptr ? PyTuple_Pack(2, y_py, h_py) : nullptr;
  Py_XDECREF(y_py);
  Py_XDECREF(h_py);
  return pair;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"softmax_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&softmax_eager_py)), METH_FASTCALL,
     "softmax_eager(x, dim, log): as torch.ops.fastdl.softmax_eager, without its boxed call"},
    {"layer_norm_eager", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&layer_norm_eager_py)),
     METH_FASTCALL,
     "layer_norm_eager(x, residual, weight, bias, normalized_ndim, eps, rms): as "
     "torch.ops.fastdl.layer_norm_eager, without its boxed call"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace fastdl

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, fastdl::methods,
                                      nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
