// The extension's entry point: each source file registers its functions on the one module.
#include "native.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "manualbp's compiled kernels (built by manualbp.native)";
  manualbp::init_fused(m);
  manualbp::init_module(m);
}
