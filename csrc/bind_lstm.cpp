// Bindings of the LSTM segment step on the CPU: checks, then in one call the forward/loss/
// backward of csrc/cpu/lstm_segment.cpp and the fused FPTT update fptt::cpu::fused_update on
// the six gradients. Two forms: lstm_segment_step_cpu (the whole FpttState passed on every
// call) and CpuLstmPlan (FPTTLSTM's hot path: the state held, see below).
//
// GEMMs: at::mm / addmm on zero-copy views (torch's CPU BLAS, far faster than a
// hand-written OpenMP GEMM on these shapes) and MKL's packed products for the per-step
// weights where torch's BLAS is MKL (cpu_binding.h); builtin_gemm=True uses the torch-free
// gemm_builtin instead (a reference for the pointer arithmetic, and what a build without
// torch would use).
#include <torch/extension.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <cmath>
#include <initializer_list>
#include <tuple>
#include <vector>

#include "fptt_fast/cpu_binding.h"
#include "fptt_fast/cpu_kernels.h"
#include "fptt_fast/fptt_math.h"
#include "fptt_fast/lstm_segment.h"
#include "fptt_fast/registry.h"
#include "fptt_fast/lstm_checks.h"
#include "fptt_fast/seam_cast.h"
#include "fptt_fast/update_slots.h"

namespace fptt {

// CpuUpdatePlan's check (hyper-parameters included) of the FPTT optimiser's plan `plan`:
// 0, or the PLAN_* code. Defined in bind_update.cpp (no header: it is the only thing the
// two binding files share).
int64_t cpu_update_plan_check(pybind11::handle plan, pybind11::handle groups,
                              pybind11::handle clip);

namespace {

constexpr const char* kFn = "lstm_segment_step_cpu";  // checks' messages

// What one segment step returns to the bindings.
struct SegmentOut {
  double loss = 0.0;
  at::Tensor h, c;
  cpu::UpdateResult r{0.0, false};
};

// The segment step on checked arguments: forward/loss/backward into state.grads and, if
// `slots` is not empty, the fused update on them. The workspace holds at least the floats
// the segment needs. Shared by the list binding and the plan, so both run the same code.
SegmentOut run_segment(const SegmentIO& io, const FpttState& s, const at::Tensor& workspace,
                       const checks::LstmDims& d, const SegmentConfig& cfg,
                       const std::vector<cpu::UpdateSlot>& slots, bool release_gil) {
  SegmentOut out;
  out.h = at::empty({d.B, d.H}, io.x.options());
  out.c = at::empty({d.B, d.H}, io.x.options());

  cpu::LstmSegmentArgs a =
      checks::segment_args(io.x, io.h0, io.c0, io, s.params, s.grads, d, cfg);
  a.h_out = out.h.data_ptr<float>();
  a.c_out = out.c.data_ptr<float>();
  a.scratch = workspace.data_ptr<float>();

  auto run = [&] {
    at::NoGradGuard no_grad;
    const cpu::Gemm gemm = cpu_gemm(cfg.builtin_gemm);
    out.loss = cpu::lstm_segment_grads(a, gemm);
    if (!slots.empty())
      out.r = cpu::fused_update(slots.data(), int(slots.size()), int(s.optimizer),
                                float(s.clip));
  };
  if (release_gil) {
    pybind11::gil_scoped_release no_gil;
    run();
  } else {
    run();
  }
  return out;
}

// The list binding: the whole state on every call. Returns (unweighted loss, h, c); with
// config.update, the step's norm, whether it was skipped and the skipped-step count are in
// state.status, as the GPU launches write them. segment.h_out, c_out and losses are not
// used (new tensors are returned); a stacked layer's dx and h_seq are written in place.
std::tuple<double, at::Tensor, at::Tensor> lstm_segment_step_cpu(const FpttState& state,
                                                                 const SegmentIO& segment,
                                                                 const SegmentConfig& config,
                                                                 at::Tensor workspace) {
  // Every check (lstm_checks.h, shared with the CUDA glue's) before any data is touched: a
  // refused call changes nothing, not even the workspace's size.
  int64_t need = 0;
  const checks::LstmDims d =
      checks::check_lstm_segment_cpu_args(state, segment, config, workspace, at::kCPU, &need);
  // The only data-reading check, last: the kernel indexes the head's outputs with the classes.
  if (config.loss == cpu::LOSS_CE && config.head && !config.forward_only)
    checks::check_ce_classes(kFn, segment.target, d.O);
  grow_workspace(kFn, workspace, need);

  std::vector<cpu::UpdateSlot> slots;
  if (config.update) slots = update_slots(state);
  SegmentOut o = run_segment(segment, state, workspace, d, config, slots, /*release_gil=*/true);
  if (config.update) cpu::record_step_status(state.status.data_ptr<float>(), o.r);
  return {o.loss, o.h, o.c};
}

// ---- the plan: FPTTLSTM.train_segment's hot path on the cpu backend -----------------------
//
// FPTTLSTM._cpu_call (fptt_fast/lstm.py) used to rebuild seven lists of tensors, re-key the
// hyper table and record the status in Python on every segment: more than the segment
// itself costs at small sizes. A CpuLstmPlan holds the six parameters, the
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
  // state: the six parameters, their gradient buffers and the optimiser's FPTT state
  // (FPTT.kernel_state; group_of may be empty: all row 0); update_plan: the optimiser's
  // CpuUpdatePlan; fptt: the optimiser (train() only; None: no fast path); config: the loss,
  // per_step and builtin_gemm every call runs with.
  CpuLstmPlan(FpttState state, at::Tensor workspace, pybind11::object update_plan,
              pybind11::object fptt, SegmentConfig config, bool check_inputs)
      : update_plan_(std::move(update_plan)), fptt_(std::move(fptt)), cfg_(config),
        check_inputs_(check_inputs), st_(std::move(state)), workspace_(std::move(workspace)) {
    if (st_.group_of.empty()) st_.group_of.assign(st_.params.size(), 0);
    if (st_.sgd() && st_.exp_avg_sq.empty()) st_.exp_avg_sq = st_.exp_avg;  // never read
    FPTT_CHECK(st_.params.size() == 6 && st_.grads.size() == 6, kFn,
                ": the plan takes the six parameters and their six gradient buffers");
    FPTT_CHECK(st_.status.defined() && st_.status.device().is_cpu() &&
                    st_.status.scalar_type() == at::kFloat && st_.status.is_contiguous() &&
                    st_.status.numel() == 3,
                kFn, ": state.status must be a contiguous CPU float32 tensor of 3 elements");
    FPTT_CHECK(cfg_.loss == cpu::LOSS_MSE || cfg_.loss == cpu::LOSS_CE, kFn,
                ": config.loss must be 0 (mse) or 1 (ce)");
    FPTT_CHECK(cfg_.head && !cfg_.forward_only, kFn,
                ": the plan runs one-layer segments (config.head true, forward_only false); "
                "a stack's layers go through lstm_segment_step_cpu");
  }

