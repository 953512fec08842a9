// Torch glue of the LSTM segment step on CUDA (csrc/cuda/lstm_segment.cu and
// lstm_persistent.cu): checks, the cached device workspace (update slot table + scratch),
// and the one cooperative launch on torch's current stream. Built only with FPTT_WITH_CUDA;
// registry.h calls register_lstm_cuda(m). Contracts: a steady-state step with the update
// allocates, copies and syncs nothing (the gradients launch, config.update false, takes its
// scratch from torch's caching allocator per call); a cache miss while capturing a CUDA graph raises; one model's
// steps must not run concurrently on two streams.
// Design: docs/KERNELS.md#csrccuda_gluelstm_cudacpp
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <list>
#include <mutex>
#include <vector>

#include "fptt_fast/cuda_kernels.h"
#include "fptt_fast/cuda_lstm.h"
#include "fptt_fast/fptt_math.h"
#include "fptt_fast/registry.h"
#include "fptt_fast/lstm_checks.h"
#include "fptt_fast/seam_cast.h"
#include "glue_common.h"

namespace fptt {
namespace {

struct LstmEntry {
  std::vector<int64_t> key;
  at::Tensor table_ws;                  // device uint8: [slots | scalars | partials]
  at::Tensor scratch;                   // device float32, lstm_scratch_floats(...) or more
  cuda::UpdateTable table;              // device pointers into table_ws
  // Streams each tensor was allocated on or recorded on (record_stream tells the caching
  // allocator to wait for their work before reusing the memory once it is freed).
  std::vector<c10::StreamId> table_streams, scratch_streams;
  bool keep = false;                    // referenced by a captured CUDA graph
  std::vector<at::Tensor> retired;      // scratches replaced after a capture (a graph holds them)
  uint64_t last_use = 0;
};

using glue::fptr;

constexpr size_t kMaxEntries = 8;
std::mutex g_mutex;
std::list<LstmEntry> g_cache;  // glue_common.h: a list, entries never move
uint64_t g_clock = 0;


// Kernel choice of lstm_train_cuda.
enum KernelMode { KERNEL_AUTO = 0, KERNEL_GENERAL = 1, KERNEL_PERSISTENT = 2 };

// The plan of the persistent kernel for these sizes (cuda_lstm.h), or why not.
cuda::PersistentPlan persistent_plan(int64_t B, int64_t I, int64_t H, int64_t O,
                                     int64_t optimizer, int device) {
  return cuda::lstm_persistent_plan(B, I, H, O, int(optimizer), device);
}

// One segment's gradients on the general kernel, without the update (config.update
// false): data-parallel training all-reduces them first; the layers of a stack (config.head
// false, forward_only) are updated together by the optimiser. Scratch from torch's caching
// allocator, per call (stream-ordered); no update table. Returns KERNEL_GENERAL.
int64_t lstm_gradients_cuda(const char* fn, const FpttState& state, const SegmentIO& segment,
                            const SegmentConfig& config) {
  const checks::LstmDims d =
      checks::check_lstm_gradients_cuda_args(fn, state, segment, config, at::kCUDA);
  const c10::Device device = segment.x.device();
  c10::cuda::CUDAGuard guard(device);
  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream(device.index());
  const bool per_step = config.per_step && config.head;
  at::Tensor scratch =
      at::empty({cuda::lstm_scratch_floats(d.T, d.B, d.I, d.H, d.O, per_step ? 1 : 0)},
                at::TensorOptions().dtype(at::kFloat).device(device));
  cuda::LstmSegmentArgs a = checks::segment_args(segment.x, segment.h0, segment.c0, segment,
                                                 state.params, state.grads, d, config);
  a.h_out = fptr(segment.h_out);
  a.c_out = fptr(segment.c_out);
  a.loss_out = fptr(segment.losses);
  a.scratch = fptr(scratch);
  // an empty table: the kernel stops after the gradients (any optimizer code: none runs)
  const int rc = cuda::launch_lstm_segment(a, cuda::UpdateTable{}, int(OPT_SGD), 0.f, nullptr,
                                           device.index(), static_cast<void*>(stream.stream()));
  FPTT_CHECK(rc == 0, fn, ": kernel launch failed: ", cuda::launch_error_string(rc),
              " (cuda error ", rc, ")");
  return KERNEL_GENERAL;
}

// config.n_segs FPTT segments over segment.x [T, B, I] (segments of ceil(T / n_segs)
// steps, the state carried): one launch of the persistent kernel when config.kernel allows
// and the shape fits (cuda_lstm.h), else one launch of the general kernel per segment.
// Returns the kernel that ran (KERNEL_GENERAL or KERNEL_PERSISTENT). Segment p's loss
// weighs (p + 1) / n_segs with config.ramp, else config.weight; segment.losses [n_segs]
// gets each segment's unweighted loss; h_out, c_out the final state; state.status as the
// fused update's. config.update false: lstm_gradients_cuda (one segment, no update).
int64_t lstm_train_cuda(const FpttState& state, const SegmentIO& segment,
                        const SegmentConfig& config) {
  const char* fn = "lstm_train_cuda";
  if (!config.update) return lstm_gradients_cuda(fn, state, segment, config);
  const int64_t mode = config.kernel;
  FPTT_CHECK(mode >= KERNEL_AUTO && mode <= KERNEL_PERSISTENT, fn,
              ": config.kernel must be 0 (auto), 1 (general) or 2 (persistent), got ", mode);
  // Every check before any data pointer is taken or any list element is indexed
  // (lstm_checks.h: torch-only code, run on CPU CI by tests/csrc/check_bindings.cpp): tf32
  // first, then x, weight_hh (H <= kLstmMaxHidden), head.weight, every other tensor's
  // device, dtype, contiguity and shape, the state's lists, codes and group indices,
  // n_segs, and no output overlapping another argument.
  const checks::LstmDims dims =
      checks::check_lstm_segment_cuda_args(fn, state, segment, config, at::kCUDA);
  const at::Tensor& x = segment.x;
  const int64_t n_segs = config.n_segs;
  const int64_t optimizer = state.optimizer;
  const bool per_step = config.per_step;
  const c10::Device device = x.device();
  const int64_t T = dims.T, B = dims.B, I = dims.I, H = dims.H, O = dims.O;
  const int64_t omega = (T + n_segs - 1) / n_segs;

  c10::cuda::CUDAGuard guard(device);
  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream(device.index());
  glue::SlotTable t = glue::make_slot_table(state, device.index());
  cuda::PersistentPlan plan = {};
  if (mode != KERNEL_GENERAL) {
    plan = persistent_plan(B, I, H, O, optimizer, device.index());
    FPTT_CHECK(plan.ok || mode == KERNEL_AUTO,
                "lstm_train_cuda: the persistent kernel cannot take B=", B, ", I=", I, ", H=", H,
                ", O=", O, " on this device (limits: H <= ", cuda::kPersistMaxHidden,
                ", I <= ", cuda::kPersistMaxInput, ", O <= ", cuda::kPersistMaxOutput,
                ", B <= 16 x the co-resident clusters; sm_90+): ",
                cuda::launch_error_string(plan.error));
  }
  const bool persistent = plan.ok != 0;
  const int64_t need =
      persistent ? cuda::lstm_persistent_scratch_floats(plan, omega, B, I, H, O, per_step ? 1 : 0)
                 : cuda::lstm_scratch_floats(omega, B, I, H, O, per_step ? 1 : 0);

  const bool capturing = glue::stream_is_capturing(stream.stream());
  std::lock_guard<std::mutex> lock(g_mutex);
  LstmEntry* entry = glue::find_entry(g_cache, t.key);
  if (entry == nullptr) {
    FPTT_CHECK(!capturing,
                "lstm_segment_step_cuda: the parameters, gradients, state or hyper-parameter "
                "table changed while capturing a CUDA graph; run one step eagerly (warm-up) "
                "with the same tensors and shapes before capturing");
    entry = &glue::insert_entry(g_cache, kMaxEntries, std::move(t), device, stream);
  }
  if (!entry->scratch.defined() || entry->scratch.numel() < need) {
    FPTT_CHECK(!capturing,
                "lstm_segment_step_cuda: a larger segment shape while capturing a CUDA graph; "
                "run one step eagerly with the largest shape before capturing");
    // The old scratch (if any) is freed here, unless a captured graph uses it; the caching
    // allocator reuses its memory only after the work of the streams it was allocated or
    // recorded on.
    if (entry->keep && entry->scratch.defined()) entry->retired.push_back(entry->scratch);
    entry->scratch = at::empty({need}, at::TensorOptions().dtype(at::kFloat).device(device));
    entry->scratch_streams.assign(1, stream.id());
  }
  entry->last_use = ++g_clock;
  if (capturing) {
    entry->keep = true;
  } else {  // freeing them later must wait for this stream's work
    glue::record_once(entry->table_ws, entry->table_streams, stream);
    glue::record_once(entry->scratch, entry->scratch_streams, stream);
  }

  cuda::LstmSegmentArgs a = checks::segment_args(x, segment.h0, segment.c0, segment,
                                                 state.params, state.grads, dims, config);
  a.h_out = fptr(segment.h_out);
  a.c_out = fptr(segment.c_out);
  a.loss_out = fptr(segment.losses);
  a.scratch = fptr(entry->scratch);
  float* st = state.status.data_ptr<float>();
  const float clip = float(state.clip);
  void* strm = static_cast<void*>(stream.stream());

  if (persistent) {
    const int rc = cuda::launch_lstm_persistent(a, n_segs, config.ramp ? 1 : 0, plan,
                                                entry->table, int(optimizer), clip, st,
                                                device.index(), strm);
    FPTT_CHECK(rc == 0, "lstm_train_cuda: persistent kernel launch failed: ",
                cuda::launch_error_string(rc), " (cuda error ", rc, ")");
    return KERNEL_PERSISTENT;
  }
  // The general kernel, one launch per segment: x and per-step targets advance by the
  // segment's steps; the state leaves through h_out/c_out, which may alias h0/c0.
  for (int64_t p = 0; p < n_segs; ++p) {
    const int64_t t0 = p * omega, Tp = std::min(omega, T - t0);
    cuda::LstmSegmentArgs sa = a;
    sa.T = Tp;
    sa.x = a.x + t0 * B * I;
    if (per_step) {
      if (sa.target_f) sa.target_f += t0 * B * O;
      if (sa.target_i) sa.target_i += t0 * B;
    }
    sa.weight = config.ramp ? float(double(p + 1) / double(n_segs)) : float(config.weight);
    if (p > 0) {
      sa.h0 = a.h_out;
      sa.c0 = a.c_out;
    }
    sa.loss_out = a.loss_out + p;
    const int rc = cuda::launch_lstm_segment(sa, entry->table, int(optimizer), clip, st,
                                             device.index(), strm);
    FPTT_CHECK(rc == 0, "lstm_train_cuda: kernel launch failed: ",
                cuda::launch_error_string(rc), " (cuda error ", rc, ")");
  }
  return KERNEL_GENERAL;
}

// One segment on the general kernel (config.n_segs 1, config.kernel general).
void lstm_segment_step_cuda(const FpttState& state, const SegmentIO& segment,
                            SegmentConfig config) {
  FPTT_CHECK(config.n_segs == 1 && !config.ramp, "lstm_segment_step_cuda: one segment: "
              "config.n_segs must be 1 and config.ramp False (lstm_train_cuda runs several)");
  config.kernel = KERNEL_GENERAL;
  lstm_train_cuda(state, segment, config);
}

#ifdef FPTT_PERSISTENT_TUNING
// Tuning only: the persistent kernel's launches write clock64 stamps of their phases into
// `stamps` (int64 CUDA [lstm_persistent_profile_slots()]); None turns it off.
at::Tensor g_profile_stamps;
void lstm_persistent_profile_cuda(c10::optional<at::Tensor> stamps) {
  if (!stamps.has_value() || !stamps->defined()) {
    cuda::lstm_persistent_set_profile(nullptr);
    g_profile_stamps = at::Tensor();
    return;
  }
  const at::Tensor& t = *stamps;
  FPTT_CHECK(t.is_cuda() && t.scalar_type() == at::kLong && t.is_contiguous() &&
                  t.numel() >= cuda::lstm_persistent_profile_slots(),
              "stamps must be a contiguous int64 CUDA tensor of at least ",
              cuda::lstm_persistent_profile_slots(), " elements");
  g_profile_stamps = t;  // kept alive while the kernel may write it
  cuda::lstm_persistent_set_profile(reinterpret_cast<long long*>(t.data_ptr<int64_t>()));
}
#endif  // FPTT_PERSISTENT_TUNING

// Which kernel lstm_train_cuda's auto mode runs for these sizes: (persistent?, cluster
// size, rows per cluster, clusters, reason when not).
pybind11::tuple lstm_persistent_plan_cuda(int64_t B, int64_t I, int64_t H, int64_t O,
                                          int64_t optimizer, int64_t device) {
  const cuda::PersistentPlan p = persistent_plan(B, I, H, O, optimizer, int(device));
  return pybind11::make_tuple(bool(p.ok), p.cluster, p.rows_per_cluster, p.clusters,
                              p.ok ? std::string() : std::string(cuda::launch_error_string(p.error)));
}

int64_t lstm_grid_size_cuda(int64_t optimizer, int64_t device) {
  const int64_t g = cuda::lstm_segment_grid_size(int(optimizer), int(device));
  FPTT_CHECK(g > 0, "lstm_segment_grid_size failed: ", cuda::launch_error_string(int(-g)));
  return g;
}

}  // namespace

void register_lstm_cuda(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("lstm_segment_step_cuda", &lstm_segment_step_cuda,
        "One FPTT LSTM segment step on CUDA tensors in one cooperative kernel launch: forward "
        "over the segment, head and loss, backward, the six gradients (written to "
        "state.grads) and the fused FPTT update. Writes segment.h_out, c_out, losses "
        "(unweighted loss) and state.status on the device; never syncs.",
        py::arg("state"), py::arg("segment"), py::arg("config"));
  m.def("lstm_train_cuda", &lstm_train_cuda,
        "config.n_segs FPTT segments of an LSTM on CUDA tensors: one launch of the persistent "
        "weight-stationary kernel (config.kernel 0 auto or 2) or one general launch per "
        "segment (1, or auto for shapes beyond the persistent kernel). Returns the kernel "
        "that ran (1 general, 2 persistent); never syncs.",
        py::arg("state"), py::arg("segment"), py::arg("config"));
  m.def("lstm_persistent_plan_cuda", &lstm_persistent_plan_cuda,
        "(persistent?, cluster size, rows per cluster, clusters, reason) of the persistent LSTM "
        "kernel for (B, I, H, O, optimizer code, device)",
        pybind11::arg("B"), pybind11::arg("I"), pybind11::arg("H"), pybind11::arg("O"),
        pybind11::arg("optimizer"), pybind11::arg("device"));
  m.attr("cuda_persist_max_hidden") = pybind11::int_(cuda::kPersistMaxHidden);
#ifdef FPTT_PERSISTENT_TUNING
  m.def("_lstm_persistent_profile", &lstm_persistent_profile_cuda,
        "tuning only: record phase stamps of later persistent-kernel launches into an int64 "
        "CUDA tensor (None: off)", pybind11::arg("stamps"));
  m.def("_lstm_persistent_debug", [](int64_t bits) { cuda::lstm_persistent_set_debug(int(bits)); },
        "tuning only: experiment bits of the persistent kernel (0: the real kernel; others "
        "compute wrong results)", pybind11::arg("bits"));
  m.attr("_lstm_persistent_profile_slots") = pybind11::int_(cuda::lstm_persistent_profile_slots());
#endif
  m.def("lstm_segment_cuda_grid_size", &lstm_grid_size_cuda,
        "blocks of the one-launch CUDA LSTM segment kernel (optimizer code, device)",
        pybind11::arg("optimizer"), pybind11::arg("device"));
  m.attr("cuda_lstm_max_hidden") = pybind11::int_(cuda::kLstmMaxHidden);
}

}  // namespace fptt
