// Argument checks of every compute binding of fptt_fast._C (the LSTM's: lstm_checks.h).
// Torch-only code that builds without CUDA; every check takes the expected device type
// (c10::kCPU from the CPU bindings, c10::kCUDA from the CUDA glue), so the CUDA bindings'
// checks run on CPU CI too (tests/csrc/check_bindings.cpp). Contract: metadata only, never
// tensor data (exception: check_ce_classes, lstm_checks.h); raise c10::Error naming the
// binding and the argument through FPTT_CHECK, before the binding touches any data.
// Torch headers allowed here: only bindings and glue (.cpp) include this file.
// Design: docs/KERNELS.md#csrcincludefptt_fastupdate_checksh
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "fptt_fast/error_message.h"
#include "fptt_fast/fptt_math.h"
#include "fptt_fast/seam.h"

namespace fptt {
namespace checks {

// An argument's name in messages: "state.params[3]", "state.hyper", "segment.x".
struct ArgName {
  const char* name;
  int64_t index = -1;
  const char* note = nullptr;
};
// its part in an FPTT_CHECK message (found by argument-dependent lookup from msg::cat)
inline void put(std::string& s, const ArgName& a) {
  s += a.name;
  if (a.index >= 0) s += "[" + std::to_string(a.index) + "]";
  if (a.note) {
    s += " (";
    s += a.note;
    s += ")";
  }
}

// dtypes as Python spells them (torch.float32), since the caller wrote them in Python.
inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kLong: return "int64";
    case at::kInt: return "int32";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return c10::toString(t);
  }
}

inline const char* device_type_name(c10::DeviceType dev) {
  return dev == c10::kCPU ? "CPU" : dev == c10::kCUDA ? "CUDA" : "other";
}

// One tensor argument: defined, a plain strided tensor with storage, of device type `dev`
// (and on `device`, when given: every tensor of a call must be on one device), of
// `dtype`, not a lazily negated/conjugated view (the kernels read raw memory), and
// contiguous (the kernels index it as one flat row-major array). Sizes: the caller's.
inline void check_tensor(const char* fn, const at::Tensor& t, const ArgName& a,
                         c10::DeviceType dev, const c10::Device* device,
                         at::ScalarType dtype = at::kFloat) {
  FPTT_CHECK(t.defined(), fn, ": ", a, " is an undefined tensor");
  FPTT_CHECK(t.layout() == at::kStrided && !t.is_nested(), fn, ": ", a,
              " must be a dense strided tensor, got layout ", t.layout());
  FPTT_CHECK(t.device().type() == dev, fn, ": ", a, " must be a ", device_type_name(dev),
              " tensor, got one on ", t.device());
  FPTT_CHECK(device == nullptr || t.device() == *device, fn, ": ", a, " is on ", t.device(),
              ", expected ", (device ? *device : t.device()),
              " (all tensors of one call must be on one device)");
  FPTT_CHECK(t.scalar_type() == dtype, fn, ": ", a, " must be ", dtype_name(dtype), ", got ",
              dtype_name(t.scalar_type()));
  FPTT_CHECK(t.has_storage(), fn, ": ", a,
              " has no storage (a tensor subclass without data cannot be passed)");
  FPTT_CHECK(!t.is_neg() && !t.is_conj(), fn, ": ", a,
              " is a lazily negated or conjugated view; pass .resolve_neg()/.resolve_conj()");
  FPTT_CHECK(t.is_contiguous(), fn, ": ", a, " must be contiguous, got strides ", t.strides(),
              " for shape ", t.sizes());
}

inline void check_shape(const char* fn, const at::Tensor& t, const ArgName& a,
                        at::IntArrayRef shape) {
  FPTT_CHECK(t.sizes() == shape, fn, ": ", a, " has shape ", t.sizes(), ", expected ", shape);
}

// Memory overlap of the arguments: an output (written) must share no byte with any other
// argument, read or written, because the kernels read inputs while writing outputs, run
// in parallel over elements, and take their pointers __restrict__. Inputs may overlap
// each other (reading twice is harmless). Ranges are [data pointer, + bytes) of
// contiguous tensors: addresses only, no data is read. O(n log n): sort, then one sweep.
class AliasCheck {
 public:
  explicit AliasCheck(size_t expected = 0) { ranges_.reserve(expected); }

