// Bindings of the fused FPTT update on the CPU, in two forms:
//
//   fused_update_cpu(state)     the whole FpttState passed on every call: the checks of
//       update_checks.h (shared with the CUDA glue), then the OpenMP kernel.
//   CpuUpdatePlan               FPTT.step()'s hot path (cpu backend, fptt_fast/optim.py),
//       built once, each step re-checks only what can have changed (pointers, metadata,
//       hyper-parameters), and hands back a PlanCode instead of touching any data when it
//       cannot vouch for the step (PLAN_STALE, PLAN_HYPER, PLAN_FALLBACK).
// Design: docs/KERNELS.md#csrcbind_updatecpp
#include <torch/extension.h>

#include <cstring>
#include <vector>

#include "fptt_fast/cpu_kernels.h"
#include "fptt_fast/fptt_math.h"
#include "fptt_fast/registry.h"
#include "fptt_fast/seam_cast.h"
#include "fptt_fast/update_checks.h"
#include "fptt_fast/update_slots.h"

namespace fptt {

namespace py = pybind11;

// What CpuUpdatePlan::step returns instead of a skipped-step count (>= 0) when it did not
// step; exported to Python as _C.PLAN_STALE, _C.PLAN_HYPER, _C.PLAN_FALLBACK.
enum PlanCode : int64_t { PLAN_STALE = -1, PLAN_HYPER = -2, PLAN_FALLBACK = -3 };

namespace {

constexpr const char* kFn = "fused_update_cpu";  // checks' messages, as the list binding's

// Below this many elements the kernel runs with the GIL held: handing the GIL over and
// taking it back costs more than such a step, and up to the interpreter's switch interval
// (5 ms) when another Python thread wants it.
constexpr int64_t kReleaseGilMin = 1 << 16;

std::tuple<double, bool> fused_update_cpu(const FpttState& state) {
  // Every check (update_checks.h) before any data pointer is taken: a refused call
  // changes nothing. state.status is not used (the result is returned).
  checks::check_fused_update_args(kFn, state, /*with_status=*/false, at::kCPU);
  const std::vector<UpdateSlot> slots = update_slots(state);
  cpu::UpdateResult r;
  {
    pybind11::gil_scoped_release no_gil;
    r = cpu::fused_update(slots.data(), int(slots.size()), int(state.optimizer),
                          float(state.clip));
  }
  return {r.norm, r.skipped};
}

// ---- what a plan compares on each step -------------------------------------------------

// Everything update_checks.h's check_tensor and the alias check read of a tensor, so that
// equal prints mean the checks that passed on the first still pass on the second.
struct Print {
  const void* data = nullptr;
  int64_t numel = -1;
  at::ScalarType dtype = at::ScalarType::Undefined;
  c10::Device device = c10::Device(c10::kCPU);
  uint8_t flags = 0;  // bit 0 defined, 1 dense strided, 2 storage, 3 contiguous, 4 neg, 5 conj
  bool operator==(const Print& o) const {
    return data == o.data && numel == o.numel && dtype == o.dtype && device == o.device &&
           flags == o.flags;
  }
  bool operator!=(const Print& o) const { return !(*this == o); }
};

Print print_of(const at::Tensor& t) {
  Print p;
  if (!t.defined()) return p;
  const bool dense = t.layout() == at::kStrided && !t.is_nested();
  const bool storage = dense && t.has_storage();
  p.data = storage ? t.const_data_ptr() : nullptr;
  p.numel = t.numel();
  p.dtype = t.scalar_type();
  p.device = t.device();
  p.flags = uint8_t(1 | (dense << 1) | (storage << 2) | ((dense && t.is_contiguous()) << 3) |
                    (t.is_neg() << 4) | (t.is_conj() << 5));
  return p;
}

// Dict keys, made once (always used with the GIL held).
struct Keys {
  PyObject* params;
  PyObject* betas;
  PyObject* row[H_COUNT];  // the key of each scalar row of the table (betas: null)
};

const Keys& keys() {
  static const Keys k = [] {
    Keys k{};
    k.params = PyUnicode_InternFromString("params");
    k.betas = PyUnicode_InternFromString("betas");
    for (int i = 0; i < H_COUNT; ++i)
      k.row[i] = (i == H_BETA1 || i == H_BETA2) ? nullptr
                                                : PyUnicode_InternFromString(kHyperNames[i]);
    return k;
  }();
  return k;
}

// A number as float() reads it (floats, ints, bools, one-element tensors...). false, with
// the Python error cleared, where float() would raise: the caller reports "changed" and
// Python's validation raises the error in the user's terms.
bool as_double(PyObject* v, double* out) {
  if (PyFloat_CheckExact(v)) {
    *out = PyFloat_AS_DOUBLE(v);
    return true;
  }
  const double d = PyFloat_AsDouble(v);
  if (d == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  *out = d;
  return true;
}

// One group's table row as fptt_fast/optim.py's _hyper_row builds it, in doubles.
bool read_hyper(PyObject* group, double out[H_COUNT]) {
  const Keys& k = keys();
  for (int i = 0; i < H_COUNT; ++i) {
    if (i == H_BETA1 || i == H_BETA2) {
      PyObject* betas = PyDict_GetItemWithError(group, k.betas);  // borrowed
      PyObject* b = betas ? PySequence_GetItem(betas, i - H_BETA1) : nullptr;  // new
      const bool ok = b && as_double(b, &out[i]);
      Py_XDECREF(b);
      if (!ok) {
        PyErr_Clear();
        return false;
      }
      continue;
    }
    PyObject* v = PyDict_GetItemWithError(group, k.row[i]);  // borrowed
    if (!v) {
      PyErr_Clear();
      return false;
    }
    if (i == H_NESTEROV || i == H_DECOUPLED) {  // float(bool(group[name]))
      const int t = PyObject_IsTrue(v);
      if (t < 0) {
        PyErr_Clear();
        return false;
      }
      out[i] = t ? 1.0 : 0.0;
    } else if (!as_double(v, &out[i])) {
      return false;
    }
  }
  return true;
}

// clip as optim.py passes it to the kernels: float(clip or 0.0).
bool read_clip(PyObject* clip, double* out) {
  if (clip == Py_None) {
    *out = 0.0;
    return true;
  }
  return as_double(clip, out);
}

bool same_bits(const double* a, const double* b, size_t n) {
  return std::memcmp(a, b, n * sizeof(double)) == 0;
}

}  // namespace

// ---- the plan ------------------------------------------------------------------------------

class CpuUpdatePlan {
 public:
  // groups: the optimiser's param_groups (dicts with "params" and the hyper-parameters, already
  // validated by the caller); state: the FPTT state of every parameter in the groups' order
  // (its params, grads and group_of lists are not read: the plan takes the parameters and
  // their groups from `groups`, the gradients from the parameters at each step), the
  // [groups, H_COUNT] table the caller filled from those groups (kept; the caller refreshes
  // it in place), optimizer, clip and status.
  CpuUpdatePlan(py::list groups, FpttState state) : st_(std::move(state)) {
    st_.params.clear();
    st_.group_of.clear();
    const Keys& k = keys();
    for (py::handle g : groups) {
      FPTT_CHECK(PyDict_Check(g.ptr()), "CpuUpdatePlan: param_groups must hold dicts");
      PyObject* plist = PyDict_GetItemWithError(g.ptr(), k.params);
      if (!plist && PyErr_Occurred()) throw py::error_already_set();
      FPTT_CHECK(plist && PyList_Check(plist),
                  "CpuUpdatePlan: every param group's 'params' must be a list");
      Group grp;
      grp.dict = py::reinterpret_borrow<py::object>(g);
      grp.params = py::reinterpret_borrow<py::object>(plist);
      grp.first = st_.params.size();
      for (Py_ssize_t j = 0; j < PyList_GET_SIZE(plist); ++j) {
        py::handle p(PyList_GET_ITEM(plist, j));
        st_.params.push_back(py::cast<at::Tensor>(p));
        param_objs_.push_back(py::reinterpret_borrow<py::object>(p));
        st_.group_of.push_back(int64_t(groups_.size()));
      }
      grp.end = st_.params.size();
      FPTT_CHECK(read_hyper(g.ptr(), grp.hyper),
                  "CpuUpdatePlan: a param group's hyper-parameters are not all numbers");
      groups_.push_back(std::move(grp));
    }
    const size_t n = st_.params.size();
    const bool sgd = st_.sgd();
    if (sgd && st_.exp_avg_sq.empty()) st_.exp_avg_sq = st_.exp_avg;  // never read for SGD
    // The plan is built from the optimiser's own tensors, so these only fail on a bug or a
    // state changed behind the optimiser's back; they use the shared checks all the same.
    // The gradients are not known yet (they come and go between steps): the list checks run
    // with the parameters standing in for them, which pass exactly when the parameters do
    // (params[i] is checked first); each step's real gradients are checked in full, with
    // everything else, whenever they change (revalidate).
    st_.grads = st_.params;
    checks::check_update_lists_on(kFn, st_, at::kCPU, nullptr);
    st_.grads.clear();
    FPTT_CHECK(st_.hyper.size(0) == int64_t(groups_.size()), kFn, ": state.hyper has ",
                st_.hyper.size(0), " rows, the optimiser ", groups_.size(), " param groups");
    checks::check_clip(kFn, st_.clip);
    const c10::Device dev = n ? st_.params[0].device() : st_.hyper.device();
    checks::check_status(kFn, st_.status, at::kCPU, dev);
    // Outputs overlapping anything: the ranges of check_fused_update_args without the
    // gradients (those are checked with the rest whenever they change).
    checks::AliasCheck ac(6 * n + 2);
    for (size_t i = 0; i < n; ++i) {
      const int64_t j = int64_t(i);
      ac.add(st_.params[i], {"state.params", j}, true);
      ac.add(st_.w_bar[i], {"state.w_bar", j}, true);
      ac.add(st_.lam[i], {"state.lam", j}, true);
      ac.add(st_.exp_avg[i], {"state.exp_avg", j}, true);
      if (!sgd) ac.add(st_.exp_avg_sq[i], {"state.exp_avg_sq", j}, true);
      ac.add(st_.step[i], {"state.step", j}, true);
    }
    ac.add(st_.hyper, {"state.hyper"}, false);
    ac.add(st_.status, {"state.status"}, true);
    ac.check(kFn);
    // The facts the step relies on, as they were when these checks passed.
    param_prints_.resize(n);
    state_ptrs_.resize(n);
    for (size_t i = 0; i < n; ++i) {
      param_prints_[i] = print_of(st_.params[i]);
      state_ptrs_[i] = state_ptrs(i);
    }
    hyper_ptr_ = st_.hyper.const_data_ptr();
    status_ptr_ = st_.status.const_data_ptr();
    grad_prints_.assign(n, Print());
    cur_prints_.assign(n, Print());
    validated_ = false;
  }

