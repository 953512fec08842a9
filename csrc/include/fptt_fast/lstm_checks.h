// Argument checks of the LSTM segment bindings, lstm_segment_step_cpu (csrc/bind_lstm.cpp)
// and the CUDA glue's launches (csrc/cuda_glue/lstm_cuda.cpp). Same rules as
// update_checks.h: torch-only, parameterised by the expected device type, metadata only
// (except check_ce_classes), called before any data is touched.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "fptt_fast/cuda_lstm.h"     // kLstmMaxHidden: plain C++, no CUDA headers
#include "fptt_fast/lstm_args.h"
#include "fptt_fast/lstm_segment.h"  // LOSS_MSE/LOSS_CE, lstm_segment_workspace_floats
#include "fptt_fast/update_checks.h"

namespace fptt {
namespace checks {

struct LstmDims {
  int64_t T, B, I, H, O;
};

// What the checks need to know of a cell: its gate blocks (weights [gates*H, ...]),
// whether it has a cell state c, its CPU binding's name (messages) and workspace size.
struct CellKind {
  int gates;
  bool cell_state;
  const char* cpu_fn;
  int64_t (*workspace_floats)(int64_t T, int64_t B, int64_t I, int64_t H, int64_t O,
                              int per_step);
};
inline const CellKind kLstmCell{4, true, "lstm_segment_step_cpu",
                                &cpu::lstm_segment_workspace_floats};

// The kernel arguments (lstm_args.h) of checked segment inputs, the one filling for the
// CPU binding and the CUDA glue: sizes, loss, inputs, the parameters and gradient buffers
// (six, or a stacked layer's four without the head), the layer fields. x, h0, c0 are
// passed apart from io (the CUDA glue may pass copies). h_out, c_out, loss_out and
// scratch are left null: the caller sets them.
inline lstm::LstmSegmentArgs segment_args(const at::Tensor& x, const at::Tensor& h0,
                                          const at::Tensor& c0, const SegmentIO& io,
                                          const std::vector<at::Tensor>& params,
                                          const std::vector<at::Tensor>& grads,
                                          const LstmDims& d, const SegmentConfig& cfg) {
  lstm::LstmSegmentArgs a{};
  a.T = d.T; a.B = d.B; a.I = d.I; a.H = d.H; a.O = d.O;
  a.loss = int(cfg.loss);
  a.per_step = cfg.per_step && cfg.head ? 1 : 0;  // a layer without the head has no loss
  a.weight = float(cfg.weight);
  a.x = x.data_ptr<float>();
  const bool target = io.target.defined() && cfg.head && !cfg.forward_only;  // else unread
  a.target_f = target && cfg.loss == lstm::LOSS_MSE ? io.target.data_ptr<float>() : nullptr;
  a.target_i = target && cfg.loss == lstm::LOSS_CE ? io.target.data_ptr<int64_t>() : nullptr;
  a.h0 = h0.data_ptr<float>();
  a.c0 = c0.defined() ? c0.data_ptr<float>() : nullptr;  // a GRU has no cell state
  float** p[6] = {&a.w_ih, &a.w_hh, &a.b_ih, &a.b_hh, &a.w_o, &a.b_o};
  float** g[6] = {&a.g_w_ih, &a.g_w_hh, &a.g_b_ih, &a.g_b_hh, &a.g_w_o, &a.g_b_o};
  for (size_t k = 0; k < params.size(); ++k) {
    *p[k] = params[k].data_ptr<float>();
    *g[k] = grads[k].data_ptr<float>();
  }
  a.skip_head = cfg.head ? 0 : 1;
  a.forward_only = cfg.forward_only ? 1 : 0;
  a.dh_seq = io.dh_seq.defined() ? io.dh_seq.data_ptr<float>() : nullptr;
  a.dx = io.dx.defined() ? io.dx.data_ptr<float>() : nullptr;
  a.h_seq = io.h_seq.defined() ? io.h_seq.data_ptr<float>() : nullptr;
  return a;
}

// "state.params[1] (weight_hh_l0)", "state.grads[4] (head.weight)"
inline ArgName lstm_param_name(int k, const char* list = "state.params") {
  static const char* const names[6] = {"weight_ih_l0", "weight_hh_l0", "bias_ih_l0",
                                       "bias_hh_l0",   "head.weight",  "head.bias"};
  return {list, k, names[k]};
}
inline ArgName lstm_grad_name(int k) { return lstm_param_name(k, "state.grads"); }

// A stacked layer's tensors in segment (seam.h): dh_seq [T, B, H] exactly when the layer
// has no head and runs its backward; dx [T, B, I] and h_seq [T, B, H] optional outputs
// (dx not with forward_only, which computes no gradient).
inline void check_layer_io(const char* fn, const SegmentIO& io, const SegmentConfig& cfg,
                           c10::DeviceType dev, const c10::Device& device, int64_t T,
                           int64_t B, int64_t I, int64_t H) {
  const bool want_dh = !cfg.head && !cfg.forward_only;
  FPTT_CHECK(io.dh_seq.defined() == want_dh, fn,
              want_dh ? ": a layer without the head (config.head false) takes the gradient on "
                        "its outputs, segment.dh_seq [omega, B, H]; got None"
                      : ": segment.dh_seq is read only by a layer without the head running its "
                        "backward (config.head false, forward_only false); pass None");
  if (want_dh) {
    check_tensor(fn, io.dh_seq, {"segment.dh_seq"}, dev, &device);
    check_shape(fn, io.dh_seq, {"segment.dh_seq"}, {T, B, H});
  }
  if (io.dx.defined()) {
    FPTT_CHECK(!cfg.forward_only, fn,
                ": segment.dx is a gradient, and config.forward_only computes none; pass None");
    check_tensor(fn, io.dx, {"segment.dx"}, dev, &device);
    check_shape(fn, io.dx, {"segment.dx"}, {T, B, I});
  }
  if (io.h_seq.defined()) {
    check_tensor(fn, io.h_seq, {"segment.h_seq"}, dev, &device);
    check_shape(fn, io.h_seq, {"segment.h_seq"}, {T, B, H});
  }
}

// What every LSTM binding takes: the segment's x, h0, c0 and target, the six parameters
// and gradient buffers (state.params, state.grads), the loss code and weight; a stacked
// layer without the head (config.head false) takes its four parameters and dh_seq
// instead of a target. The sizes follow from x ([T, B, I]), weight_hh ([4H, H]) and
// head.weight ([O, H]; O = 0 without the head); those three are checked first, then every
// other tensor against the shapes they imply. max_hidden > 0 (the CUDA step's limit) is
// checked right after weight_hh, before any tensor whose expected shape depends on H.
inline LstmDims check_lstm_segment_common(const char* fn, const SegmentIO& io,
                                          const std::vector<at::Tensor>& params,
                                          const std::vector<at::Tensor>& grads,
                                          const SegmentConfig& cfg, c10::DeviceType dev,
                                          int64_t max_hidden,
                                          const CellKind& cell = kLstmCell) {
  const size_t n = cfg.head ? 6 : 4;
  FPTT_CHECK(params.size() == n, fn,
              cfg.head ? ": state.params must hold 6 tensors (weight_ih_l0, weight_hh_l0, "
                         "bias_ih_l0, bias_hh_l0, head.weight, head.bias), got "
                       : ": with config.head false state.params must hold a layer's 4 tensors "
                         "(weight_ih, weight_hh, bias_ih, bias_hh), got ",
              params.size());
  check_list_length(fn, "state.grads", grads.size(), "state.params", n);
  FPTT_CHECK(cfg.loss == cpu::LOSS_MSE || cfg.loss == cpu::LOSS_CE, fn,
              ": config.loss must be 0 (mse) or 1 (ce), got ", cfg.loss);
  FPTT_CHECK(std::isfinite(cfg.weight), fn, ": config.weight must be finite, got ", cfg.weight);
  FPTT_CHECK(!cfg.update || (cfg.head && !cfg.forward_only), fn,
              ": config.update needs the head and the backward (the layers of a stack are "
              "updated together, by the optimiser)");

  const at::Tensor& x = io.x;
  check_tensor(fn, x, {"segment.x"}, dev, nullptr);
  const c10::Device device = x.device();
  FPTT_CHECK(x.dim() == 3 && x.size(0) >= 1 && x.size(1) >= 1 && x.size(2) >= 1, fn,
              ": segment.x must be [omega >= 1, B >= 1, I >= 1], got shape ", x.sizes());
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2);

