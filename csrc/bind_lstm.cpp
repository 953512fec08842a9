// Bindings of the LSTM segment step on the CPU: checks, then in one call the forward/loss/
// backward of csrc/cpu/lstm_segment.cpp and the fused FPTT update fptt::cpu::fused_update on
// the six gradients. Two forms: lstm_segment_step_cpu (every list passed on every call) and
// CpuLstmPlan (FPTTLSTM's hot path: the lists held, see below).
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

// CpuUpdatePlan's check (hyper-parameters included) of the FPTT optimiser's plan `plan`:
// 0, or the PLAN_* code. Defined in bind_update.cpp (no header: it is the only thing the
// two binding files share).
int64_t cpu_update_plan_check(pybind11::handle plan, pybind11::handle groups,
                              pybind11::handle clip);

namespace {

constexpr const char* kFn = "lstm_segment_step_cpu";  // checks' messages

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

// What one segment step returns to the bindings.
struct SegmentOut {
  double loss = 0.0;
  at::Tensor h, c;
  cpu::UpdateResult r{0.0, false};
};

// The segment step on checked arguments: forward/loss/backward into grads and, if `slots`
// is not empty, the fused update on them. The workspace holds at least the floats the
// segment needs. Shared by the list binding and the plan, so both run the same code.
SegmentOut run_segment(const at::Tensor& x, const at::Tensor& target, const at::Tensor& h0,
                       const at::Tensor& c0, const std::vector<at::Tensor>& params,
                       const std::vector<at::Tensor>& grads, const at::Tensor& workspace,
                       const checks::LstmDims& d, int64_t loss, bool per_step, double weight,
                       const std::vector<cpu::UpdateSlot>& slots, int64_t optimizer,
                       double clip, bool builtin_gemm, bool release_gil) {
  const int64_t T = d.T, B = d.B, I = d.I, H = d.H, O = d.O;
  SegmentOut out;
  out.h = at::empty({B, H}, x.options());
  out.c = at::empty({B, H}, x.options());

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
  a.h_out = out.h.data_ptr<float>();
  a.c_out = out.c.data_ptr<float>();
  a.workspace = workspace.data_ptr<float>();

  auto run = [&] {
    at::NoGradGuard no_grad;
    cpu::Gemm gemm{builtin_gemm ? nullptr : &torch_gemm, nullptr};
    out.loss = cpu::lstm_segment_grads(a, gemm);
    if (!slots.empty())
      out.r = cpu::fused_update(slots.data(), int(slots.size()), int(optimizer), float(clip));
  };
  if (release_gil) {
    pybind11::gil_scoped_release no_gil;
    run();
  } else {
    run();
  }
  return out;
}

// Grows the workspace (in place: the caller's tensor) to `need` floats.
void grow_workspace(at::Tensor& workspace, int64_t need) {
  if (workspace.numel() >= need) return;  // grown once, then reused
  try {
    workspace.resize_({need});
  } catch (const c10::Error& e) {
    FPTT_CHECK(false, "lstm_segment_step_cpu: workspace could not be grown to ", need,
                " floats: ", e.what_without_backtrace());
  }
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
  // The only data-reading check, last: the kernel indexes the head's outputs with the classes.
  if (loss == cpu::LOSS_CE) checks::check_ce_classes(kFn, target, d.O);
  grow_workspace(workspace, need);

  std::vector<cpu::UpdateSlot> slots;
  if (update) {
    const float* hp = hyper.data_ptr<float>();
    for (int k = 0; k < 6; ++k)
      slots.push_back({params[k].data_ptr<float>(), grads[k].data_ptr<float>(),
                       w_bars[k].data_ptr<float>(), lams[k].data_ptr<float>(),
                       s1s[k].data_ptr<float>(),
                       optimizer == OPT_SGD ? nullptr : s2s[k].data_ptr<float>(),
                       steps[k].data_ptr<float>(), hp + group_of[k] * H_COUNT, params[k].numel()});
  }
  SegmentOut o = run_segment(x, target, h0, c0, params, grads, workspace, d, loss, per_step,
                             weight, slots, optimizer, clip, builtin_gemm, /*release_gil=*/true);
  return {o.loss, o.h, o.c, o.r.norm, o.r.skipped};
}

// ---- the plan: FPTTLSTM.train_segment's hot path on the cpu backend -----------------------
//
// FPTTLSTM._cpu_call (fptt_fast/lstm.py) used to rebuild seven lists of tensors, re-key the
// hyper table and record the status in Python on every segment: more than the segment
// itself costs at small sizes (issue 12). A CpuLstmPlan holds the six parameters, the
// gradient buffers, the workspace and the optimiser's FPTT state and hyper table, and runs
// a segment in one call. What it re-checks per call:
//   - the optimiser: its CpuUpdatePlan's check (bind_update.cpp; the same groups, hyper-
//     parameters and clip, every parameter and state tensor where it was). On a change the
//     call returns that PLAN_* code having done nothing, and Python refreshes or rebuilds;
//   - the inputs (x, target, h0, c0), which are new every call: the shared shape, dtype and
//     device checks (check_lstm_segment_common, which also re-checks the parameters and
//     gradients), the class range for ce targets (check_ce_classes), and whether any input
//     shares memory with a tensor the call may write. Only if one does, or on the first call
//     (and the first with update), the full check_lstm_segment_cpu_args runs and decides,
//     raising as the list binding does.

// Segments this small run with the GIL held (handing it over costs more than they do).
constexpr int64_t kReleaseGilMinWork = 1 << 16;

class CpuLstmPlan {
 public:
  CpuLstmPlan(pybind11::object update_plan, std::vector<at::Tensor> params,
              std::vector<at::Tensor> grads, at::Tensor workspace, std::vector<at::Tensor> w_bars,
              std::vector<at::Tensor> lams, std::vector<at::Tensor> s1s,
              std::vector<at::Tensor> s2s, std::vector<at::Tensor> steps, at::Tensor hyper,
              int64_t optimizer, double clip, at::Tensor status)
      : update_plan_(std::move(update_plan)), params_(std::move(params)),
        grads_(std::move(grads)), workspace_(std::move(workspace)), w_bars_(std::move(w_bars)),
        lams_(std::move(lams)), s1s_(std::move(s1s)), s2s_(std::move(s2s)),
        steps_(std::move(steps)), hyper_(std::move(hyper)), status_(std::move(status)),
        optimizer_(optimizer), clip_(clip), group_of_(params_.size(), 0) {
    FPTT_CHECK(params_.size() == 6 && grads_.size() == 6, kFn,
                ": the plan takes the six parameters and their six gradient buffers");
    FPTT_CHECK(status_.defined() && status_.device().is_cpu() &&
                    status_.scalar_type() == at::kFloat && status_.is_contiguous() &&
                    status_.numel() == 3,
                kFn, ": status must be a contiguous CPU float32 tensor of 3 elements");
  }

