// Binding of the LSTM segment step on the CPU: checks, then in one call (GIL released)
// the forward/loss/backward of csrc/cpu/lstm_segment.cpp and the fused FPTT update
// fptt::cpu::fused_update on the six gradients.
//
// GEMMs: at::mm / addmm on zero-copy views (torch's CPU BLAS, far faster than a
// hand-written OpenMP GEMM on these shapes); builtin_gemm=True uses the torch-free
// gemm_builtin instead (a reference for the pointer arithmetic, and what a build without
// torch would use).
#include <torch/extension.h>

#include <tuple>
#include <vector>

#include "fptt_fast/cpu_kernels.h"
#include "fptt_fast/fptt_math.h"
#include "fptt_fast/lstm_segment.h"
#include "fptt_fast/registry.h"
#include "fptt_fast/lstm_checks.h"

namespace fptt {
namespace {

at::Tensor view2d(const float* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  auto opts = at::TensorOptions().dtype(at::kFloat).device(at::kCPU);
  // trans: the [rows, cols] matrix is the transpose of the stored [cols, rows] one
  return trans ? at::from_blob(const_cast<float*>(p), {rows, cols}, {1, ld}, opts)
               : at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, opts);
}

void torch_gemm(void*, int trans_a, int trans_b, int64_t M, int64_t N, int64_t K, const float* A,
                int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  at::Tensor a = view2d(A, M, K, lda, trans_a != 0);
  at::Tensor b = view2d(B, K, N, ldb, trans_b != 0);
  at::Tensor c = view2d(C, M, N, ldc, false);
  if (beta == 0.f) at::mm_out(c, a, b);
  else c.addmm_(a, b, beta, 1.0);
}

std::tuple<double, at::Tensor, at::Tensor, double, bool> lstm_segment_step_cpu(
    at::Tensor x, at::Tensor target, at::Tensor h0, at::Tensor c0, std::vector<at::Tensor> params,
    std::vector<at::Tensor> grads, at::Tensor workspace, int64_t loss, bool per_step, double weight,
    bool update, std::vector<at::Tensor> w_bars, std::vector<at::Tensor> lams,
    std::vector<at::Tensor> s1s, std::vector<at::Tensor> s2s, std::vector<at::Tensor> steps,
    at::Tensor hyper, std::vector<int64_t> group_of, int64_t optimizer, double clip,
    bool builtin_gemm) {
  // Every check (lstm_checks.h, shared with the CUDA glue's and bound for tests) before
  // any data is touched: a refused call changes nothing, not even the workspace's size.
  int64_t need = 0;
  const checks::LstmDims d = checks::check_lstm_segment_cpu_args(
      x, target, h0, c0, params, grads, workspace, loss, per_step, weight, update, w_bars, lams,
      s1s, s2s, steps, hyper, group_of, optimizer, clip, at::kCPU, &need);
  const int64_t T = d.T, B = d.B, I = d.I, H = d.H, O = d.O;
  // The only data-reading check, last: the kernel indexes the head's outputs with the classes.
  if (loss == cpu::LOSS_CE) checks::check_ce_classes("lstm_segment_step_cpu", target, O);

  if (workspace.numel() < need) {  // grown once, then reused
    try {
      workspace.resize_({need});
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "lstm_segment_step_cpu: workspace could not be grown to ", need,
                  " floats: ", e.what_without_backtrace());
    }
  }
  at::Tensor h_out = at::empty({B, H}, x.options());
  at::Tensor c_out = at::empty({B, H}, x.options());

  cpu::LstmSegmentArgs a;
  a.T = T; a.B = B; a.I = I; a.H = H; a.O = O;
  a.x = x.data_ptr<float>();
  a.target_f = loss == cpu::LOSS_MSE ? target.data_ptr<float>() : nullptr;
  a.target_i = loss == cpu::LOSS_CE ? target.data_ptr<int64_t>() : nullptr;
  a.loss = int(loss);
  a.per_step = per_step ? 1 : 0;
  a.weight = float(weight);
  a.h0 = h0.data_ptr<float>();
  a.c0 = c0.data_ptr<float>();
  const float* p[6];
  float* g[6];
  for (int k = 0; k < 6; ++k) {
    p[k] = params[k].data_ptr<float>();
    g[k] = grads[k].data_ptr<float>();
  }
  a.w_ih = p[0]; a.w_hh = p[1]; a.b_ih = p[2]; a.b_hh = p[3]; a.w_o = p[4]; a.b_o = p[5];
  a.g_w_ih = g[0]; a.g_w_hh = g[1]; a.g_b_ih = g[2]; a.g_b_hh = g[3]; a.g_w_o = g[4]; a.g_b_o = g[5];
  a.h_out = h_out.data_ptr<float>();
  a.c_out = c_out.data_ptr<float>();
  a.workspace = workspace.data_ptr<float>();

  std::vector<cpu::UpdateSlot> slots;
  if (update) {
    const float* hp = hyper.data_ptr<float>();
    for (int k = 0; k < 6; ++k)
      slots.push_back({params[k].data_ptr<float>(), g[k], w_bars[k].data_ptr<float>(),
                       lams[k].data_ptr<float>(), s1s[k].data_ptr<float>(),
                       optimizer == OPT_SGD ? nullptr : s2s[k].data_ptr<float>(),
                       steps[k].data_ptr<float>(), hp + group_of[k] * H_COUNT, params[k].numel()});
  }
  double seg_loss = 0.0;
  cpu::UpdateResult r{0.0, false};
  {
    pybind11::gil_scoped_release no_gil;
    at::NoGradGuard no_grad;
    cpu::Gemm gemm{builtin_gemm ? nullptr : &torch_gemm, nullptr};
    seg_loss = cpu::lstm_segment_grads(a, gemm);
    if (update) r = cpu::fused_update(slots.data(), int(slots.size()), int(optimizer), float(clip));
  }
  return {seg_loss, h_out, c_out, r.norm, r.skipped};
}

}  // namespace

void register_lstm_cpu(pybind11::module_& m) {
  m.def("lstm_segment_step_cpu", &lstm_segment_step_cpu,
        "One FPTT LSTM segment step on CPU tensors: forward over the segment, head and loss, "
        "backward, gradients (written to grads) and, if update, the fused FPTT update. Returns "
        "(unweighted loss, h, c, norm, skipped).",
        pybind11::arg("x"), pybind11::arg("target"), pybind11::arg("h0"), pybind11::arg("c0"),
        pybind11::arg("params"), pybind11::arg("grads"), pybind11::arg("workspace"),
        pybind11::arg("loss"), pybind11::arg("per_step"), pybind11::arg("weight"),
        pybind11::arg("update"), pybind11::arg("w_bars"), pybind11::arg("lams"),
        pybind11::arg("s1s"), pybind11::arg("s2s"), pybind11::arg("steps"),
        pybind11::arg("hyper"), pybind11::arg("group_of"), pybind11::arg("optimizer"),
        pybind11::arg("clip"), pybind11::arg("builtin_gemm") = false);
}

}  // namespace fptt
