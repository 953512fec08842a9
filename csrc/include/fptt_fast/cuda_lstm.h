// The LSTM segment step on CUDA (csrc/cuda/lstm_segment.cu, lstm_persistent.cu): a plain
// C++ API, no torch and no CUDA headers; streams are passed as void* (a cudaStream_t).
// Callers: csrc/cuda_glue/lstm_cuda.cpp. One FPTT training step of a single-layer LSTM
// (nn.LSTM gate order i, f, g, o) with a linear head on one segment, in ONE cooperative
// launch: forward, loss, backward, the six gradients (fixed-order sums, bitwise
// deterministic) and the fused FPTT update (docs/ALGORITHM.md, steps 2-6).
// Notation: T = omega (steps), B batch, I input size, H hidden size, O head outputs,
// G = 4H, P = rows of the head: B (terminal loss) or T*B (per-step loss).
// Design: docs/KERNELS.md#csrcincludefptt_fastcuda_lstmh
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "fptt_fast/cuda_kernels.h"
#include "fptt_fast/lstm_args.h"
#include "fptt_fast/lstm_math.h"

namespace fptt {
namespace cuda {

// Largest hidden size accepted. The kernel keeps no per-H state in shared memory or
// registers (h, c and the gates live in the global workspace, the recurrent products
// are per-thread dot products of length H or 4H read through L1/L2), so this is not a
// resource limit: it bounds the serial per-step work of one thread (O(H)) and the sizes
// tested. Sizes beyond it are refused (launch_lstm_segment returns cudaErrorInvalidValue
// and the glue raises an error naming this limit).
constexpr int64_t kLstmMaxHidden = 4096;

// Loss codes: lstm_math.h's (one definition for the CPU step and both CUDA kernels).
using LstmLoss = ::fptt::lstm::LossCode;
constexpr LstmLoss LSTM_LOSS_MSE = ::fptt::lstm::LOSS_MSE;
constexpr LstmLoss LSTM_LOSS_CE = ::fptt::lstm::LOSS_CE;

// One segment's inputs and outputs (device pointers): lstm_args.h, shared with the CPU step.
// Here H <= kLstmMaxHidden, and the kernels update the six parameters in place.
using LstmSegmentArgs = ::fptt::lstm::LstmSegmentArgs;

// Floats of scratch one segment needs (the layout is private to lstm_segment.cu):
// about T*B*(G + 2H) + P*(O + H + 2) + G*H + 2*B*H.
int64_t lstm_scratch_floats(int64_t T, int64_t B, int64_t I, int64_t H, int64_t O,
                            int per_step);

// The segment step and the FPTT update in one cooperative launch on `stream`.
// Asynchronous: no host synchronisation, allocation or memcpy (graph capturable).
//   args       the segment (above)
//   table      the update table of the six parameters, in the order of LstmSegmentArgs
//              (w = w_ih, w_hh, b_ih, b_hh, w_o, b_o; g = the matching gradient buffers),
//              with its scratch, built as for launch_fused_update (cuda_kernels.h);
//              an empty table (n_slots 0, status may be null): gradients only, no update
//              (a layer of a stack, args.skip_head / forward_only, takes no other)
//   optimizer  fptt::Optimizer code: 0 SGD, 1 Adam, 2 AdamW
//   clip       max global L2 norm; <= 0: no clipping
//   status     device float[3], as launch_fused_update's
//   device     CUDA device ordinal of every pointer (the current device)
//   stream     a cudaStream_t of that device, as void*
// Returns 0 (cudaSuccess) or a cudaError_t code (launch_error_string); an invalid size
// (H > kLstmMaxHidden, a size < 1) or pointer gives cudaErrorInvalidValue. Results do not
// depend on the grid size (halved on cudaErrorCooperativeLaunchTooLarge as the update's).
int launch_lstm_segment(const LstmSegmentArgs& args, const UpdateTable& table, int optimizer,
                        float clip, float* status, int device, void* stream);

// Blocks the segment kernel uses on `device` (max co-resident blocks), or a negative
// cudaError_t code. For tests and benchmarks.
int64_t lstm_segment_grid_size(int optimizer, int device);


// ---- The weight-stationary persistent kernel (csrc/cuda/lstm_persistent.cu) ---------------
// A whole batch of n_segs FPTT segments in ONE cooperative launch of thread-block clusters
// (sm_90+): W_hh stays in registers across each segment, one cluster barrier per time step,
// gradients accumulated on chip, the FPTT update between segments. For the shapes below;
// the general kernel above takes the rest.
constexpr int64_t kPersistMaxHidden = 128;  // a cluster of 8 CTAs x 16 hidden units
constexpr int kPersistMaxInput = 32;        // 2 inputs per k-slice thread
constexpr int kPersistMaxOutput = 32;       // head outputs held in shared memory

// How a batch is laid out on the device, or why it cannot be (error != 0).
struct PersistentPlan {
  int ok;                // 1: the persistent kernel takes this shape on this device
  int cluster;           // CTAs per cluster (1, 2, 4, 8): 16 hidden units each
  int max_rows;          // the kernel variant's batch rows per cluster (8 or 16)
  int rows_per_cluster;  // batch rows each cluster runs
  int clusters;          // clusters launched (all co-resident)
  int error;             // a cudaError_t code when !ok
};

// The plan for batch B, sizes I, H, O and an optimizer on `device` (cached queries; no
// work on any stream). !ok when a size exceeds the limits above, the device has no
// clusters or cooperative launch, or B exceeds 16 rows x the co-resident clusters.
PersistentPlan lstm_persistent_plan(int64_t B, int64_t I, int64_t H, int64_t O, int optimizer,
                                    int device);

// Floats of scratch a launch with segments of `omega` steps needs under `plan`.
int64_t lstm_persistent_scratch_floats(const PersistentPlan& plan, int64_t omega, int64_t B,
                                       int64_t I, int64_t H, int64_t O, int per_step);

// n_segs FPTT segments over args.T steps (segments of omega = ceil(T / n_segs) steps; it
// must hold that ceil(T / omega) == n_segs), each: forward from the carried state, head
// and loss, backward through the segment, gradients (written to args.g_*), clip and the
// FPTT update of `table` (as launch_lstm_segment), then the next segment from the updated
// weights. args.x is [T, B, I]; targets are args' terminal [B, ...] (every segment
// predicts it from its last state) or per-step [T, B, ...]; args.loss_out is [n_segs]
// (each segment's unweighted loss); h_out/c_out the state after the last segment.
// Segment p's loss is weighted (p + 1) / n_segs if weight_ramp, else args.weight.
// args.scratch holds lstm_persistent_scratch_floats(plan, omega, ...) floats.
// Asynchronous, no allocation or host sync (graph capturable). Returns 0 or a cudaError_t.
int launch_lstm_persistent(const LstmSegmentArgs& args, int64_t n_segs, int weight_ramp,
                           const PersistentPlan& plan, const UpdateTable& table, int optimizer,
                           float clip, float* status, int device, void* stream);

#ifdef FPTT_PERSISTENT_TUNING
// Tuning builds only (FPTT_FAST_TUNING=1): later launches write clock64 stamps of their
// phases (block 0) into `stamps`, a device array of lstm_persistent_profile_slots() int64
// (nullptr: off); experiment bits of lstm_persistent.cu (0: the real kernel).
int lstm_persistent_profile_slots();
void lstm_persistent_set_profile(long long* stamps);
void lstm_persistent_set_debug(int bits);
#endif

}  // namespace cuda
}  // namespace fptt
