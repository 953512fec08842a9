// The module fptt_fast._C: each capability registers its functions from its own
// binding file (csrc/bind_*.cpp, csrc/cuda_glue/*.cpp); see registry.h.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "fptt_fast/fptt_math.h"
#include "fptt_fast/lstm_checks.h"
#include "fptt_fast/lstm_math.h"
#include "fptt_fast/registry.h"
#include "fptt_fast/update_checks.h"

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

// ---- test-only bindings of the argument checks -------------------------------------
// The CUDA glue is not built on CPU CI, yet its argument checks must be tested there (on a
// GPU, checks that came after a use of the arguments crashed the process). So
// the checks live in torch-only headers (update_checks.h, lstm_checks.h), parameterised by
// the expected device type, and are bound here with the exact arguments of each binding
// plus device_type: with device_type="cpu", CPU tensors stand in for CUDA ones and the
// CUDA bindings' check logic runs unchanged; with "cuda", CPU tensors must be refused.
// They only check (no kernel runs, no data is written). Used by tests/test_bindings.py.

c10::DeviceType parse_device_type(const std::string& s) {
  FPTT_CHECK(s == "cpu" || s == "cuda", "device_type must be 'cpu' or 'cuda', got '", s, "'");
  return s == "cpu" ? c10::kCPU : c10::kCUDA;
}

pybind11::tuple dims_tuple(const fptt::checks::LstmDims& d) {
  return pybind11::make_tuple(d.T, d.B, d.I, d.H, d.O);
}

void check_fused_update_args(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                             std::vector<at::Tensor> w_bars, std::vector<at::Tensor> lams,
                             std::vector<at::Tensor> s1s, std::vector<at::Tensor> s2s,
                             std::vector<at::Tensor> steps, at::Tensor hyper,
                             std::vector<int64_t> group_of, int64_t optimizer, double clip,
                             std::optional<at::Tensor> status, std::string device_type) {
  const c10::DeviceType dev = parse_device_type(device_type);
  fptt::checks::check_fused_update_args(
      status ? "fused_update_cuda" : "fused_update_cpu", params, grads, w_bars, lams, s1s, s2s,
      steps, hyper, group_of, optimizer, clip, status ? &*status : nullptr, dev);
}

pybind11::tuple check_lstm_cpu_args(at::Tensor x, at::Tensor target, at::Tensor h0,
                                    at::Tensor c0, double weight, int64_t loss, bool per_step,
                                    std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                                    std::vector<at::Tensor> w_bars, std::vector<at::Tensor> lams,
                                    std::vector<at::Tensor> s1s, std::vector<at::Tensor> s2s,
                                    std::vector<at::Tensor> steps, at::Tensor hyper,
                                    std::vector<int64_t> group_of, int64_t optimizer,
                                    double clip, at::Tensor status, at::Tensor workspace,
                                    bool update, bool /*builtin_gemm*/, std::string device_type) {
  const fptt::checks::LstmDims d = fptt::checks::check_lstm_segment_cpu_args(
      x, target, h0, c0, weight, loss, per_step, params, grads, w_bars, lams, s1s, s2s, steps,
      hyper, group_of, optimizer, clip, status, workspace, update, parse_device_type(device_type),
      nullptr);
  // as the binding does, last; only where the target's data is host memory
  if (loss == fptt::cpu::LOSS_CE && target.device().is_cpu())
    fptt::checks::check_ce_classes("lstm_segment_step_cpu", target, d.O);
  return dims_tuple(d);
}

pybind11::tuple check_lstm_cuda_args(at::Tensor x, at::Tensor target, at::Tensor h0,
                                     at::Tensor c0, double weight, int64_t loss, bool per_step,
                                     std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                                     std::vector<at::Tensor> w_bars, std::vector<at::Tensor> lams,
                                     std::vector<at::Tensor> s1s, std::vector<at::Tensor> s2s,
                                     std::vector<at::Tensor> steps, at::Tensor hyper,
                                     std::vector<int64_t> group_of, int64_t optimizer,
                                     double clip, at::Tensor status, at::Tensor h_out,
                                     at::Tensor c_out, at::Tensor loss_out, bool tf32,
                                     std::string device_type) {
  return dims_tuple(fptt::checks::check_lstm_segment_cuda_args(
      x, target, h0, c0, weight, loss, per_step, params, grads, w_bars, lams, s1s, s2s, steps,
      hyper, group_of, optimizer, clip, status, h_out, c_out, loss_out, tf32,
      parse_device_type(device_type)));
}

void register_check_bindings(pybind11::module_& m) {
  namespace py = pybind11;
  // the limit _check_lstm_segment_cuda_args applies (cuda_lstm_max_hidden exists only in
  // CUDA builds)
  m.attr("_check_lstm_cuda_max_hidden") = py::int_(fptt::cuda::kLstmMaxHidden);
  m.def("_check_fused_update_args", &check_fused_update_args,
        "TEST ONLY: the argument checks of fused_update_cpu (status=None) or fused_update_cuda "
        "(status given) on device type device_type ('cpu' or 'cuda'); raises RuntimeError "
        "naming the argument, else returns None. Runs no kernel.",
        py::arg("params"), py::arg("grads"), py::arg("w_bars"), py::arg("lams"), py::arg("s1s"),
        py::arg("s2s"), py::arg("steps"), py::arg("hyper"), py::arg("group_of"),
        py::arg("optimizer"), py::arg("clip"), py::arg("status") = py::none(),
        py::arg("device_type") = "cpu");
  m.def("_check_lstm_segment_cpu_args", &check_lstm_cpu_args,
        "TEST ONLY: the argument checks of lstm_segment_step_cpu (same arguments) on device type "
        "device_type; returns (T, B, I, H, O) or raises RuntimeError. Runs no kernel.",
        py::arg("x"), py::arg("target"), py::arg("h0"), py::arg("c0"), py::arg("weight"),
        py::arg("loss"), py::arg("per_step"), py::arg("params"), py::arg("grads"),
        py::arg("w_bars"), py::arg("lams"), py::arg("s1s"), py::arg("s2s"), py::arg("steps"),
        py::arg("hyper"), py::arg("group_of"), py::arg("optimizer"), py::arg("clip"),
        py::arg("status"), py::arg("workspace"), py::arg("update") = true,
        py::arg("builtin_gemm") = false, py::arg("device_type") = "cpu");
  m.def("_check_lstm_segment_cuda_args", &check_lstm_cuda_args,
        "TEST ONLY: the argument checks of lstm_segment_step_cuda (same arguments) on device "
        "type device_type ('cpu': CPU tensors stand in for CUDA ones); returns (T, B, I, H, O) "
        "or raises RuntimeError. Runs no kernel.",
        py::arg("x"), py::arg("target"), py::arg("h0"), py::arg("c0"), py::arg("weight"),
        py::arg("loss"), py::arg("per_step"), py::arg("params"), py::arg("grads"),
        py::arg("w_bars"), py::arg("lams"), py::arg("s1s"), py::arg("s2s"), py::arg("steps"),
        py::arg("hyper"), py::arg("group_of"), py::arg("optimizer"), py::arg("clip"),
        py::arg("status"), py::arg("h_out"), py::arg("c_out"), py::arg("loss_out"),
        py::arg("tf32") = false, py::arg("device_type") = "cuda");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fptt_fast C++/CUDA kernels";
  m.attr("layout") = layout();  // hyper row fields, optimiser and loss codes
  m.def("with_cuda", &with_cuda, "whether this build has the CUDA kernels");
  fptt::register_all(m);
  register_check_bindings(m);
}