  // Returns (loss, h, c, skipped-step count), or (None, None, None, code < 0) with nothing
  // done when the optimiser's plan says its groups, hyper-parameters or tensors changed.
  pybind11::tuple step(const at::Tensor& x, const at::Tensor& target, const at::Tensor& h0,
                       const at::Tensor& c0, double weight, bool update, pybind11::handle groups,
                       pybind11::handle clip) {
    namespace py = pybind11;
    if (const int64_t code = cpu_update_plan_check(update_plan_, groups, clip))
      return py::make_tuple(py::none(), py::none(), py::none(), code);
    SegmentConfig cfg = cfg_;
    cfg.weight = weight;
    cfg.update = update;
    const SegmentIO io{x, target, h0, c0, {}, {}, {}};
    const checks::LstmDims d =
        checks::check_lstm_segment_common(kFn, io, st_.params, st_.grads, cfg, at::kCPU, 0);
    if (!validated_ || (update && !validated_update_) || workspace_moved() ||
        shares_memory(x) || shares_memory(target) || shares_memory(h0) || shares_memory(c0)) {
      checks::check_lstm_segment_cpu_args(st_, io, cfg, workspace_, at::kCPU, nullptr);
      if (!validated_ || (update && !validated_update_)) {
        validated_ = true;
        validated_update_ = validated_update_ || update;
        slots_ = update_slots(st_);
      }
    }
    if (cfg.loss == cpu::LOSS_CE) checks::check_ce_classes(kFn, target, d.O);
    grow_workspace(kFn, workspace_, cpu::lstm_segment_workspace_floats(d.T, d.B, d.I, d.H, d.O,
                                                                  cfg.per_step ? 1 : 0));
    note_outputs();
    dims_ = d;
    validated_prints_ = true;
    for (int k = 0; k < 6; ++k) grad_prints_[k] = grad_print(st_.grads[k]);
    at::Tensor loss_t;
    SegmentOut o;
    const int64_t count = run(x, target, h0, c0, d, cfg, &loss_t, &o);
    return py::make_tuple(loss_t, o.h, o.c, count);
  }

