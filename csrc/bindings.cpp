// The module fptt_fast._C: each capability registers its functions from its own
// binding file (csrc/bind_*.cpp, csrc/cuda_glue/*.cpp); see registry.h.
#include <torch/extension.h>

#include "fptt_fast/fptt_math.h"
#include "fptt_fast/lstm_segment.h"
#include "fptt_fast/lstm_math.h"
#include "fptt_fast/registry.h"

namespace {

// The binary layout this build was compiled with (fptt_fast/layout.py checks it on load).
pybind11::dict layout() {
  namespace py = pybind11;
  py::list hyper;
  for (int i = 0; i < fptt::H_COUNT; ++i) hyper.append(fptt::kHyperNames[i]);
  py::dict opts, losses, out;
  opts["sgd"] = int(fptt::OPT_SGD);
  opts["adam"] = int(fptt::OPT_ADAM);
  opts["adamw"] = int(fptt::OPT_ADAMW);
  losses["mse"] = int(fptt::lstm::LOSS_MSE);
  losses["ce"] = int(fptt::lstm::LOSS_CE);
  out["hyper_fields"] = hyper;
  out["optimizers"] = opts;
  out["losses"] = losses;
  return out;
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
  m.attr("layout") = layout();  // hyper row fields, optimiser and loss codes
  m.def("with_cuda", &with_cuda, "whether this build has the CUDA kernels");
  fptt::register_all(m);
}
