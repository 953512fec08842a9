// Test-only bindings of the argument checks (csrc/include/fptt_fast/update_checks.h and
// lstm_checks.h), built by tests/conftest.py's check_ext fixture and never shipped. The
// CUDA glue is not built on CPU CI, yet its checks must be tested there: each function
// runs exactly the checks of one binding on device type device_type, so with "cpu", CPU
// tensors stand in for CUDA ones and the CUDA bindings' check logic runs unchanged; with
// "cuda", CPU tensors must be refused. They only check: no kernel runs, no data is written.
#include <torch/extension.h>

#include <string>

#include "fptt_fast/cuda_lstm.h"
#include "fptt_fast/lstm_checks.h"
#include "fptt_fast/seam_cast.h"
#include "fptt_fast/update_checks.h"

namespace {

c10::DeviceType parse_device_type(const std::string& s) {
  FPTT_CHECK(s == "cpu" || s == "cuda", "device_type must be 'cpu' or 'cuda', got '", s, "'");
  return s == "cpu" ? c10::kCPU : c10::kCUDA;
}

pybind11::tuple dims_tuple(const fptt::checks::LstmDims& d) {
  return pybind11::make_tuple(d.T, d.B, d.I, d.H, d.O);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace fptt;
  m.attr("lstm_cuda_max_hidden") = py::int_(cuda::kLstmMaxHidden);
  m.def(
      "fused_update",
      [](const FpttState& state, bool with_status, const std::string& device_type) {
        checks::check_fused_update_args(with_status ? "fused_update_cuda" : "fused_update_cpu",
                                        state, with_status, parse_device_type(device_type));
      },
      "fused_update_cpu's checks (with_status False) or fused_update_cuda's (True)",
      py::arg("state"), py::arg("with_status"), py::arg("device_type"));
  m.def(
      "lstm_segment_cpu",
      [](const FpttState& state, const SegmentIO& segment, const SegmentConfig& config,
         const at::Tensor& workspace, const std::string& device_type) {
        const checks::LstmDims d = checks::check_lstm_segment_cpu_args(
            state, segment, config, workspace, parse_device_type(device_type), nullptr);
        // as the binding does, last; only where the target's data is host memory
        if (config.loss == lstm::LOSS_CE && segment.target.device().is_cpu())
          checks::check_ce_classes("lstm_segment_step_cpu", segment.target, d.O);
        return dims_tuple(d);
      },
      "lstm_segment_step_cpu's checks; (T, B, I, H, O)", py::arg("state"), py::arg("segment"),
      py::arg("config"), py::arg("workspace"), py::arg("device_type"));
  m.def(
      "lstm_segment_cuda",
      [](const FpttState& state, const SegmentIO& segment, const SegmentConfig& config,
         const std::string& device_type) {
        // as lstm_train_cuda: without the update, the gradients launch's checks
        const c10::DeviceType dev = parse_device_type(device_type);
        return dims_tuple(config.update ? checks::check_lstm_segment_cuda_args(
                                              "lstm_train_cuda", state, segment, config, dev)
                                        : checks::check_lstm_gradients_cuda_args(
                                              "lstm_train_cuda", state, segment, config, dev));
      },
      "lstm_train_cuda's checks; (T, B, I, H, O)", py::arg("state"), py::arg("segment"),
      py::arg("config"), py::arg("device_type"));
}
