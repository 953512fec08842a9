// Pointwise FPTT math shared by the CPU (C++/OpenMP) and CUDA kernels.
//
// Plain C++ with __host__ __device__ markers and no torch headers, so the same
// lines run in the CPU backend (tested on every machine) and in the .cu kernels.
// Steps refer to FPTT.md: 2 regulariser gradient, 3 clip (coef computed by the
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
  H_MOMENTUM, H_DAMPENING, H_NESTEROV, H_COUNT
};
static const char* const kHyperNames[H_COUNT] = {
  "lr", "alpha", "beta", "rho", "c", "weight_decay", "beta1", "beta2", "eps",
  "momentum", "dampening", "nesterov"};

enum Optimizer { OPT_SGD = 0, OPT_ADAM = 1, OPT_ADAMW = 2 };

// torch.nn.utils.clip_grad_norm_'s coefficient; clip <= 0 means no clipping.
FPTT_HD float clip_coefficient(double norm, float clip) {
  if (clip <= 0.f) return 1.f;
  float coef = clip / (float(norm) + 1e-6f);
  return coef < 1.f ? coef : 1.f;
}

// Step 2: task gradient plus the regulariser's.
FPTT_HD float regularised_grad(float g, float w, float w_bar, float lam, const float* h) {
  return g + ((h[H_RHO] - 1.f) * lam + (h[H_C] * h[H_ALPHA]) * (w - w_bar));
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

// Steps 5 and 6: the new w, the old w_bar, then the new lam.
FPTT_HD void dual_and_average(float w, float& w_bar, float& lam, const float* h) {
  lam = lam - h[H_ALPHA] * (w - w_bar);
  w_bar = (1.f - h[H_BETA]) * w_bar + (h[H_BETA] * w - (h[H_BETA] / h[H_ALPHA]) * lam);
}

// Steps 2-6 on one element. s1/s2: momentum buffer (SGD) or exp_avg/exp_avg_sq.
template <int OPT>
FPTT_HD void update_element(float& w, float g, float& w_bar, float& lam, float& s1, float& s2,
                            const float* h, const StepScalars& s) {
  const float gc = regularised_grad(g, w, w_bar, lam, h) * s.coef;
  if (OPT == OPT_SGD) sgd_step(w, gc, s1, h, s.first);
  else adam_step<OPT>(w, gc, s1, s2, h, s);
  dual_and_average(w, w_bar, lam, h);
}

}  // namespace fptt
