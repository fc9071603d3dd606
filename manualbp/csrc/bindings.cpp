// The extension's entry point: the one file that includes <torch/extension.h>; the kernels live elsewhere.
#include <torch/extension.h>

#include "native.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "manualbp's compiled kernels (built by manualbp.native)";
  m.def("fused_step_many", &manualbp::fused_step_many, "FusedTrainer.step_many's loop (see manualbp/fast/fused.py)",
        py::call_guard<py::gil_scoped_release>());
  m.def("mlp", &manualbp::mlp, "autograd.MLPFunction.apply(input, activations, bias, *params) as a C++ node",
        py::arg("input"), py::arg("activations"), py::arg("bias"), py::arg("params"));
  m.def("cross_entropy", &manualbp::cross_entropy,
        "autograd.CrossEntropyFunction.apply(input, target, reduction) for class indices, as a C++ node",
        py::arg("input"), py::arg("target"), py::arg("reduction"));
  // the mutation catalogue's runtime switch (native.h: MANUALBP_BUGS; manualbp.native.set_bug)
  m.def("set_bug", &manualbp::set_bug, "Break one formula of the kernels (a bug_codes() value; 0: none)",
        py::arg("code"));
  m.def("active_bug", &manualbp::active_bug, "The code set_bug set last (0: none)");
  m.def("bug_codes", [] {
    py::dict codes;  // catalogue name -> code, from native.h's one list
#define MANUALBP_BUG_ENTRY(code, name) codes[name] = static_cast<int64_t>(manualbp::code);
    MANUALBP_BUGS(MANUALBP_BUG_ENTRY)
#undef MANUALBP_BUG_ENTRY
    return codes;
  }, "The catalogue bugs with a formula site in the kernels: name -> set_bug code");
}