  const at::Tensor& whh = params[1];
  check_tensor(fn, whh, lstm_param_name(1), dev, &device);
  // size(0) / gates == size(1), not size(0) == gates * size(1): an empty [0, 2^62] tensor
  // must not pass through an overflow
  const int gates = cell.gates;
  FPTT_CHECK(whh.dim() == 2 && whh.size(1) >= 1 && whh.size(0) % gates == 0 &&
                  whh.size(0) / gates == whh.size(1),
              fn, ": ", lstm_param_name(1), " must be [", gates, "H, H] with H >= 1, got shape ",
              whh.sizes());
  const int64_t H = whh.size(1), G = gates * H;  // whh holds gates H^2 floats: no overflow
  FPTT_CHECK(max_hidden <= 0 || H <= max_hidden, fn, ": hidden size H=", H,
              " exceeds the one-launch CUDA LSTM step's limit kLstmMaxHidden=", max_hidden,
              " (csrc/include/fptt_fast/cuda_lstm.h)");
  int64_t O = 0;
  if (cfg.head) {
    const at::Tensor& wo = params[4];
    check_tensor(fn, wo, lstm_param_name(4), dev, &device);
    FPTT_CHECK(wo.dim() == 2 && wo.size(0) >= 1 && wo.size(1) == H, fn, ": ",
                lstm_param_name(4), " must be [O >= 1, H=", H, "], got shape ", wo.sizes());
    O = wo.size(0);
  }

