// The Python extension module regdrop_ext._C. Loading the shared library runs
// the static TORCH_LIBRARY registrations, which is all Python needs to reach
// the ops as torch.ops.regdrop.*; and manifest() hands Python the op manifest
// (regdrop/manifest.h), which its vmap and DTensor rules and the tests read.
#include <Python.h>

#include "../include/regdrop/manifest.h"

namespace {

const char* unit_name(regdrop::UnitKind unit) {
  switch (unit) {
    case regdrop::UnitKind::Element:
      return "element";
    case regdrop::UnitKind::Sample:
      return "sample";
    case regdrop::UnitKind::Channel:
      return "channel";
  }
  return "";
}

const char* variant_name(regdrop::Variant variant) {
  switch (variant) {
    case regdrop::Variant::Masked:
      return "masked";
    case regdrop::Variant::InPlace:
      return "in_place";
    case regdrop::Variant::LowMemory:
      return "low_memory";
    case regdrop::Variant::Backward:
      return "backward";
    case regdrop::Variant::LowMemoryBackward:
      return "low_memory_backward";
  }
  return "";
}

// [{"name": ..., "family": "elementwise" or "norm", "variant": ..., "unit": ...,
//   "residual": bool, "bias": bool, "forward": the row's name, "backward": the
//   op its gradient goes through}, ...]
PyObject* manifest(PyObject*, PyObject*) {
  PyObject* ops = PyList_New(0);
  if (ops == nullptr) return nullptr;
  for (const regdrop::OpSpec& op : regdrop::kOps) {
    PyObject* entry = Py_BuildValue(
        "{s:s,s:s,s:s,s:s,s:O,s:O,s:s,s:s}", "name", op.name, "family",
        op.family == regdrop::Family::Norm ? "norm" : "elementwise", "variant", variant_name(op.variant), "unit",
        unit_name(op.unit), "residual", op.residual ? Py_True : Py_False, "bias", op.bias ? Py_True : Py_False,
        "forward", op.forward, "backward", op.is_forward() ? regdrop::backward_of(op).name : op.name);
    if (entry == nullptr || PyList_Append(ops, entry) != 0) {
      Py_XDECREF(entry);
      Py_DECREF(ops);
      return nullptr;
    }
    Py_DECREF(entry);
  }
  return ops;
}

PyMethodDef methods[] = {
    {"manifest", manifest, METH_NOARGS, "The regdrop ops, as csrc/include/regdrop/manifest.h declares them."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