  // Returns (loss, h, c, skipped-step count), or (None, None, None, code < 0) with nothing
  // done when the optimiser's plan says its groups, hyper-parameters or tensors changed.
  pybind11::tuple step(const at::Tensor& x, const at::Tensor& target, const at::Tensor& h0,
                       const at::Tensor& c0, int64_t loss, bool per_step, double weight,
                       bool update, pybind11::handle groups, pybind11::handle clip,
                       bool builtin_gemm) {
    namespace py = pybind11;
    if (const int64_t code = cpu_update_plan_check(update_plan_, groups, clip))
      return py::make_tuple(py::none(), py::none(), py::none(), code);
    const checks::LstmDims d = checks::check_lstm_segment_common(
        kFn, x, target, h0, c0, params_, grads_, loss, per_step, weight, at::kCPU, 0);
    if (!validated_ || (update && !validated_update_) || workspace_moved() ||
        shares_memory(x) || shares_memory(target) || shares_memory(h0) || shares_memory(c0)) {
      checks::check_lstm_segment_cpu_args(x, target, h0, c0, params_, grads_, workspace_, loss,
                                          per_step, weight, update, w_bars_, lams_, s1s_, s2s_,
                                          steps_, hyper_, group_of_, optimizer_, clip_, at::kCPU,
                                          nullptr);
      if (!validated_ || (update && !validated_update_)) {
        validated_ = true;
        validated_update_ = validated_update_ || update;
        slots_.clear();
        const float* hp = hyper_.data_ptr<float>();
        for (int k = 0; k < 6; ++k)
          slots_.push_back({params_[k].data_ptr<float>(), grads_[k].data_ptr<float>(),
                            w_bars_[k].data_ptr<float>(), lams_[k].data_ptr<float>(),
                            s1s_[k].data_ptr<float>(),
                            optimizer_ == OPT_SGD ? nullptr : s2s_[k].data_ptr<float>(),
                            steps_[k].data_ptr<float>(), hp, params_[k].numel()});
      }
    }
    if (loss == cpu::LOSS_CE) checks::check_ce_classes(kFn, target, d.O);
    grow_workspace(workspace_, cpu::lstm_segment_workspace_floats(d.T, d.B, d.I, d.H, d.O,
                                                                  per_step ? 1 : 0));
    note_outputs();
    static const std::vector<cpu::UpdateSlot> kNoUpdate;
    const int64_t work = d.T * d.B * (d.I + d.H + d.O) * d.H;
    SegmentOut o = run_segment(x, target, h0, c0, params_, grads_, workspace_, d, loss, per_step,
                               weight, update ? slots_ : kNoUpdate, optimizer_, clip_,
                               builtin_gemm, work >= kReleaseGilMinWork);
    float* st = status_.data_ptr<float>();
    const int64_t count = update ? cpu::record_step_status(st, o.r) : int64_t(st[2]);
    // the loss as torch.tensor(loss, dtype=torch.float32) makes it (a cast, no range check)
    at::Tensor loss_t = at::empty({}, x.options());
    *loss_t.data_ptr<float>() = static_cast<float>(o.loss);
    return py::make_tuple(loss_t, o.h, o.c, count);
  }

