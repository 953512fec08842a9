// Pointwise LSTM math (nn.LSTM conventions, gate order i, f, g, o) shared by the CPU
// segment step and the CUDA kernels: plain C++, __host__ __device__, no torch headers.
//
// Forward of one cell element, from the pre-activations a = x W_ih^T + b_ih + h W_hh^T + b_hh:
//   i, f, o = sigmoid(a_i, a_f, a_o), g = tanh(a_g), c' = f c + i g, h' = o tanh(c').
// Backward, given dh' (from the head and the next step) and dc' (from the next step):
//   dc = dc' + dh' o (1 - tanh(c')^2), and the pre-activation gradients below.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define FPTT_LSTM_HD __host__ __device__ __forceinline__
#else
#define FPTT_LSTM_HD inline
#endif

namespace fptt {
namespace lstm {

// torch's sigmoid, written with exp (as the Triton interpreter must).
FPTT_LSTM_HD float sigmoidf_(float x) { return 1.f / (1.f + expf(-x)); }

// The activated gates and the new cell state and output of one element.
struct CellForward {
  float i, f, g, o, c, h;
};

FPTT_LSTM_HD CellForward cell_forward(float a_i, float a_f, float a_g, float a_o, float c_prev) {
  CellForward r;
  r.i = sigmoidf_(a_i);
  r.f = sigmoidf_(a_f);
  r.g = tanhf(a_g);
  r.o = sigmoidf_(a_o);
  r.c = r.f * c_prev + r.i * r.g;
  r.h = r.o * tanhf(r.c);
  return r;
}

// Gradients of one element w.r.t. the four pre-activations and the previous cell state.
struct CellBackward {
  float d_ai, d_af, d_ag, d_ao, dc_prev;
};

// i, f, g, o: activated gates of the step; c, c_prev: its new and previous cell state;
// dh: total gradient on its output h; dc_next: gradient on c from the following step.
FPTT_LSTM_HD CellBackward cell_backward(float i, float f, float g, float o, float c, float c_prev,
                                        float dh, float dc_next) {
  const float tc = tanhf(c);
  const float dc = dc_next + dh * o * (1.f - tc * tc);
  CellBackward r;
  r.d_ao = dh * tc * o * (1.f - o);
  r.d_ai = dc * g * i * (1.f - i);
  r.d_ag = dc * i * (1.f - g * g);
  r.d_af = dc * c_prev * f * (1.f - f);
  r.dc_prev = dc * f;
  return r;
}

}  // namespace lstm
}  // namespace fptt
