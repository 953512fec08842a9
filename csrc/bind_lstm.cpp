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
#include "fptt_fast/update_checks.h"

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

void check_cpu_f32(const at::Tensor& t, const char* name, std::vector<int64_t> shape) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.sizes().vec() == shape, name, " has shape ", t.sizes(), ", expected ",
              at::IntArrayRef(shape));
}

std::tuple<double, at::Tensor, at::Tensor, double, bool> lstm_segment_step_cpu(
    at::Tensor x, at::Tensor target, at::Tensor h0, at::Tensor c0, std::vector<at::Tensor> params,
    std::vector<at::Tensor> grads, at::Tensor workspace, int64_t loss, bool per_step, double weight,
    bool update, std::vector<at::Tensor> w_bars, std::vector<at::Tensor> lams,
    std::vector<at::Tensor> s1s, std::vector<at::Tensor> s2s, std::vector<at::Tensor> steps,
    at::Tensor hyper, std::vector<int64_t> group_of, int64_t optimizer, double clip,
    bool builtin_gemm) {
  TORCH_CHECK(params.size() == 6 && grads.size() == 6,
              "lstm_segment_step_cpu: expected 6 parameters and 6 gradient buffers "
              "(weight_ih, weight_hh, bias_ih, bias_hh, head weight, head bias)");
  TORCH_CHECK(x.dim() == 3, "x must be [omega, B, I], got ", x.sizes());
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2);
  TORCH_CHECK(T >= 1 && B >= 1 && I >= 1, "x must have omega, B, I >= 1, got ", x.sizes());
  TORCH_CHECK(params[1].dim() == 2 && params[1].size(0) % 4 == 0 && params[1].size(0) >= 4,
              "weight_hh must be [4H, H]");
  const int64_t H = params[1].size(1), G = 4 * H;
  TORCH_CHECK(params[4].dim() == 2 && params[4].size(0) >= 1, "head weight must be [O, H]");
  const int64_t O = params[4].size(0);
  check_cpu_f32(x, "x", {T, B, I});
  check_cpu_f32(h0, "h", {B, H});
  check_cpu_f32(c0, "c", {B, H});
  const std::vector<std::vector<int64_t>> shapes = {{G, I}, {G, H}, {G}, {G}, {O, H}, {O}};
  const char* names[6] = {"weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
                          "head.weight", "head.bias"};
  for (int k = 0; k < 6; ++k) {
    check_cpu_f32(params[k], names[k], shapes[k]);
    check_cpu_f32(grads[k], "gradient buffer", shapes[k]);
  }
  TORCH_CHECK(loss == cpu::LOSS_MSE || loss == cpu::LOSS_CE, "loss code must be 0 (mse) or 1 (ce)");
  std::vector<int64_t> lead = per_step ? std::vector<int64_t>{T, B} : std::vector<int64_t>{B};
  if (loss == cpu::LOSS_MSE) {
    std::vector<int64_t> s = lead;
    s.push_back(O);
    check_cpu_f32(target, "mse target", s);
  } else {
    TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong &&
                    target.is_contiguous() && target.sizes().vec() == lead,
                "ce target must be a contiguous CPU int64 tensor of shape ", at::IntArrayRef(lead),
                ", got ", target.scalar_type(), " ", target.sizes());
    const int64_t* y = target.data_ptr<int64_t>();
    for (int64_t k = 0; k < target.numel(); ++k)
      TORCH_CHECK(y[k] >= 0 && y[k] < O, "ce target class ", y[k], " is out of range [0, ", O - 1,
                  "]");
  }
  TORCH_CHECK(workspace.device().is_cpu() && workspace.scalar_type() == at::kFloat,
              "workspace must be a CPU float32 tensor");
  if (update)
    checks::check_update_lists(params, grads, w_bars, lams, s1s, s2s, steps, hyper, group_of,
                               optimizer, at::kCPU);

  const int64_t need = cpu::lstm_segment_workspace_floats(T, B, I, H, O, per_step);
  if (workspace.numel() < need) workspace.resize_({need});  // grown once, then reused
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