  // FPTTLSTM.train_segment's fast path (fptt_fast/lstm.py): train_segment(x, target, state,
  // weight) of the module whose optimiser is `fptt` (the FPTT object given at construction)
  // with the loss, per_step, check_inputs and builtin_gemm given there, in this one call.
  // It takes the common case only and vouches for it itself; on anything else it returns
  // None having done nothing, and Python runs its own checks and the step above (which
  // raise today's errors, or take the case):
  //   - the optimiser's plan must be the one this plan holds (not retired), its groups,
  //     hyper-parameters, clip and tensors as validated (the CpuUpdatePlan's check);
  //   - this plan validated once with an update (step() ran), the gradient buffers and the
  //     workspace's storage as then;
  //   - x, target and the state (None, or a tuple/list of two tensors) exact torch.Tensors,
  //     contiguous, strided, without conj/neg bits, on the CPU, of the dtypes and shapes
  //     the module's checks require (ce targets int64: other integer dtypes are converted
  //     by Python), sharing no memory with what the call writes; weight a Python float or
  //     int (not bool), finite; the workspace large enough;
  //   - with check_inputs: x, target and the state finite (mse), the ce classes in range.
  //     Without: the ce classes in range all the same (the kernel indexes with them).
  // Returns (loss, (h, c)) as train_segment does; a step whose gradient was not finite is
  // reported through fptt.report_skipped, as _cpu_call does.
  py::object train(py::handle x_obj, py::handle target_obj, py::handle state_obj,
                   py::handle weight_obj) {
    if (!validated_update_ || !validated_prints_ || fptt_.is_none()) return py::none();
    const Names& nm = names();
    PyObject* opt = fptt_.ptr();
    py::object groups = py::reinterpret_steal<py::object>(PyObject_GetAttr(opt, nm.groups));
    if (!groups) throw py::error_already_set();
    py::object clip = py::reinterpret_steal<py::object>(PyObject_GetAttr(opt, nm.clip));
    if (!clip) throw py::error_already_set();
    // PLAN_STALE too when the optimiser has dropped the plan this one holds (retire())
    if (cpu_update_plan_check(update_plan_, groups, clip)) return py::none();

    // the inputs, as the module's checks would pass them unchanged
    const checks::LstmDims& v = dims_;
    if (!THPVariable_CheckExact(x_obj.ptr()) || !THPVariable_CheckExact(target_obj.ptr()))
      return py::none();
    const at::Tensor& x = THPVariable_Unpack(x_obj.ptr());
    const at::Tensor& target = THPVariable_Unpack(target_obj.ptr());
    if (!plain(x, at::kFloat) || x.dim() != 3 || x.size(2) != v.I || x.size(0) < 1 ||
        x.size(1) < 1)
      return py::none();
    const int64_t T = x.size(0), B = x.size(1);
    if (cfg_.loss == cpu::LOSS_MSE) {
      if (!plain(target, at::kFloat)) return py::none();
      if (cfg_.per_step ? !has_sizes(target, {T, B, v.O}) : !has_sizes(target, {B, v.O}))
        return py::none();
    } else {
      if (!plain(target, at::kLong)) return py::none();
      if (cfg_.per_step ? !has_sizes(target, {T, B}) : !has_sizes(target, {B})) return py::none();
    }
    const at::Tensor* h0 = nullptr;
    const at::Tensor* c0 = nullptr;
    if (state_obj.is_none()) {
      if (zeros_.numel() < B * v.H) zeros_ = at::zeros({B * v.H}, x.options());
    } else {
      PyObject* st = state_obj.ptr();
      if (!(PyTuple_CheckExact(st) || PyList_CheckExact(st)) || PySequence_Fast_GET_SIZE(st) != 2)
        return py::none();
      PyObject* ho = PySequence_Fast_GET_ITEM(st, 0);
      PyObject* co = PySequence_Fast_GET_ITEM(st, 1);
      if (!THPVariable_CheckExact(ho) || !THPVariable_CheckExact(co)) return py::none();
      h0 = &THPVariable_Unpack(ho);
      c0 = &THPVariable_Unpack(co);
      if (!plain(*h0, at::kFloat) || !plain(*c0, at::kFloat) || !has_sizes(*h0, {B, v.H}) ||
          !has_sizes(*c0, {B, v.H}))
        return py::none();
    }
    double weight = 0.0;
    PyObject* w = weight_obj.ptr();
    if (PyFloat_CheckExact(w)) {
      weight = PyFloat_AS_DOUBLE(w);
    } else if (PyLong_CheckExact(w)) {
      weight = PyLong_AsDouble(w);
      if (weight == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return py::none();
      }
    } else {
      return py::none();
    }
    if (!std::isfinite(weight) || weight < 0.0) return py::none();  // Python's checks raise

    // what the call writes must be as validated; the inputs must not overlap it
    for (int k = 0; k < 6; ++k)
      if (grad_print(st_.grads[k]) != grad_prints_[k]) return py::none();
    if (workspace_moved() || outputs_.empty()) return py::none();
    if (workspace_.numel() < cpu::lstm_segment_workspace_floats(T, B, v.I, v.H, v.O,
                                                                cfg_.per_step ? 1 : 0))
      return py::none();
    if (shares_memory(x) || shares_memory(target) || (h0 && shares_memory(*h0)) ||
        (c0 && shares_memory(*c0)))
      return py::none();

    // the data checks: Python's (check_inputs) or, without them, the kernel's own need
    if (check_inputs_) {
      if (!all_finite(x) || (cfg_.loss == cpu::LOSS_MSE && !all_finite(target)) ||
          (h0 && (!all_finite(*h0) || !all_finite(*c0))))
        return py::none();
    }
    if (cfg_.loss == cpu::LOSS_CE) {
      const int64_t* cls = target.const_data_ptr<int64_t>();
      for (int64_t i = 0, n = target.numel(); i < n; ++i)
        if (cls[i] < 0 || cls[i] >= v.O) return py::none();
    }

    at::Tensor zh, zc;
    if (!h0) {  // zero views of the plan's own zeros: only read (the kernel copies them)
      zh = zeros_.narrow(0, 0, B * v.H).view({B, v.H});
      h0 = c0 = &zh;
    }
    const checks::LstmDims d{T, B, v.I, v.H, v.O};
    at::Tensor loss_t;
    SegmentOut o;
    const int64_t before = int64_t(st_.status.data_ptr<float>()[2]);
    SegmentConfig cfg = cfg_;
    cfg.weight = weight;
    cfg.update = true;
    const int64_t count = run(x, target, *h0, *c0, d, cfg, &loss_t, &o);
    // a skipped step (the count grew) is reported as FPTT.step reports one: report_skipped
    // raises for nonfinite="raise"
    if (count != before) fptt_.attr("report_skipped")(count);
    return py::make_tuple(loss_t, py::make_tuple(o.h, o.c));
  }

