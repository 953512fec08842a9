// How many blocks of a cooperative kernel can be resident at once, per device and
// optimizer variant: shared by the cooperative kernels (fused_update.cu,
// lstm_segment.cu). Host code only; no torch headers.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <mutex>

#include "fptt_fast/fptt_math.h"

namespace fptt {
namespace cuda {

// The host pointer of a cooperative kernel's variant for `optimizer` (OPT_SGD, OPT_ADAM,
// OPT_ADAMW), or nullptr for an unknown code. Kernels: a struct whose
// `template <int OPT> static const void* ptr()` returns &kernel<OPT> (fused_update.cu,
// lstm_segment.cu each define one for their kernel template).
template <class Kernels>
const void* kernel_for_optimizer(int optimizer) {
  switch (optimizer) {
    case OPT_SGD: return Kernels::template ptr<OPT_SGD>();
    case OPT_ADAM: return Kernels::template ptr<OPT_ADAM>();
    case OPT_ADAMW: return Kernels::template ptr<OPT_ADAMW>();
    default: return nullptr;
  }
}

// A cache of the answer, queried once per (device, variant) with host-side calls that
// put no work on a stream, so later calls (e.g. while capturing a graph) query nothing.
// Errors come back as -cudaError_t.
class CoresidentCap {
 public:
  static constexpr int kMaxDevices = 64;
  static constexpr int kVariants = 3;  // OPT_SGD, OPT_ADAM, OPT_ADAMW

  int64_t get(const void* kernel, int variant, int device, int threads) {
    if (device < 0 || device >= kMaxDevices) return -int64_t(cudaErrorInvalidDevice);
    if (variant < 0 || variant >= kVariants || kernel == nullptr) return -int64_t(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> lock(mutex_);
    int64_t& cap = cap_[device][variant];
    if (cap > 0) return cap;
    int coop = 0, sms = 0, per_sm = 0;
    cudaError_t e = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
    if (e != cudaSuccess) return -int64_t(e);
    if (!coop) return -int64_t(cudaErrorNotSupported);
    e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (e != cudaSuccess) return -int64_t(e);
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
    if (e != cudaSuccess) return -int64_t(e);
    if (per_sm < 1 || sms < 1) return -int64_t(cudaErrorLaunchOutOfResources);
    cap = int64_t(per_sm) * int64_t(sms);
    return cap;
  }

  // Cooperative launch of `grid` blocks (at most get()'s answer). If the device runs
  // fewer at once than it reported (MPS, a partitioned context), clear the non-sticky
  // error, halve the grid until it fits and remember the smaller cap: our kernels'
  // results do not depend on the grid size (fixed chunks), so no bit changes.
  int launch(const void* kernel, int variant, int device, int64_t grid, int threads, void** args,
             cudaStream_t stream) {
    for (;;) {
      const cudaError_t e =
          cudaLaunchCooperativeKernel(kernel, dim3(unsigned(grid)), dim3(threads), args, 0, stream);
      if (e != cudaErrorCooperativeLaunchTooLarge || grid == 1) return int(e);
      (void)cudaGetLastError();
      grid = (grid + 1) / 2;
      std::lock_guard<std::mutex> lock(mutex_);
      cap_[device][variant] = grid;
    }
  }

 private:
  std::mutex mutex_;
  int64_t cap_[kMaxDevices][kVariants] = {};
};

}  // namespace cuda
}  // namespace fptt
