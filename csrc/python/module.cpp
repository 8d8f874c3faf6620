// The Python extension module regdrop_ext._C. It is empty: loading the shared
// library runs the static TORCH_LIBRARY registrations, which is all Python needs
// to reach the ops as torch.ops.regdrop.*.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