 private:
  struct Range {
    uintptr_t begin, end;
  };

  // Attribute names train() reads from the optimiser, made once (GIL held).
  struct Names {
    PyObject *groups, *clip;
  };
  static const Names& names() {
    static const Names n{PyUnicode_InternFromString("param_groups"),
                         PyUnicode_InternFromString("clip")};
    return n;
  }

  // The segment on checked arguments, and the status: the skipped-step count after it.
  int64_t run(const at::Tensor& x, const at::Tensor& target, const at::Tensor& h0,
              const at::Tensor& c0, const checks::LstmDims& d, const SegmentConfig& cfg,
              at::Tensor* loss_t, SegmentOut* o) {
    static const std::vector<cpu::UpdateSlot> kNoUpdate;
    const int64_t work = d.T * d.B * (d.I + d.H + d.O) * d.H;
    const SegmentIO io{x, target, h0, c0, {}, {}, {}};
    *o = run_segment(io, st_, workspace_, d, cfg, cfg.update ? slots_ : kNoUpdate,
                     work >= kReleaseGilMinWork);
    float* st = st_.status.data_ptr<float>();
    const int64_t count = cfg.update ? cpu::record_step_status(st, o->r) : int64_t(st[2]);
    // the loss as torch.tensor(loss, dtype=torch.float32) makes it (a cast, no range check)
    *loss_t = at::empty({}, x.options());
    *loss_t->data_ptr<float>() = static_cast<float>(o->loss);
    return count;
  }

  // A tensor the fast path takes as is: strided, contiguous, with storage, on the CPU, of
  // `dtype`, no conj/neg bits (what the module's checks and .contiguous() leave unchanged).
  static bool plain(const at::Tensor& t, at::ScalarType dtype) {
    return t.defined() && t.layout() == at::kStrided && !t.is_nested() &&
           t.scalar_type() == dtype && t.device().is_cpu() && t.has_storage() &&
           t.is_contiguous() && !t.is_neg() && !t.is_conj();
  }
  static bool has_sizes(const at::Tensor& t, std::initializer_list<int64_t> s) {
    return t.sizes().equals(c10::IntArrayRef(s));
  }
  static bool all_finite(const at::Tensor& t) {
    const float* p = t.const_data_ptr<float>();
    bool ok = true;
    for (int64_t i = 0, n = t.numel(); i < n; ++i) ok &= std::isfinite(p[i]);
    return ok;
  }

