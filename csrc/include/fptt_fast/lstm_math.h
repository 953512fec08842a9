// Pointwise LSTM math (nn.LSTM conventions, gate order i, f, g, o) shared by the CPU
// segment step and the CUDA kernels: plain C++, __host__ __device__, no torch headers.
//
// Forward of one cell element, from the pre-activations a = x W_ih^T + b_ih + h W_hh^T + b_hh:
//   i, f, o = sigmoid(a_i, a_f, a_o), g = tanh(a_g), c' = f c + i g, h' = o tanh(c').
// Backward, given dh' (from the head and the next step) and dc' (from the next step):
//   dc = dc' + dh' o (1 - tanh(c')^2), and the pre-activation gradients below.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define FPTT_LSTM_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always inlined: the CPU step calls them on GCC vectors from its per-ISA clones
// (csrc/cpu/lstm_segment.cpp), where a call would cross calling conventions
#define FPTT_LSTM_HD inline __attribute__((always_inline))
#else
#define FPTT_LSTM_HD inline
#endif

namespace fptt {
namespace lstm {

// The task loss's code, the one definition for the CPU step and both CUDA kernels
// (fptt_fast/layout.py's LOSS_CODE; checked against _C.layout when the extension loads).
enum LossCode { LOSS_MSE = 0, LOSS_CE = 1 };

// torch's sigmoid, written with exp (as the Triton interpreter must).
FPTT_LSTM_HD float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

// The activations the cell math below is written over: libm's here (the CUDA kernels);
// the CPU step passes its vectorisable ones (csrc/cpu/lstm_segment.cpp, VecMath).
struct LibmMath {
  static FPTT_LSTM_HD float sigmoid(float x) { return sigmoidf_(x); }
  static FPTT_LSTM_HD float tanh(float x) { return tanhf(x); }
};

// The activated gates and the new cell state and output of one element (T = float), or
// of a vector of elements (the CPU step's T, a GCC vector of floats, with M's math on it).
template <class T>
struct CellForwardT {
  T i, f, g, o, c, h;
};
using CellForward = CellForwardT<float>;

template <class M = LibmMath, class T = float>
FPTT_LSTM_HD CellForwardT<T> cell_forward(T a_i, T a_f, T a_g, T a_o, T c_prev) {
  CellForwardT<T> r;
  r.i = M::sigmoid(a_i);
  r.f = M::sigmoid(a_f);
  r.g = M::tanh(a_g);
  r.o = M::sigmoid(a_o);
  r.c = r.f * c_prev + r.i * r.g;
  r.h = r.o * M::tanh(r.c);
  return r;
}

// Gradients of one element w.r.t. the four pre-activations and the previous cell state.
template <class T>
struct CellBackwardT {
  T d_ai, d_af, d_ag, d_ao, dc_prev;
};
using CellBackward = CellBackwardT<float>;

// i, f, g, o: activated gates of the step; c, c_prev: its new and previous cell state;
// dh: total gradient on its output h; dc_next: gradient on c from the following step.
template <class M = LibmMath, class T = float>
FPTT_LSTM_HD CellBackwardT<T> cell_backward(T i, T f, T g, T o, T c, T c_prev, T dh, T dc_next) {
  const T tc = M::tanh(c);
  const T dc = dc_next + dh * o * (1.f - tc * tc);
  CellBackwardT<T> r;
  r.d_ao = dh * tc * o * (1.f - o);
  r.d_ai = dc * g * i * (1.f - i);
  r.d_ag = dc * i * (1.f - g * g);
  r.d_af = dc * c_prev * f * (1.f - f);
  r.dc_prev = dc * f;
  return r;
}


// One head row's loss term and, in place, the gradient of weight * (mean loss) with
// respect to its outputs z[0..O). The mean is over P head rows (and over the O outputs
// for MSE), so scale is 2 weight / (P O) for MSE and weight / P for cross-entropy.
// Shared by the CUDA kernels (lstm_segment.cu, lstm_persistent.cu).

// MSE: returns sum_k (z_k - y_k)^2 (double); z_k <- scale (z_k - y_k).
FPTT_LSTM_HD double mse_row(float* z, const float* y, int64_t O, float scale) {
  double total = 0.0;
  for (int64_t k = 0; k < O; ++k) {
    const float d = z[k] - y[k];
    total += double(d) * double(d);
    z[k] = scale * d;
  }
  return total;
}

// Cross-entropy of class y: returns logsumexp(z) - z_y (double); z_k <- scale
// (softmax_k - [k == y]). A class outside [0, O) poisons the row with NaN (no host-side
// check on the GPU paths: the non-finite gradient makes the FPTT update skip the step).
FPTT_LSTM_HD double ce_row(float* z, int64_t y, int64_t O, float scale) {
  if (y < 0 || y >= O) {
    for (int64_t k = 0; k < O; ++k) z[k] = nanf("");
    return double(nanf(""));
  }
  float m = z[0];
  for (int64_t k = 1; k < O; ++k) m = fmaxf(m, z[k]);
  double s = 0.0;
  for (int64_t k = 0; k < O; ++k) s += exp(double(z[k] - m));
  const double lse = double(m) + log(s);
  const double row = lse - double(z[y]);
  for (int64_t k = 0; k < O; ++k) {
    const float q = float(exp(double(z[k]) - lse));
    z[k] = scale * (q - (k == y ? 1.f : 0.f));
  }
  return row;
}

// The scales above, from the segment's weight and its number of head rows P.
FPTT_LSTM_HD float mse_scale(float weight, int64_t P, int64_t O) {
  return float(2.0 * double(weight) / double(P * O));
}
FPTT_LSTM_HD float ce_scale(float weight, int64_t P) { return float(double(weight) / double(P)); }

}  // namespace lstm
}  // namespace fptt