  // 0 when the groups, hyper-parameters (if `hyper`), clip and every parameter and state
  // tensor are as validated; else the PlanCode saying what Python must do. Reads no data.
  int64_t check_current(py::handle groups, py::handle clip, bool hyper) const {
    if (retired_) return PLAN_STALE;  // its optimiser holds another plan now
    if (!same_structure(groups.ptr())) return PLAN_STALE;
    double c = 0.0;
    if (!read_clip(clip.ptr(), &c) || !same_bits(&c, &st_.clip, 1)) return PLAN_STALE;
    if (st_.hyper.const_data_ptr() != hyper_ptr_ || st_.status.const_data_ptr() != status_ptr_)
      return PLAN_STALE;
    for (size_t i = 0; i < st_.params.size(); ++i)
      if (print_of(st_.params[i]) != param_prints_[i] || state_ptrs(i) != state_ptrs_[i])
        return PLAN_STALE;
    return hyper ? check_hyper(groups.ptr()) : 0;
  }

  // The same group dicts, each with the same "params" list holding the same parameter
  // objects, in the same order (identities: the plan holds references to all of them).
  bool same_structure(PyObject* gl) const {
    if (!PyList_Check(gl) || PyList_GET_SIZE(gl) != Py_ssize_t(groups_.size())) return false;
    const Keys& k = keys();
    for (size_t gi = 0; gi < groups_.size(); ++gi) {
      const Group& g = groups_[gi];
      PyObject* d = PyList_GET_ITEM(gl, Py_ssize_t(gi));
      if (d != g.dict.ptr()) return false;
      PyObject* plist = PyDict_GetItemWithError(d, k.params);
      if (plist != g.params.ptr()) {
        PyErr_Clear();
        return false;
      }
      if (PyList_GET_SIZE(plist) != Py_ssize_t(g.end - g.first)) return false;
      for (size_t j = g.first; j < g.end; ++j)
        if (PyList_GET_ITEM(plist, Py_ssize_t(j - g.first)) != param_objs_[j].ptr()) return false;
    }
    return true;
  }

