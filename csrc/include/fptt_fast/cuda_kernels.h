// CUDA kernels of fptt_fast: a plain C++ API (no torch and no CUDA headers), so the
// torch glue (csrc/cuda_glue/*.cpp) and the .cu files agree on one description of
// the work. Streams are passed as void* (a cudaStream_t).
//
// The fused update is one cooperative kernel launch per optimiser step covering every
// tensor (a table of UpdateSlot): phase 1 per-chunk sums of squares, grid.sync(), phase 2
// the same fixed-order norm in every block, the clip and the update (docs/ALGORITHM.md,
// steps 2-6). A non-finite norm writes the status and leaves every other array untouched.
// Design: docs/KERNELS.md#csrcincludefptt_fastcuda_kernelsh
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "fptt_fast/update_slot.h"

namespace fptt {
namespace cuda {

// Elements per chunk: the unit of work and of the norm's partial sums. Fixed, so the
// summation order (hence the result, bit for bit) does not depend on the grid size,
// the GPU model, or the tensors' alignment.
constexpr int64_t kChunk = 4096;
// Threads per block of the fused kernel.
constexpr int kThreads = 256;

// The update slot (device pointers): update_slot.h, one definition for the CPU and CUDA
// kernels; chunk_begin numbers its chunks for the grid.
using UpdateSlot = ::fptt::UpdateSlot;

// Per-slot scalars saved in phase 1 and read in phase 2 (device scratch, see
// UpdateTable::scalars). Part of the API only so the glue can size the workspace.
struct SlotScalars {
  float step_before;  // the step count before this update
  float step_size;    // Adam: lr / (1 - beta1^t)
  float bc2_sqrt;     // Adam: sqrt(1 - beta2^t)
  float first;        // SGD: 1.0 on the first step (initialises the momentum buffer)
};

// Everything one launch needs besides optimizer, clip and status. All pointers are
// device pointers into memory that stays valid (and is not used by another launch
// running concurrently) until the launch has finished.
struct UpdateTable {
  const UpdateSlot* slots;  // [n_slots] the slot table
  int n_slots;              // >= 1
  int64_t n_chunks;         // total chunks = sum chunks_of(slots[i].n), >= n_slots
  SlotScalars* scalars;     // [n_slots] scratch, written in phase 1; no initialisation needed
  double* partials;         // [n_chunks] scratch, written in phase 1; no initialisation needed
};

// Chunks of a tensor of n elements: ceil(n / kChunk), and at least 1 (a 0-element tensor
// gets one empty chunk so that some block owns, and advances, its step count).
inline int64_t chunks_of(int64_t n) { return n <= 0 ? 1 : (n + kChunk - 1) / kChunk; }

// Byte offsets of the three parts of one contiguous device workspace holding a table:
// [slots | scalars | partials], each part 16-byte aligned. Returns the total size.
struct WorkspaceLayout {
  size_t slots_offset, scalars_offset, partials_offset, total_bytes;
};
inline WorkspaceLayout workspace_layout(int n_slots, int64_t n_chunks) {
  auto up16 = [](size_t x) { return (x + 15) & ~size_t(15); };
  WorkspaceLayout l;
  l.slots_offset = 0;
  l.scalars_offset = up16(sizeof(UpdateSlot) * size_t(n_slots));
  l.partials_offset = l.scalars_offset + up16(sizeof(SlotScalars) * size_t(n_slots));
  l.total_bytes = l.partials_offset + sizeof(double) * size_t(n_chunks);
  return l;
}

// docs/ALGORITHM.md steps 2-6 over all slots of `table`, in ONE cooperative kernel launch on
// `stream`. Asynchronous: no host synchronisation, no allocation, no memcpy, so it can
// be captured in a CUDA graph (the table's memory must then outlive the graph).
//   table      the slots and scratch (above), device memory of `device`
//   optimizer  fptt::Optimizer code: 0 SGD, 1 Adam, 2 AdamW
//   clip       max global L2 norm; <= 0: no clipping
//   status     device float[3]: [0] = the global norm of the regularised gradient
//              before clipping; [1] = 1.0 if the step was skipped (norm not finite)
//              else 0.0; [2] += 1.0 when skipped (a running count)
//   device     the CUDA device ordinal of every pointer (must be the current device)
//   stream     a cudaStream_t of that device, as void*
// Returns 0 (cudaSuccess) or a cudaError_t code (see launch_error_string); the launch
// itself only fails for invalid arguments, a device without cooperative launch, or a
// sticky CUDA error. If the device takes fewer co-resident blocks than the occupancy
// query promised (MPS, partitioned SMs: cudaErrorCooperativeLaunchTooLarge), the grid is
// halved until it fits and the smaller cap remembered; results do not depend on it.
int launch_fused_update(const UpdateTable& table, int optimizer, float clip, float* status,
                        int device, void* stream);

// The number of blocks launch_fused_update uses for a table of n_chunks chunks on
// `device`: min(n_chunks, max co-resident blocks = occupancy per SM x SMs). Returns a
// negative cudaError_t code on failure. For tests and benchmarks.
int64_t fused_update_grid_size(int64_t n_chunks, int optimizer, int device);

// cudaGetErrorString of a code returned above (static string).
const char* launch_error_string(int code);

}  // namespace cuda
}  // namespace fptt
