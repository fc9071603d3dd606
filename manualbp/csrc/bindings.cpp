// The extension's entry point: the one file that includes <torch/extension.h>; the kernels live elsewhere.
#include <torch/extension.h>

#include "native.h"

namespace manualbp {
void init_module(pybind11::module_& m);  // module.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "manualbp's compiled kernels (built by manualbp.native)";
  m.def("fused_step_many", &manualbp::fused_step_many, "FusedTrainer.step_many's loop (see manualbp/fast/fused.py)",
        py::call_guard<py::gil_scoped_release>());
  manualbp::init_module(m);
}