  // PLAN_HYPER when any group's hyper-parameters differ (bitwise) from those last accepted.
  int64_t check_hyper(PyObject* groups) const {
    double row[H_COUNT];
    for (size_t gi = 0; gi < groups_.size(); ++gi) {
      if (!read_hyper(PyList_GET_ITEM(groups, Py_ssize_t(gi)), row) ||
          !same_bits(row, groups_[gi].hyper, H_COUNT))
        return PLAN_HYPER;
    }
    return 0;
  }

  // After Python validated the groups' hyper-parameters and refreshed the table in place.
  // The optimiser dropped this plan (FPTT._drop_plan): every later check says PLAN_STALE,
  // so a CpuLstmPlan built on it rebuilds instead of reading the optimiser's attributes.
  void retire() { retired_ = true; }

  void accept_hyper(py::handle groups) {
    FPTT_CHECK(same_structure(groups.ptr()),
                "CpuUpdatePlan.accept_hyper: the groups are not those of this plan");
    for (size_t gi = 0; gi < groups_.size(); ++gi)
      FPTT_CHECK(read_hyper(PyList_GET_ITEM(groups.ptr(), Py_ssize_t(gi)), groups_[gi].hyper),
                  "CpuUpdatePlan.accept_hyper: param_groups[", gi,
                  "] has a hyper-parameter that is not a number");
  }

