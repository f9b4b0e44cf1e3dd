// Registers torch.ops.hbkernels.* (schemas + CPU kernels) and defines the Python module
// hbkernels._C, whose import runs the registrations. Fake (meta) kernels live in hbkernels/cpp.py.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(hbkernels, m) {
  m.def("attn_fwd(Tensor q, Tensor k, Tensor v, Tensor(a!) out, float scale, bool causal) -> ()");
  m.def(
      "attn_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, "
      "float scale, bool causal) -> ()");
  m.def(
      "gn_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? shift, Tensor(a!) y, Tensor(b!) mean, Tensor(c!) rstd, "
      "int num_groups, float eps, bool silu) -> ()");
  m.def(
      "gn_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor? shift, Tensor mean, Tensor rstd, Tensor(a!) dx, "
      "Tensor(b!)? dweight, Tensor(c!)? dbias, int num_groups, bool silu) -> ()");
  m.def("copy_add(Tensor src, Tensor? residual, Tensor? bias, Tensor(a!) out) -> ()");
  m.def("geglu_fwd(Tensor x, Tensor(a!) out) -> ()");
  m.def("geglu_bwd(Tensor dy, Tensor x, Tensor(a!) dx) -> ()");
  m.def(
      "ln_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, Tensor(a!) y, Tensor(b!)? s, "
      "Tensor(c!) mean, Tensor(d!) rstd, float eps) -> ()");
  m.def(
      "ln_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, Tensor(a!) dx, Tensor(b!)? dweight, "
      "Tensor(c!)? dbias) -> ()");
}

TORCH_LIBRARY_IMPL(hbkernels, CPU, m) {
  m.impl("attn_fwd", &hb::attn_fwd);
  m.impl("attn_bwd", &hb::attn_bwd);
  m.impl("gn_fwd", &hb::gn_fwd);
  m.impl("gn_bwd", &hb::gn_bwd);
  m.impl("copy_add", &hb::copy_add);
  m.impl("geglu_fwd", &hb::geglu_fwd);
  m.impl("geglu_bwd", &hb::geglu_bwd);
  m.impl("ln_fwd", &hb::ln_fwd);
  m.impl("ln_bwd", &hb::ln_bwd);
}

// A module with no functions: importing it loads this library, which runs the registrations above.
static struct PyModuleDef hbkernels_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&hbkernels_c_module); }
