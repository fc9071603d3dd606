// manualbp's compiled kernels: one Python extension (manualbp.native builds it), one init per source file.
#pragma once
#include <torch/extension.h>

namespace manualbp {
void init_fused(pybind11::module_& m);   // fused.cpp: the FusedTrainer's step loop
void init_module(pybind11::module_& m);  // module.cpp: the drop-in module's autograd nodes
}  // namespace manualbp
