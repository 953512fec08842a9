// Pointwise GRU math (nn.GRU conventions: gate order r, z, n; b_hn inside r's product),
// plain C++, __host__ __device__, no torch headers; templated on the activations as
// lstm_math.h's cell math is (the CPU step runs it on 8-float vectors).
//
// Forward of one element, from a_x = x W_ih^T + b_ih and a_h = h W_hh^T + b_hh:
//   r = sigmoid(ax_r + ah_r), z = sigmoid(ax_z + ah_z), n = tanh(ax_n + r ah_n),
//   h' = (1 - z) n + z h.
// Backward, given dh' (from the head, the next step and the layer above):
//   d an = dh' (1 - z) (1 - n^2)             (the gradient on ax_n)
//   d az = dh' (h - n) z (1 - z)             (on ax_z and ah_z)
//   d ar = d an ah_n r (1 - r)               (on ax_r and ah_r)
//   d ah_n = d an r;  dh (direct part) = dh' z  (plus [d ar, d az, d ah_n] W_hh).
#pragma once

#include "fptt_fast/lstm_math.h"  // FPTT_LSTM_HD, LibmMath

namespace fptt {
namespace gru {

template <class T>
struct GruForwardT {
  T r, z, n, h;
};

template <class M = lstm::LibmMath, class T = float>
FPTT_LSTM_HD GruForwardT<T> cell_forward(T ax_r, T ax_z, T ax_n, T ah_r, T ah_z, T ah_n,
                                         T h_prev) {
  GruForwardT<T> f;
  f.r = M::sigmoid(ax_r + ah_r);
  f.z = M::sigmoid(ax_z + ah_z);
  f.n = M::tanh(ax_n + f.r * ah_n);
  f.h = (1.f - f.z) * f.n + f.z * h_prev;
  return f;
}

template <class T>
struct GruBackwardT {
  T d_ar, d_az, d_an, d_ahn, dh_prev;  // dh_prev: the direct part, dh' z
};

// r, z, n: the step's gates; ah_n: its h W_hh^T + b_hh of the n block; h_prev: the state
// it read; dh: the total gradient on its output.
template <class T>
FPTT_LSTM_HD GruBackwardT<T> cell_backward(T r, T z, T n, T ah_n, T h_prev, T dh) {
  GruBackwardT<T> d;
  d.d_an = dh * (1.f - z) * (1.f - n * n);
  d.d_az = dh * (h_prev - n) * z * (1.f - z);
  d.d_ar = d.d_an * ah_n * r * (1.f - r);
  d.d_ahn = d.d_an * r;
  d.dh_prev = dh * z;
  return d;
}

}  // namespace gru
}  // namespace fptt