  // docs/ALGORITHM.md steps 2-6 for every parameter with a gradient. Returns the skipped-step count
  // (status[2]) after the step, or a PlanCode (< 0) with nothing changed.
  int64_t step(py::handle groups, py::handle clip) {
    if (const int64_t code = check_current(groups, clip, false)) return code;
    const size_t n = st_.params.size();
    bool same = validated_;
    size_t active = 0;
    for (size_t i = 0; i < n; ++i) {
      // the TensorImpl's grad: what p.grad reads, without Tensor::grad()'s non-leaf warning
      const at::Tensor& g = st_.params[i].unsafeGetTensorImpl()->grad();
      if (g.defined()) {
        const at::Tensor& p = st_.params[i];
        // What the list path raises on (ValueError) or copies (non-contiguous): its job.
        if (g.layout() != at::kStrided || g.is_nested() || g.scalar_type() != p.scalar_type() ||
            g.device() != p.device() || g.sizes() != p.sizes() || !g.is_contiguous())
          return PLAN_FALLBACK;
        ++active;
      }
      cur_prints_[i] = print_of(g);
      same = same && cur_prints_[i] == grad_prints_[i];
    }
    float* status = st_.status.data_ptr<float>();
    if (active == 0) return int64_t(status[2]);  // as the list path: nothing, not even checks
    if (const int64_t code = check_hyper(groups.ptr())) return code;
    if (!same) revalidate();
    int64_t elements = 0;
    for (const auto& s : slots_) elements += s.n;
    cpu::UpdateResult r;
    if (elements >= kReleaseGilMin) {
      // Another thread may drop a gradient or rebind a parameter's data while the GIL is
      // released: the kernel's memory stays alive through these references.
      std::vector<c10::Storage> keep;
      keep.reserve(2 * slots_.size());
      for (size_t i = 0; i < n; ++i) {
        const at::Tensor& g = st_.params[i].unsafeGetTensorImpl()->grad();
        if (!g.defined()) continue;
        keep.push_back(g.storage());
        keep.push_back(st_.params[i].storage());
      }
      py::gil_scoped_release no_gil;
      r = cpu::fused_update(slots_.data(), int(slots_.size()), int(st_.optimizer), float(st_.clip));
    } else {
      r = cpu::fused_update(slots_.data(), int(slots_.size()), int(st_.optimizer), float(st_.clip));
    }
    return cpu::record_step_status(status, r);
  }

  int64_t size() const { return int64_t(st_.params.size()); }

 private:
  struct Group {
    py::object dict, params;  // held: their identities are compared on every step
    size_t first = 0, end = 0;
    double hyper[H_COUNT] = {};
  };
  struct StatePtrs {
    const void* p[5];
    bool operator!=(const StatePtrs& o) const { return std::memcmp(p, o.p, sizeof(p)) != 0; }
  };