  void add(const at::Tensor& t, const ArgName& a, bool written) {
    const int64_t bytes = t.numel() * int64_t(t.element_size());
    if (bytes <= 0) return;  // an empty tensor is never read or written
    const uintptr_t b = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    add_range(b, b + uintptr_t(bytes), a, written);
  }
  void add_range(uintptr_t begin, uintptr_t end, const ArgName& a, bool written) {
    if (end > begin) ranges_.push_back({begin, end, a, written});
  }

  // Raises on the first overlap that involves a written range, naming both arguments.
  void check(const char* fn) {
    std::sort(ranges_.begin(), ranges_.end(),
              [](const Range& x, const Range& y) { return x.begin < y.begin; });
    // For each range in start order: it overlaps an earlier one iff it starts before that
    // one's end; keeping the furthest end among all earlier ranges and among the written
    // ones finds every conflicting pair's later member (sound and complete).
    const Range* any = nullptr;
    const Range* wr = nullptr;
    for (const Range& r : ranges_) {
      const Range* other = (wr && r.begin < wr->end) ? wr
                           : (r.written && any && r.begin < any->end) ? any
                                                                       : nullptr;
      FPTT_CHECK(other == nullptr, fn, ": ", (r.written ? r.name : other->name),
                  " shares memory with ", (r.written ? other->name : r.name),
                  "; an output (written in place) must not overlap any other argument");
      if (!any || r.end > any->end) any = &r;
      if (r.written && (!wr || r.end > wr->end)) wr = &r;
    }
  }

 private:
  struct Range {
    uintptr_t begin, end;
    ArgName name;
    bool written;
  };
  std::vector<Range> ranges_;
};

inline void check_list_length(const char* fn, const char* name, size_t got, const char* ref,
                              size_t n) {
  FPTT_CHECK(got == n, fn, ": ", name, " has ", got, " elements, ", ref, " has ", n,
              " (the lists are parallel: one entry per parameter)");
}

// The state's lists: optimizer code, list lengths, every tensor, hyper, group indices.
// `device`: the device all tensors must be on if already known (the LSTM's x), else
// nullptr (then the first parameter's, or hyper's if there is none). exp_avg_sq is read
// only for Adam/AdamW. Returns the device of the call.
inline c10::Device check_update_lists_on(const char* fn, const FpttState& s, c10::DeviceType dev,
                                         const c10::Device* device) {
  FPTT_CHECK(s.optimizer >= OPT_SGD && s.optimizer <= OPT_ADAMW, fn,
              ": unknown optimizer code state.optimizer=", s.optimizer,
              " (0 sgd, 1 adam, 2 adamw)");
  const bool sgd = s.sgd();
  const size_t n = s.params.size();
  const char* ref = "state.params";
  check_list_length(fn, "state.grads", s.grads.size(), ref, n);
  check_list_length(fn, "state.w_bar", s.w_bar.size(), ref, n);
  check_list_length(fn, "state.lam", s.lam.size(), ref, n);
  check_list_length(fn, "state.exp_avg", s.exp_avg.size(), ref, n);
  if (!sgd) check_list_length(fn, "state.exp_avg_sq", s.exp_avg_sq.size(), ref, n);
  check_list_length(fn, "state.step", s.step.size(), ref, n);
  check_list_length(fn, "state.group_of", s.group_of.size(), ref, n);
  FPTT_CHECK(n < size_t(INT32_MAX), fn, ": too many tensors (", n, ")");

  c10::Device dv = device ? *device : c10::Device(dev);
  if (device == nullptr) {
    const at::Tensor& first = n ? s.params[0] : s.hyper;
    check_tensor(fn, first, n ? ArgName{"state.params", 0} : ArgName{"state.hyper"}, dev,
                 nullptr);
    dv = first.device();
  }
  check_tensor(fn, s.hyper, {"state.hyper"}, dev, &dv);
  FPTT_CHECK(s.hyper.dim() == 2 && s.hyper.size(1) == H_COUNT, fn,
              ": state.hyper must be a contiguous float32 [groups, ", int(H_COUNT),
              "] table, got shape ", s.hyper.sizes());
  const int64_t groups = s.hyper.size(0);
  for (size_t i = 0; i < n; ++i) {
    const int64_t k = int64_t(i);
    check_tensor(fn, s.params[i], {"state.params", k}, dev, &dv);
    const int64_t numel = s.params[i].numel();
    auto slot = [&](const at::Tensor& t, const ArgName& a, int64_t want) {
      check_tensor(fn, t, a, dev, &dv);
      FPTT_CHECK(t.numel() == want, fn, ": ", a, " has ", t.numel(), " elements, expected ",
                  want, want == 1 ? "" : ", those of state.params[i]");
    };
    slot(s.grads[i], {"state.grads", k}, numel);
    slot(s.w_bar[i], {"state.w_bar", k}, numel);
    slot(s.lam[i], {"state.lam", k}, numel);
    slot(s.exp_avg[i], {"state.exp_avg", k, sgd ? "momentum_buffer" : nullptr}, numel);
    if (!sgd) slot(s.exp_avg_sq[i], {"state.exp_avg_sq", k}, numel);
    slot(s.step[i], {"state.step", k}, 1);
    FPTT_CHECK(s.group_of[i] >= 0 && s.group_of[i] < groups, fn, ": group index ",
                s.group_of[i], " of state.params[", i, "] is out of range [0, ", groups, ")");
  }
  return dv;
}