  const std::vector<std::vector<int64_t>> shapes = {{G, I}, {G, H}, {G}, {G}, {O, H}, {O}};
  for (size_t k = 0; k < n; ++k) {
    check_tensor(fn, params[k], lstm_param_name(k), dev, &device);
    check_shape(fn, params[k], lstm_param_name(k), shapes[k]);
    check_tensor(fn, grads[k], lstm_grad_name(k), dev, &device);
    check_shape(fn, grads[k], lstm_grad_name(k), shapes[k]);
  }
  check_tensor(fn, io.h0, {"segment.h0"}, dev, &device);
  check_shape(fn, io.h0, {"segment.h0"}, {B, H});
  if (cell.cell_state) {
    check_tensor(fn, io.c0, {"segment.c0"}, dev, &device);
    check_shape(fn, io.c0, {"segment.c0"}, {B, H});
  } else {
    FPTT_CHECK(!io.c0.defined(), fn, ": segment.c0 must be None (this cell has no cell state)");
  }
  check_layer_io(fn, io, cfg, dev, device, T, B, I, H);
  if (!cfg.head || cfg.forward_only) {
    FPTT_CHECK(cfg.head || !io.target.defined(), fn,
                ": segment.target must be None without the head (config.head false)");
    return {T, B, I, H, O};
  }