  StatePtrs state_ptrs(size_t i) const {
    return {{st_.w_bar[i].const_data_ptr(), st_.lam[i].const_data_ptr(),
             st_.exp_avg[i].const_data_ptr(), st_.exp_avg_sq[i].const_data_ptr(),
             st_.step[i].const_data_ptr()}};
  }

  // The step's gradients differ from those last checked: the full checks of the list
  // binding on this step's lists (they raise, naming the argument, before any data is
  // touched), then the slot table.
  void revalidate() {
    validated_ = false;
    std::vector<size_t> keep;
    std::vector<at::Tensor> grads;
    for (size_t i = 0; i < st_.params.size(); ++i) {
      const at::Tensor& gi = st_.params[i].unsafeGetTensorImpl()->grad();
      if (!gi.defined()) continue;
      keep.push_back(i);
      grads.push_back(gi);
    }
    FpttState sub = st_.subset(keep);
    sub.grads = std::move(grads);
    checks::check_fused_update_args(kFn, sub, /*with_status=*/true, at::kCPU);
    slots_ = update_slots(sub);
    grad_prints_ = cur_prints_;
    validated_ = true;
  }

  FpttState st_;  // grads empty: each step's are the parameters' .grad
  std::vector<Group> groups_;
  std::vector<py::object> param_objs_;  // held, so that an identity is never reused
  std::vector<Print> param_prints_, grad_prints_, cur_prints_;
  std::vector<StatePtrs> state_ptrs_;
  const void* hyper_ptr_ = nullptr;
  const void* status_ptr_ = nullptr;
  std::vector<cpu::UpdateSlot> slots_;
  bool validated_ = false;
  bool retired_ = false;
};

// For the LSTM plan (csrc/bind_lstm.cpp declares it: the two files share no header for this,
// and it is the only thing they share): check_current of the FPTT optimiser's plan, hyper-
// parameters included. 0: the optimiser's tensors, hyper table and clip are those the LSTM
// plan was built with.
int64_t cpu_update_plan_check(py::handle plan, py::handle groups, py::handle clip) {
  return plan.cast<const CpuUpdatePlan&>().check_current(groups, clip, /*hyper=*/true);
}

void register_update_cpu(pybind11::module_& m) {
  m.def("fused_update_cpu", &fused_update_cpu,
        "docs/ALGORITHM.md steps 2-6 over an FpttState of CPU fp32 tensors (fptt_fast/seam.py; "
        "its status is not used); returns (norm, skipped)",
        py::arg("state"));
  m.attr("PLAN_STALE") = py::int_(int64_t(PLAN_STALE));
  m.attr("PLAN_HYPER") = py::int_(int64_t(PLAN_HYPER));
  m.attr("PLAN_FALLBACK") = py::int_(int64_t(PLAN_FALLBACK));
  py::class_<CpuUpdatePlan>(m, "CpuUpdatePlan",
                            "FPTT.step()'s plan on the cpu backend (csrc/bind_update.cpp): the "
                            "optimiser's tensors and tables, checked once; step() re-checks what "
                            "can change and runs the fused update")
      .def(py::init<py::list, FpttState>(), py::arg("param_groups"), py::arg("state"))
      .def("step", &CpuUpdatePlan::step, py::arg("param_groups"), py::arg("clip"),
           "One fused step of every parameter with a gradient; returns the skipped-step count, "
           "or PLAN_STALE / PLAN_HYPER / PLAN_FALLBACK (< 0) having changed nothing")
      .def("check", [](const CpuUpdatePlan& p, py::handle groups, py::handle clip) {
             return p.check_current(groups, clip, true);
           }, py::arg("param_groups"), py::arg("clip"),
           "0 if the plan is current for these groups and clip, else a PLAN_* code")
      .def("accept_hyper", &CpuUpdatePlan::accept_hyper, py::arg("param_groups"),
           "Take the groups' current hyper-parameters as validated (the table was refreshed)")
      .def("retire", &CpuUpdatePlan::retire,
           "The optimiser replaced this plan: every later step() or check says PLAN_STALE")
      .def("__len__", &CpuUpdatePlan::size)
      // copy.deepcopy and pickle give None: a plan holds raw pointers into its owner's
      // tensors, so a copy must build its own (the owner rebuilds a missing plan).
      .def("__reduce__", [](const CpuUpdatePlan&) {
        return py::make_tuple(py::type::of(py::none()), py::tuple());
      });
}

}  // namespace fptt