 private:
  struct Range {
    uintptr_t begin, end;
  };
  static Range range_of(const at::Tensor& t) {
    const uintptr_t b = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    return {b, b + uintptr_t(t.numel() * int64_t(t.element_size()))};
  }

  // Whether `t` shares a byte with anything a call may write (as of the last note_outputs).
  // A linear scan: some 40 ranges. Any hit sends the call through the full check.
  bool shares_memory(const at::Tensor& t) const {
    const Range r = range_of(t);
    if (r.end <= r.begin) return false;
    for (const Range& o : outputs_)
      if (r.begin < o.end && o.begin < r.end) return true;
    return false;
  }

  bool workspace_moved() const {
    return workspace_.storage().data() != ws_data_ || workspace_.storage().nbytes() != ws_bytes_;
  }

  // The byte ranges a call may write: parameters, gradients, FPTT state and the workspace's
  // whole storage (it is resized in place: lstm_checks.h). Refreshed after every check.
  void note_outputs() {
    if (!outputs_.empty() && !workspace_moved()) return;
    outputs_.clear();
    for (int k = 0; k < 6; ++k)
      for (const at::Tensor* t : {&params_[k], &grads_[k], &w_bars_[k], &lams_[k], &s1s_[k],
                                  &steps_[k]})
        outputs_.push_back(range_of(*t));
    if (optimizer_ != OPT_SGD)
      for (const at::Tensor& t : s2s_) outputs_.push_back(range_of(t));
    const c10::Storage& st = workspace_.storage();
    ws_data_ = st.data();
    ws_bytes_ = st.nbytes();
    const uintptr_t b = reinterpret_cast<uintptr_t>(ws_data_);
    if (b) outputs_.push_back({b, b + uintptr_t(ws_bytes_)});
  }

  pybind11::object update_plan_;
  std::vector<at::Tensor> params_, grads_;
  at::Tensor workspace_;
  std::vector<at::Tensor> w_bars_, lams_, s1s_, s2s_, steps_;
  at::Tensor hyper_, status_;
  int64_t optimizer_;
  double clip_;
  std::vector<int64_t> group_of_;
  std::vector<cpu::UpdateSlot> slots_;
  std::vector<Range> outputs_;
  const void* ws_data_ = nullptr;
  size_t ws_bytes_ = 0;
  bool validated_ = false, validated_update_ = false;
};

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
  namespace py = pybind11;
  py::class_<CpuLstmPlan>(m, "CpuLstmPlan",
                          "FPTTLSTM.train_segment's plan on the cpu backend (csrc/bind_lstm.cpp): "
                          "the parameters, gradient buffers, workspace and FPTT state, held; "
                          "step() runs one segment")
      .def(py::init<py::object, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor,
                    std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor, int64_t, double,
                    at::Tensor>(),
           py::arg("update_plan"), py::arg("params"), py::arg("grads"), py::arg("workspace"),
           py::arg("w_bars"), py::arg("lams"), py::arg("s1s"), py::arg("s2s"), py::arg("steps"),
           py::arg("hyper"), py::arg("optimizer"), py::arg("clip"), py::arg("status"))
      .def("step", &CpuLstmPlan::step, py::arg("x"), py::arg("target"), py::arg("h0"),
           py::arg("c0"), py::arg("loss"), py::arg("per_step"), py::arg("weight"),
           py::arg("update"), py::arg("param_groups"), py::arg("clip"),
           py::arg("builtin_gemm") = false,
           "One segment (and, if update, the FPTT update): (loss, h, c, skipped count), or "
           "(None, None, None, PLAN_*) having done nothing")
      // copy.deepcopy and pickle give None (as CpuUpdatePlan's): FPTTLSTM rebuilds its plan
      .def("__reduce__", [](const CpuLstmPlan&) {
        return py::make_tuple(py::type::of(py::none()), py::tuple());
      });
}

}  // namespace fptt