  std::vector<int64_t> lead =
      cfg.per_step ? std::vector<int64_t>{T, B} : std::vector<int64_t>{B};
  if (cfg.loss == cpu::LOSS_MSE) {
    const ArgName a{"segment.target", -1, "mse"};
    check_tensor(fn, io.target, a, dev, &device);
    std::vector<int64_t> sh = lead;
    sh.push_back(O);
    check_shape(fn, io.target, a, sh);
  } else {
    const ArgName a{"segment.target", -1, "ce class indices"};
    check_tensor(fn, io.target, a, dev, &device, at::kLong);
    check_shape(fn, io.target, a, lead);
  }
  return {T, B, I, H, O};
}

// The segment's inputs in an alias check (the state's tensors: add_update_ranges), and a
// stacked layer's dh_seq (read), dx and h_seq (written).
inline void add_lstm_inputs(AliasCheck& ac, const SegmentIO& io, bool with_state) {
  ac.add(io.x, {"segment.x"}, false);
  if (io.target.defined()) ac.add(io.target, {"segment.target"}, false);
  if (with_state) {
    ac.add(io.h0, {"segment.h0"}, false);
    if (io.c0.defined()) ac.add(io.c0, {"segment.c0"}, false);
  }
  if (io.dh_seq.defined()) ac.add(io.dh_seq, {"segment.dh_seq"}, false);
  if (io.dx.defined()) ac.add(io.dx, {"segment.dx"}, true);
  if (io.h_seq.defined()) ac.add(io.h_seq, {"segment.h_seq"}, true);
}

// Everything lstm_segment_step_cpu accepts, on device type `dev`. The state's FPTT lists,
// optimizer, clip and status are read, and checked, only with config.update. The workspace
// may be too small (the binding grows it, with resize_, after these checks): then its
// storage must be resizable. *workspace_need: the floats the segment needs.
inline LstmDims check_lstm_segment_cpu_args(const FpttState& s, const SegmentIO& io,
                                            const SegmentConfig& cfg,
                                            const at::Tensor& workspace, c10::DeviceType dev,
                                            int64_t* workspace_need,
                                            const CellKind& cell = kLstmCell) {
  const char* fn = cell.cpu_fn;
  const LstmDims d = check_lstm_segment_common(fn, io, s.params, s.grads, cfg, dev, 0, cell);
  const c10::Device device = io.x.device();
  check_tensor(fn, workspace, {"workspace"}, dev, &device);
  const int64_t need =
      cell.workspace_floats(d.T, d.B, d.I, d.H, d.O, cfg.per_step && cfg.head ? 1 : 0);
  if (workspace.numel() < need) {
    FPTT_CHECK(workspace.storage().resizable() && !workspace.requires_grad(), fn,
                ": workspace holds ", workspace.numel(), " floats, this segment needs ", need,
                ", and it cannot be grown (its storage is not resizable or it requires grad); "
                "pass torch.empty(0) and let the binding grow it");
  }
  if (cfg.update) {
    check_update_lists_on(fn, s, dev, &device);
    check_clip(fn, s.clip);
    check_status(fn, s.status, dev, device);
  }

  AliasCheck ac(56);
  add_lstm_inputs(ac, io, true);
  add_update_ranges(ac, s, cfg.update, /*grads_written=*/true);
  if (cfg.update) ac.add(s.status, {"state.status"}, true);
  // The workspace as its whole storage: it is resized in place (a storage too small for
  // the segment is reallocated, and every tensor sharing it moves along) and then written
  // from its data pointer on, so any argument sharing its storage, wherever in it, could be
  // overwritten. Every such argument lies inside the storage's current extent; memory past
  // that extent is not the workspace's (a growth allocates elsewhere).
  const c10::Storage& st = workspace.storage();
  const uintptr_t base = reinterpret_cast<uintptr_t>(st.data());
  if (base != 0) ac.add_range(base, base + uintptr_t(st.nbytes()), {"workspace"}, true);
  ac.check(fn);
  if (workspace_need) *workspace_need = need;
  return d;
}

// The CUDA launches' outputs: h_out, c_out [B, H] and losses (n_losses floats).
inline void check_cuda_outputs(const char* fn, const SegmentIO& io, const LstmDims& d,
                               int64_t n_losses, c10::DeviceType dev,
                               const c10::Device& device) {
  check_tensor(fn, io.h_out, {"segment.h_out"}, dev, &device);
  check_shape(fn, io.h_out, {"segment.h_out"}, {d.B, d.H});
  check_tensor(fn, io.c_out, {"segment.c_out"}, dev, &device);
  check_shape(fn, io.c_out, {"segment.c_out"}, {d.B, d.H});
  check_tensor(fn, io.losses, {"segment.losses"}, dev, &device);
  FPTT_CHECK(io.losses.numel() == n_losses, fn, ": segment.losses must hold ", n_losses,
              " floats, got ", io.losses.numel());
}

// The CUDA launches' overlaps, in two passes so that h_out/c_out may overlap h0/c0 and
// nothing else: everything but h_out/c_out, then everything but h0/c0. With the update
// the FPTT state and status are written too.
inline void check_cuda_aliases(const char* fn, const FpttState& s, const SegmentIO& io,
                               bool update, bool grads_written) {
  for (int pass = 0; pass < 2; ++pass) {
    AliasCheck ac(56);
    add_lstm_inputs(ac, io, /*with_state=*/pass == 0);
    add_update_ranges(ac, s, update, grads_written);
    if (update) ac.add(s.status, {"state.status"}, true);
    ac.add(io.losses, {"segment.losses"}, true);
    if (pass == 1) {
      ac.add(io.h_out, {"segment.h_out"}, true);
      ac.add(io.c_out, {"segment.c_out"}, true);
    }
    ac.check(fn);
  }
}

// Everything the CUDA launches accept, on device type `dev` (the glue passes c10::kCUDA):
// n_segs segments over segment.x, losses of n_segs floats. Refused first: tf32 (not
// implemented), then, right after weight_hh, hidden sizes above kLstmMaxHidden. h_out/c_out
// may alias h0/c0 (the kernel copies h0, c0 into its scratch before a grid sync and writes
// h_out, c_out last: cuda_lstm.h), nothing else.
inline LstmDims check_lstm_segment_cuda_args(const char* fn, const FpttState& s,
                                             const SegmentIO& io, const SegmentConfig& cfg,
                                             c10::DeviceType dev) {
  FPTT_CHECK(!cfg.tf32, fn,
              ": tf32=True is not implemented by the CUDA one-launch LSTM step (it computes in "
              "IEEE fp32); use allow_tf32=False");
  const LstmDims d = check_lstm_segment_common(fn, io, s.params, s.grads, cfg, dev,
                                               cuda::kLstmMaxHidden);
  FPTT_CHECK(!io.dh_seq.defined() && !io.dx.defined() && !io.h_seq.defined(), fn,
              ": segment.dh_seq, dx and h_seq belong to a stacked layer's launch, which runs "
              "without the update (config.update false); pass None");
  const c10::Device device = io.x.device();
  check_update_lists_on(fn, s, dev, &device);
  check_clip(fn, s.clip);
  check_status(fn, s.status, dev, device);
  check_cuda_outputs(fn, io, d, cfg.n_segs, dev, device);
  FPTT_CHECK(cfg.n_segs >= 1 && cfg.n_segs <= d.T, fn, ": config.n_segs=", cfg.n_segs,
              " segments need 1 <= n_segs <= T=", d.T, " steps");
  const int64_t omega = (d.T + cfg.n_segs - 1) / cfg.n_segs;
  FPTT_CHECK((d.T + omega - 1) / omega == cfg.n_segs, fn, ": config.n_segs=", cfg.n_segs,
              " segments of ceil(T/n_segs)=", omega, " steps cover T=", d.T, " in ",
              (d.T + omega - 1) / omega);

  check_cuda_aliases(fn, s, io, /*update=*/true, /*grads_written=*/true);
  return d;
}

// Everything the CUDA gradients-only launch accepts (config.update false): one segment on
// the general kernel, no update, so the state's FPTT lists, hyper table, clip and status
// are neither read nor checked. A layer of a stack (config.head false, forward_only) runs
// only here. h_out/c_out may alias h0/c0, nothing else overlaps a written tensor.
inline LstmDims check_lstm_gradients_cuda_args(const char* fn, const FpttState& s,
                                               const SegmentIO& io, const SegmentConfig& cfg,
                                               c10::DeviceType dev) {
  FPTT_CHECK(!cfg.tf32, fn,
              ": tf32=True is not implemented by the CUDA one-launch LSTM step (it computes in "
              "IEEE fp32); use allow_tf32=False");
  FPTT_CHECK(cfg.n_segs == 1 && !cfg.ramp && (cfg.kernel == 0 || cfg.kernel == 1), fn,
              ": without the update (config.update false) the general kernel runs one segment: "
              "config.n_segs 1, ramp false, kernel 0 or 1");
  const LstmDims d = check_lstm_segment_common(fn, io, s.params, s.grads, cfg, dev,
                                               cuda::kLstmMaxHidden);
  const c10::Device device = io.x.device();
  check_cuda_outputs(fn, io, d, 1, dev, device);
  check_cuda_aliases(fn, s, io, /*update=*/false, /*grads_written=*/!cfg.forward_only);
  return d;
}

// The one check that reads tensor data: the classes of a CPU ce target, which the CPU
// kernel uses as indices into the head's outputs. Call it after every metadata check has
// passed (the target is then a contiguous CPU int64 tensor of the expected shape). The
// CUDA binding does not call it (it would sync the host): there an out-of-range class makes
// the step's gradient NaN, so the update is skipped and flagged in status.
inline void check_ce_classes(const char* fn, const at::Tensor& target, int64_t O) {
  FPTT_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong &&
                  target.is_contiguous(),
              fn, ": internal: check_ce_classes needs a checked CPU int64 target");
  const int64_t* y = target.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < target.numel(); ++k)
    FPTT_CHECK(y[k] >= 0 && y[k] < O, fn, ": ce target class ", y[k], " (element ", k,
                ") is out of range [0, ", O - 1, "]");
}

}  // namespace checks
}  // namespace fptt