  // What the fast path compares of a gradient buffer (written by the call).
  struct GradPrint {
    const void* data = nullptr;
    int64_t numel = -1;
    bool ok = false;
    bool operator!=(const GradPrint& g) const {
      return data != g.data || numel != g.numel || ok != g.ok;
    }
  };
  static GradPrint grad_print(const at::Tensor& g) {
    GradPrint p;
    p.ok = plain(g, at::kFloat);
    if (p.ok) {
      p.data = g.const_data_ptr();
      p.numel = g.numel();
    }
    return p;
  }
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
      for (const at::Tensor* t : {&st_.params[k], &st_.grads[k], &st_.w_bar[k], &st_.lam[k],
                                  &st_.exp_avg[k], &st_.step[k]})
        outputs_.push_back(range_of(*t));
    if (!st_.sgd())
      for (const at::Tensor& t : st_.exp_avg_sq) outputs_.push_back(range_of(t));
    outputs_.push_back(range_of(st_.status));  // written with update (the list binding's check)
    const c10::Storage& st = workspace_.storage();
    ws_data_ = st.data();
    ws_bytes_ = st.nbytes();
    const uintptr_t b = reinterpret_cast<uintptr_t>(ws_data_);
    if (b) outputs_.push_back({b, b + uintptr_t(ws_bytes_)});
  }

  pybind11::object update_plan_;
  pybind11::object fptt_;  // the FPTT optimiser (train() only; None: no fast path)
  SegmentConfig cfg_;      // loss, per_step, builtin_gemm (weight and update per call)
  bool check_inputs_;
  checks::LstmDims dims_{0, 0, 0, 0, 0};  // I, H, O as validated
  bool validated_prints_ = false;
  GradPrint grad_prints_[6];
  at::Tensor zeros_;  // the zero state of train(state=None), grown on demand, never written
  FpttState st_;
  at::Tensor workspace_;
  std::vector<cpu::UpdateSlot> slots_;
  std::vector<Range> outputs_;
  const void* ws_data_ = nullptr;
  size_t ws_bytes_ = 0;
  bool validated_ = false, validated_update_ = false;
};

}  // namespace

void register_lstm_cpu(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("lstm_segment_step_cpu", &lstm_segment_step_cpu,
        "One FPTT LSTM segment step on CPU tensors: forward over the segment, head and loss, "
        "backward, gradients (written to state.grads) and, if config.update, the fused FPTT "
        "update (its norm and skip recorded in state.status). Returns (unweighted loss, h, c). "
        "A layer of a stack: config.head False (dh_seq in, dx out), forward_only (h_seq out).",
        py::arg("state"), py::arg("segment"), py::arg("config"), py::arg("workspace"));
  py::class_<CpuLstmPlan>(m, "CpuLstmPlan",
                          "FPTTLSTM.train_segment's plan on the cpu backend (csrc/bind_lstm.cpp): "
                          "the parameters, gradient buffers, workspace and FPTT state, held; "
                          "step() runs one segment")
      .def(py::init<FpttState, at::Tensor, py::object, py::object, SegmentConfig, bool>(),
           py::arg("state"), py::arg("workspace"), py::arg("update_plan"),
           py::arg("fptt"), py::arg("config"), py::arg("check_inputs") = true)
      .def("step", &CpuLstmPlan::step, py::arg("x"), py::arg("target"), py::arg("h0"),
           py::arg("c0"), py::arg("weight"), py::arg("update"), py::arg("param_groups"),
           py::arg("clip"),
           "One segment (and, if update, the FPTT update): (loss, h, c, skipped count), or "
           "(None, None, None, PLAN_*) having done nothing")
      .def("train", &CpuLstmPlan::train, py::arg("x"), py::arg("target"), py::arg("state"),
           py::arg("weight"),
           "FPTTLSTM.train_segment's fast path: (loss, (h, c)), or None having done nothing "
           "(Python's checks and step() then take the call)")
      // copy.deepcopy and pickle give None (as CpuUpdatePlan's): FPTTLSTM rebuilds its plan
      .def("__reduce__", [](const CpuLstmPlan&) {
        return py::make_tuple(py::type::of(py::none()), py::tuple());
      });
}

}  // namespace fptt