// The state's tensors in an alias check: the parameters and their state are written (if
// `update`; without it the parameters are read and the state is not used), the gradients
// are written only where the binding computes them (the LSTM), hyper is read.
inline void add_update_ranges(AliasCheck& ac, const FpttState& s, bool update,
                              bool grads_written) {
  for (size_t i = 0; i < s.params.size(); ++i) {
    const int64_t k = int64_t(i);
    ac.add(s.params[i], {"state.params", k}, update);
    ac.add(s.grads[i], {"state.grads", k}, grads_written);
    if (!update) continue;
    ac.add(s.w_bar[i], {"state.w_bar", k}, true);
    ac.add(s.lam[i], {"state.lam", k}, true);
    ac.add(s.exp_avg[i], {"state.exp_avg", k}, true);
    if (!s.sgd()) ac.add(s.exp_avg_sq[i], {"state.exp_avg_sq", k}, true);
    ac.add(s.step[i], {"state.step", k}, true);
  }
  if (update) ac.add(s.hyper, {"state.hyper"}, false);  // not checked (nor read) without one
}

inline void check_clip(const char* fn, double clip) {
  FPTT_CHECK(std::isfinite(clip) && clip >= 0.0, fn,
              ": state.clip must be a finite number >= 0 (0: no clipping), got ", clip);
}

// state.status, which the GPU launches (and the CPU plans) write: [norm, last skipped,
// skipped count] on the call's device.
inline void check_status(const char* fn, const at::Tensor& status, c10::DeviceType dev,
                         const c10::Device& device) {
  check_tensor(fn, status, {"state.status"}, dev, &device);
  FPTT_CHECK(status.numel() == 3, fn,
              ": state.status must hold 3 floats [norm, skipped, count], got ", status.numel());
}

// Everything fused_update_cpu (with_status false: state.status is not used) and
// fused_update_cuda (with_status) accept, on device type `dev`. Returns the call's device.
inline c10::Device check_fused_update_args(const char* fn, const FpttState& s, bool with_status,
                                           c10::DeviceType dev) {
  const c10::Device device = check_update_lists_on(fn, s, dev, nullptr);
  check_clip(fn, s.clip);
  if (with_status) check_status(fn, s.status, dev, device);
  AliasCheck ac(7 * s.params.size() + 2);
  add_update_ranges(ac, s, /*update=*/true, /*grads_written=*/false);
  if (with_status) ac.add(s.status, {"state.status"}, true);
  ac.check(fn);
  return device;
}

}  // namespace checks
}  // namespace fptt
