// What crosses the Python <-> C++ seam: an optimiser's FPTT state over a list of
// parameters, a segment's tensors and what a segment launch does. Each has a Python twin
// of the same field names in fptt_fast/seam.py (seam_cast.h converts them); every compute
// binding takes these instead of parallel lists. Torch headers: bindings and glue only.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "fptt_fast/fptt_math.h"

namespace fptt {

// Slot k of every list belongs to params[k]. The optimiser's moments are named as torch
// names them for Adam; SGD keeps its momentum_buffer in exp_avg and reads no exp_avg_sq
// (its list may be empty or repeat exp_avg).
struct FpttState {
  std::vector<at::Tensor> params, grads, w_bar, lam, exp_avg, exp_avg_sq, step;
  at::Tensor hyper;               // [groups, H_COUNT] float32, one row per param group
  std::vector<int64_t> group_of;  // params[k]'s row of hyper
  int64_t optimizer = OPT_ADAM;   // OptCode
  double clip = 0.0;              // global gradient-norm clip, 0: none
  at::Tensor status;              // [norm, last skipped, skipped count]; undefined: none

  bool sgd() const { return optimizer == OPT_SGD; }
  size_t size() const { return params.size(); }
  // The slots listed in `keep`, in that order (every list, group_of included; grads only
  // if it is parallel to params).
  FpttState subset(const std::vector<size_t>& keep) const {
    FpttState s;
    s.hyper = hyper;
    s.optimizer = optimizer;
    s.clip = clip;
    s.status = status;
    for (size_t i : keep) {
      s.params.push_back(params[i]);
      if (grads.size() == params.size()) s.grads.push_back(grads[i]);
      s.w_bar.push_back(w_bar[i]);
      s.lam.push_back(lam[i]);
      s.exp_avg.push_back(exp_avg[i]);
      if (!sgd()) s.exp_avg_sq.push_back(exp_avg_sq[i]);
      s.step.push_back(step[i]);
      s.group_of.push_back(group_of[i]);
    }
    return s;
  }
};

// A segment's tensors, time-major: x [omega, B, I], target ([B, O] or per step
// [omega, B, O]; ce: class indices), the entering state h0, c0 [B, H] and, for the GPU
// launches, the outputs h_out, c_out [B, H] and losses [segments]. A layer of a stack
// (config.head false) takes dh_seq [omega, B, H], the gradient on its outputs from the
// layer above, instead of a target; dx [omega, B, I] (optional) receives the gradient on
// x, h_seq [omega, B, H] (optional) every step's output.
struct SegmentIO {
  at::Tensor x, target, h0, c0, h_out, c_out, losses, dh_seq, dx, h_seq;
};

// What a segment launch does. weight: the loss weight of a one-segment launch; n_segs > 1
// splits x into that many segments of ceil(omega / n_segs) steps, weighted (p + 1) / n_segs
// if ramp else weight. kernel: the CUDA kernel (0 auto, 1 general, 2 persistent).
// head false: a lower layer of a stack (params: its 4 tensors, no loss); forward_only:
// the forward alone (h_out, c_out, h_seq), no gradients.
struct SegmentConfig {
  double weight = 1.0;
  int64_t loss = 0;  // LossCode: 0 mse, 1 ce
  bool per_step = false;
  bool update = true;
  int64_t n_segs = 1;
  bool ramp = false;
  bool tf32 = false;
  int64_t kernel = 0;
  bool builtin_gemm = false;  // the CPU step's own GEMM instead of torch's (tests)
  bool head = true;
  bool forward_only = false;
};

}  // namespace fptt
