// The drop-in module's autograd nodes (not yet compiled ones: the module runs its Python Functions).
#include <torch/extension.h>

namespace manualbp {
void init_module(pybind11::module_& m) {}
}  // namespace manualbp
