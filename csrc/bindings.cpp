// The module fptt_fast._C: each capability registers its functions from its own
// binding file (csrc/bind_*.cpp, csrc/cuda_glue/*.cpp); see registry.h.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "fptt_fast/fptt_math.h"
#include "fptt_fast/registry.h"

namespace {

std::vector<std::string> hyper_names() {
  return std::vector<std::string>(fptt::kHyperNames, fptt::kHyperNames + fptt::H_COUNT);
}

bool with_cuda() {
#ifdef FPTT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fptt_fast C++/CUDA kernels";
  m.def("hyper_names", &hyper_names, "order of a group's hyper-parameter row");
  m.def("with_cuda", &with_cuda, "whether this build has the CUDA kernels");
  fptt::register_all(m);
}
