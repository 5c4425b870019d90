// The Python module classp_fused._C. Importing it registers the step op (classp_cpu.cpp, and
// classp_cuda_op.cpp where built) and the penalty's CPU ops (classp_penalty_ops.cpp); its one
// function, steppable_as_is, is the optimizer's per-step test of the tensors of a param group it
// validated at an earlier step.
#include <torch/csrc/autograd/python_variable.h>

#include <optional>

#include "classp_checks.h"

namespace {

// steppable_as_is(params, grads, accs) -> bool: three lists of equal length whose triples all
// pass classp::steppable_as_is on params[0]'s device. Reads metadata only (any device).
PyObject* steppable_as_is(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3 || !PyList_Check(args[0]) || !PyList_Check(args[1]) || !PyList_Check(args[2])) {
    PyErr_SetString(PyExc_TypeError, "steppable_as_is takes three lists of tensors");
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(args[0]);
  if (PyList_GET_SIZE(args[1]) != n || PyList_GET_SIZE(args[2]) != n) {
    Py_RETURN_FALSE;
  }
  std::optional<c10::Device> device;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* param = PyList_GET_ITEM(args[0], i);
    PyObject* grad = PyList_GET_ITEM(args[1], i);
    PyObject* acc = PyList_GET_ITEM(args[2], i);
    if (!THPVariable_Check(param) || !THPVariable_Check(grad) || !THPVariable_Check(acc)) {
      Py_RETURN_FALSE;
    }
    const at::Tensor& p = THPVariable_Unpack(param);
    if (!device) {
      device = p.device();
    }
    if (!classp::steppable_as_is(p, THPVariable_Unpack(grad), THPVariable_Unpack(acc), *device)) {
      Py_RETURN_FALSE;
    }
  }
  Py_RETURN_TRUE;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"steppable_as_is",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(steppable_as_is)), METH_FASTCALL,
     "Whether (params, grads, accs) can be stepped as they are."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
