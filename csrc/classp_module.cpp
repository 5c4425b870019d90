// The Python module classp_fused._C. Importing it registers the step op (classp_cpu.cpp, and
// classp_cuda_op.cpp where built) and the penalty's CPU ops (classp_penalty_ops.cpp); its one
// function, plan_grads, is the optimizer's per-step test that a param group it validated at an
// earlier step still holds the tensors it held then (classp_fused/group_plan.py).
#include <torch/csrc/autograd/python_variable.h>

#include <optional>

#include "classp_checks.h"

namespace {

// Whether `list` is a list of `size` items, each the same object as in `same` (a list of that
// size) where `same` is given.
bool is_list_of(PyObject* list, Py_ssize_t size, PyObject* same = nullptr) {
  if (!PyList_Check(list) || PyList_GET_SIZE(list) != size) {
    return false;
  }
  for (Py_ssize_t i = 0; same != nullptr && i < size; ++i) {
    if (PyList_GET_ITEM(list, i) != PyList_GET_ITEM(same, i)) {
      return false;
    }
  }
  return true;
}

// Whether dict `state` holds the keys `keys` with the values `values` (lists), in that order.
bool dict_holds(PyObject* state, PyObject* keys, PyObject* values) {
  if (!PyDict_Check(state) || !PyList_Check(keys) || !PyList_Check(values) ||
      PyDict_Size(state) != PyList_GET_SIZE(keys) ||
      PyList_GET_SIZE(values) != PyList_GET_SIZE(keys)) {
    return false;
  }
  Py_ssize_t pos = 0;
  Py_ssize_t i = 0;
  PyObject* key = nullptr;
  PyObject* value = nullptr;
  while (PyDict_Next(state, &pos, &key, &value)) {
    if (key != PyList_GET_ITEM(keys, i) || value != PyList_GET_ITEM(values, i)) {
      return false;
    }
    ++i;
  }
  return true;
}

// Whether every dict of `entries` holds under `key` the object at the same index of `values`
// (lists of one size). Sets no error: a missing key or a non-dict entry is a mismatch.
bool entries_hold(PyObject* entries, PyObject* key, PyObject* values) {
  for (Py_ssize_t j = 0; j < PyList_GET_SIZE(entries); ++j) {
    PyObject* entry = PyList_GET_ITEM(entries, j);
    if (!PyDict_Check(entry) || PyDict_GetItem(entry, key) != PyList_GET_ITEM(values, j)) {
      return false;
    }
  }
  return true;
}

// plan_grads(group_params, plan_params, stepped, accs, entries, counters, means, state,
//            state_keys, state_entries, compressed) -> list | None
//
// The grads of `stepped` (the plan's stepped params, in order) when the group's params are the
// plan's objects (`plan_params`), exactly the `stepped` ones have a grad, `state` (the
// optimizer's state dict) holds the keys and entries it held (`state_keys`, `state_entries`, in
// order), `entries` (the stepped params' state entries) hold the accumulators `accs`, step
// counters `counters` and, unless `means` is None, gradient means `means`, and every (param,
// grad, accumulator) passes classp::steppable_as_is on the first stepped param's device (with
// `compressed`, compressed accumulators pass too); else None. Reads metadata and identities only
// (any device); hashes no param.
PyObject* plan_grads(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 11 || !PyBool_Check(args[10])) {
    PyErr_SetString(PyExc_TypeError, "plan_grads takes 10 arguments and a bool");
    return nullptr;
  }
  const bool compressed = args[10] == Py_True;
  PyObject* group_params = args[0];
  PyObject* plan_params = args[1];
  PyObject* stepped = args[2];
  PyObject* accs = args[3];
  PyObject* entries = args[4];
  PyObject* counters = args[5];
  PyObject* means = args[6];
  if (!PyList_Check(plan_params) || !PyList_Check(stepped)) {
    PyErr_SetString(PyExc_TypeError, "plan_grads: plan_params and stepped must be lists");
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(plan_params);
  const Py_ssize_t m = PyList_GET_SIZE(stepped);
  static PyObject* const accumulator_key = PyUnicode_InternFromString("accumulator");
  static PyObject* const step_key = PyUnicode_InternFromString("step");
  static PyObject* const mean_key = PyUnicode_InternFromString("grad_sq_mean");
  if (accumulator_key == nullptr || step_key == nullptr || mean_key == nullptr) {
    return nullptr;
  }
  if (m == 0 || !is_list_of(group_params, n, plan_params) || !is_list_of(accs, m) ||
      !is_list_of(entries, m) || !is_list_of(counters, m) ||
      !(means == Py_None || is_list_of(means, m)) ||
      !dict_holds(args[7], args[8], args[9]) || !entries_hold(entries, accumulator_key, accs) ||
      !entries_hold(entries, step_key, counters) ||
      !(means == Py_None || entries_hold(entries, mean_key, means))) {
    Py_RETURN_NONE;
  }
  PyObject* grads = PyList_New(m);
  if (grads == nullptr) {
    return nullptr;
  }
  std::optional<c10::Device> device;
  Py_ssize_t j = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* param = PyList_GET_ITEM(group_params, i);
    if (!THPVariable_Check(param)) {
      Py_DECREF(grads);
      Py_RETURN_NONE;
    }
    const at::Tensor& p = THPVariable_Unpack(param);
    const at::Tensor& grad = p.grad();
    const bool is_stepped = j < m && PyList_GET_ITEM(stepped, j) == param;
    if (grad.defined() != is_stepped) {
      Py_DECREF(grads);
      Py_RETURN_NONE;
    }
    if (!is_stepped) {
      continue;
    }
    PyObject* acc = PyList_GET_ITEM(accs, j);
    if (!device) {
      device = p.device();
    }
    if (!THPVariable_Check(acc) ||
        !classp::steppable_as_is(p, grad, THPVariable_Unpack(acc), *device, compressed)) {
      Py_DECREF(grads);
      Py_RETURN_NONE;
    }
    PyList_SET_ITEM(grads, j, THPVariable_Wrap(grad));
    ++j;
  }
  if (j != m) {
    Py_DECREF(grads);
    Py_RETURN_NONE;
  }
  return grads;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"plan_grads", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(plan_grads)),
     METH_FASTCALL, "The grads of a planned param group's stepped params, or None."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
