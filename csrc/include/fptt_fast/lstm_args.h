// One LSTM segment's sizes, inputs and outputs as the kernels take them: the one struct
// for the CPU step (csrc/cpu/lstm_segment.cpp) and both CUDA kernels (lstm_segment.cu,
// lstm_persistent.cu). Plain C++, no torch or CUDA headers. Pointers are host pointers
// for the CPU step and device pointers for CUDA; contiguous row-major fp32 unless said
// otherwise. None of the outputs may alias an input, except h_out/c_out may alias h0/c0
// (they are written after h0/c0 are read).
#pragma once

#include <stdint.h>

namespace fptt {
namespace lstm {

struct LstmSegmentArgs {
  int64_t T, B, I, H, O;      // steps, batch, input, hidden, output sizes (all >= 1)
  int loss;                   // LossCode (lstm_math.h)
  int per_step;               // 1: loss = mean over the steps of the per-step losses,
                              // 0: the loss of the last step's head output (terminal)
  float weight;               // the gradients are those of weight * loss
  const float* x;             // [T, B, I]
  const float* target_f;      // mse: [B, O], per_step [T, B, O]; nullptr for ce
  const int64_t* target_i;    // ce: [B], per_step [T, B], classes in [0, O) (CUDA: an
                              // out-of-range class makes its row's loss and gradients NaN,
                              // so the update is skipped as non-finite); nullptr for mse
  const float* h0;            // [B, H] state entering the segment (treated as a constant)
  const float* c0;            // [B, H]
  float* w_ih;                // [G, I]  weight_ih_l0   (G = 4H; nn.LSTM / nn.Linear layouts;
  float* w_hh;                // [G, H]  weight_hh_l0    the CUDA kernels update them in place
  float* b_ih;                // [G]     bias_ih_l0      with the fused FPTT update, the CPU
  float* b_hh;                // [G]     bias_hh_l0      step only reads them: its binding
  float* w_o;                 // [O, H]  head.weight     runs the update after it)
  float* b_o;                 // [O]     head.bias
  float* g_w_ih;              // [G, I]  gradient buffers, overwritten with the task
  float* g_w_hh;              // [G, H]  gradients of weight * loss (CUDA: the update
  float* g_b_ih;              // [G]     table's g pointers must be these six)
  float* g_b_hh;              // [G]
  float* g_w_o;               // [O, H]
  float* g_b_o;               // [O]
  float* h_out;               // [B, H]  state leaving the segment
  float* c_out;               // [B, H]
  float* loss_out;            // CUDA: [1] (the persistent kernel: [segments]) unweighted
                              // segment loss; the CPU step returns it instead (unused)
  float* scratch;             // CPU: lstm_segment_workspace_floats(...) floats; CUDA:
                              // lstm_scratch_floats / the persistent kernel's layout,
                              // 16-byte aligned; no initialisation needed
  // A layer of a stack (the general kernels only; zero/null: a one-layer segment):
  int skip_head;              // 1: no head and no loss (w_o, b_o, their gradients, target
                              // and O unused; loss 0); the gradient on the outputs is dh_seq
  int forward_only;           // 1: the forward alone: h_out, c_out, h_seq; no gradients
  const float* dh_seq;        // [T, B, H] with skip_head: the gradient on every step's h
  float* dx;                  // [T, B, I] or null: written with the gradient on x (dG W_ih)
  float* h_seq;               // [T, B, H] or null: written with every step's h
};

}  // namespace lstm
}  // namespace fptt
