// Pointwise FPTT math shared by the CPU (C++/OpenMP) and CUDA kernels.
//
// Plain C++ with __host__ __device__ markers and no torch headers, so the same
// lines run in the CPU backend (tested on every machine) and in the .cu kernels.
// Steps refer to docs/ALGORITHM.md: 2 regulariser gradient, 3 clip (coef computed by the
// caller from the global norm), 4 base optimiser, 5 dual, 6 running average.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define FPTT_HD __host__ __device__ __forceinline__
#else
#define FPTT_HD inline
#endif

namespace fptt {

// Layout of one parameter group's hyper-parameters, a row of floats.
// fptt_fast/optim.py packs the rows in this order (checked at import).
enum HyperIndex {
  H_LR = 0, H_ALPHA, H_BETA, H_RHO, H_C, H_WEIGHT_DECAY, H_BETA1, H_BETA2, H_EPS,
  H_MOMENTUM, H_DAMPENING, H_NESTEROV, H_DECOUPLED, H_COUNT
};
static const char* const kHyperNames[H_COUNT] = {
  "lr", "alpha", "beta", "rho", "c", "weight_decay", "beta1", "beta2", "eps",
  "momentum", "dampening", "nesterov", "decoupled"};

enum Optimizer { OPT_SGD = 0, OPT_ADAM = 1, OPT_ADAMW = 2 };

// torch.nn.utils.clip_grad_norm_'s coefficient; clip <= 0 means no clipping.
FPTT_HD float clip_coefficient(double norm, float clip) {
  if (clip <= 0.f) return 1.f;
  float coef = clip / (float(norm) + 1e-6f);
  return coef < 1.f ? coef : 1.f;
}

// The regulariser's gradient (step 2), (rho - 1) lam + c alpha (w - w_bar); zero when
// alpha == 0, the regulariser off, whatever lam holds. Selects, not branches: the flags
// are uniform and the CPU loops vectorise.
FPTT_HD float regulariser_grad(float w, float w_bar, float lam, const float* h) {
  const float r = (h[H_RHO] - 1.f) * lam + (h[H_C] * h[H_ALPHA]) * (w - w_bar);
  return h[H_ALPHA] == 0.f ? 0.f : r;
}

// Decoupled (ALGORITHM.md, "The decoupled regulariser"): the regulariser's gradient is a
// plain step of size lr outside the clip and the base optimiser. Compared with 1, not with
// 0, so that a NaN row (fptt_fast.distributed's gradients-only launch) stays coupled and
// its NaN reaches the norm.
FPTT_HD bool is_decoupled(const float* h) { return h[H_DECOUPLED] == 1.f; }

// What the clip's norm (step 3) sums: the task gradient plus the regulariser's when
// coupled, the task gradient alone when decoupled. Decoupled adds 0 * r, which is g
// unless r is inf or NaN: a non-finite w_bar or lam then reaches the norm and the step
// is skipped, as it is when coupled.
FPTT_HD float norm_input(float g, float w, float w_bar, float lam, const float* h) {
  const float r = regulariser_grad(w, w_bar, lam, h);
  return is_decoupled(h) ? g + 0.f * r : g + r;
}

// What the base optimiser needs of the step count, once per tensor: the step
// count *before* this update (0 on the first), as torch keeps it in state["step"].
struct StepScalars {
  float coef;       // clip coefficient, step 3
  float step_size;  // Adam: lr / (1 - beta1^t)
  float bc2_sqrt;   // Adam: sqrt(1 - beta2^t)
  int first;        // SGD: first step initialises the momentum buffer
};

FPTT_HD StepScalars step_scalars(const float* h, float step_before, float coef) {
  StepScalars s;
  double t = double(step_before) + 1.0;
  s.coef = coef;
  s.step_size = float(double(h[H_LR]) / (1.0 - pow(double(h[H_BETA1]), t)));
  s.bc2_sqrt = float(sqrt(1.0 - pow(double(h[H_BETA2]), t)));
  s.first = step_before == 0.f;
  return s;
}

// Step 4 for SGD (torch.optim.SGD): buf is the momentum buffer. Written with
// selects rather than branches so the CPU loop vectorises; the flags are uniform.
FPTT_HD void sgd_step(float& w, float g, float& buf, const float* h, int first) {
  const float d = g + h[H_WEIGHT_DECAY] * w;
  const float mom = h[H_MOMENTUM];
  const float b = first ? d : buf * mom + (1.f - h[H_DAMPENING]) * d;
  const float step = mom == 0.f ? d : (h[H_NESTEROV] != 0.f ? d + mom * b : b);
  buf = mom == 0.f ? buf : b;
  w = w - h[H_LR] * step;
}

// Step 4 for Adam (L2 weight decay) and AdamW (decoupled), torch's formulas.
template <int OPT>
FPTT_HD void adam_step(float& w, float g, float& m, float& v, const float* h, const StepScalars& s) {
  const float wd = h[H_WEIGHT_DECAY];
  if (OPT == OPT_ADAMW) w = w * (1.f - h[H_LR] * wd);
  else g = g + wd * w;
  m = m + (1.f - h[H_BETA1]) * (g - m);  // torch's lerp(m, g, 1 - beta1)
  v = v * h[H_BETA2] + (1.f - h[H_BETA2]) * g * g;
  const float denom = sqrtf(v) / s.bc2_sqrt + h[H_EPS];
  w = w - s.step_size * (m / denom);
}

// Steps 5 and 6: the new w, the old w_bar, then the new lam. alpha == 0 (the regulariser
// off) keeps both as they are.
FPTT_HD void dual_and_average(float w, float& w_bar, float& lam, const float* h) {
  const float a = h[H_ALPHA];
  const float lam_new = lam - a * (w - w_bar);
  const float w_bar_new = (1.f - h[H_BETA]) * w_bar + (h[H_BETA] * w - (h[H_BETA] / a) * lam_new);
  lam = a == 0.f ? lam : lam_new;
  w_bar = a == 0.f ? w_bar : w_bar_new;
}

// Steps 2-6 on one element. s1/s2: momentum buffer (SGD) or exp_avg/exp_avg_sq.
// Decoupled: the base optimiser takes the clipped task gradient, then w moves by
// -lr * (the regulariser's gradient at the old w).
template <int OPT>
FPTT_HD void update_element(float& w, float g, float& w_bar, float& lam, float& s1, float& s2,
                            const float* h, const StepScalars& s) {
  const float r = regulariser_grad(w, w_bar, lam, h);
  const bool dec = is_decoupled(h);
  const float gc = (dec ? g : g + r) * s.coef;
  if (OPT == OPT_SGD) sgd_step(w, gc, s1, h, s.first);
  else adam_step<OPT>(w, gc, s1, s2, h, s);
  w = dec ? w - h[H_LR] * r : w;
  dual_and_average(w, w_bar, lam, h);
}

}  // namespace fptt
