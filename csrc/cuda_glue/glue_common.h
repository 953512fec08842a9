// Host-side pieces shared by the two CUDA glue files (update_cuda.cpp: the fused optimiser;
// lstm_cuda.cpp: the LSTM kernels, whose FPTT update runs on the same slot table): the
// slot table and its cache key, its upload to one device buffer (cuda_kernels.h's
// WorkspaceLayout), and the small LRU caches of uploaded tables. Each glue file keeps its
// own cache. Torch headers: glue only (never included by .cu files).
// Design: docs/KERNELS.md#csrccuda_glueglue_commonh
#pragma once

#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <list>
#include <vector>

#include "fptt_fast/cuda_kernels.h"
#include "fptt_fast/fptt_math.h"
#include "fptt_fast/update_slots.h"

namespace fptt {
namespace glue {

inline float* fptr(const at::Tensor& t) { return t.data_ptr<float>(); }

inline bool stream_is_capturing(cudaStream_t s) {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(s, &st));
  return st != cudaStreamCaptureStatusNone;
}

struct SlotTable {
  std::vector<cuda::UpdateSlot> slots;
  std::vector<int64_t> key;  // device, sgd, then per slot its 8 pointers and its size
};

// The update slots (update_slots.h) and the cache key that identifies them: device,
// optimiser family, every slot's pointers and size.
inline SlotTable make_slot_table(const FpttState& state, int device_index) {
  SlotTable t;
  const bool sgd = state.sgd();
  t.slots = update_slots(state);
  t.key.reserve(2 + 9 * t.slots.size());
  t.key.push_back(device_index);
  t.key.push_back(sgd);
  for (const cuda::UpdateSlot& s : t.slots) {
    for (const void* p : {(const void*)s.w, (const void*)s.g, (const void*)s.w_bar,
                          (const void*)s.lam, (const void*)s.s1, (const void*)s.s2,
                          (const void*)s.step, (const void*)s.hyper})
      t.key.push_back(int64_t(reinterpret_cast<intptr_t>(p)));
    t.key.push_back(s.n);
  }
  return t;
}

struct UploadedTable {
  at::Tensor ws;        // device uint8 [WorkspaceLayout::total_bytes]
  cuda::UpdateTable table;  // device pointers into ws
};

// Numbers the slots' chunks and copies the table to a new device buffer, on the current
// stream (through pinned staging, asynchronously: the stream orders it before the kernel).
inline UploadedTable upload_slot_table(std::vector<cuda::UpdateSlot>& slots,
                                       const c10::Device& device) {
  const int n_slots = int(slots.size());
  int64_t n_chunks = 0;
  for (auto& s : slots) {
    s.chunk_begin = n_chunks;
    n_chunks += cuda::chunks_of(s.n);
  }
  const cuda::WorkspaceLayout L = cuda::workspace_layout(n_slots, n_chunks);
  const size_t table_bytes = sizeof(cuda::UpdateSlot) * size_t(n_slots);
  at::Tensor staging = at::empty({int64_t(table_bytes)},
                                 at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(staging.data_ptr(), slots.data(), table_bytes);
  UploadedTable u;
  u.ws = at::empty({int64_t(L.total_bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
  u.ws.narrow(0, int64_t(L.slots_offset), int64_t(table_bytes)).copy_(staging, /*non_blocking=*/true);
  uint8_t* base = static_cast<uint8_t*>(u.ws.data_ptr());
  u.table.slots = reinterpret_cast<const cuda::UpdateSlot*>(base + L.slots_offset);
  u.table.n_slots = n_slots;
  u.table.n_chunks = n_chunks;
  u.table.scalars = reinterpret_cast<cuda::SlotScalars*>(base + L.scalars_offset);
  u.table.partials = reinterpret_cast<double*>(base + L.partials_offset);
  return u;
}

// The cache entry with this key, or nullptr. Entry: a struct with `key`.
template <class Entry>
Entry* find_entry(std::list<Entry>& cache, const std::vector<int64_t>& key) {
  for (auto& e : cache)
    if (e.key == key) return &e;
  return nullptr;
}

// Makes room for one more entry in a cache of at most max_entries: evicts the least
// recently used entry that no captured CUDA graph holds (Entry: `keep`, `last_use`). A
// list: entries never move, so table pointers handed to kernels stay valid.
template <class Entry>
void evict_for_one_more(std::list<Entry>& cache, size_t max_entries) {
  if (cache.size() < max_entries) return;
  auto victim = cache.end();
  for (auto it = cache.begin(); it != cache.end(); ++it)
    if (!it->keep && (victim == cache.end() || it->last_use < victim->last_use)) victim = it;
  if (victim != cache.end()) cache.erase(victim);
}

// Uploads t's table and puts a new entry for it at the front of the cache (evicting one if
// the cache is full). Entry: `key`, `table`, `table_ws`, `table_streams`, `keep`, `last_use`.
template <class Entry>
Entry& insert_entry(std::list<Entry>& cache, size_t max_entries, SlotTable&& t,
                    const c10::Device& device, const at::cuda::CUDAStream& stream) {
  UploadedTable u = upload_slot_table(t.slots, device);
  evict_for_one_more(cache, max_entries);
  Entry e;
  e.key = std::move(t.key);
  e.table_ws = u.ws;
  e.table = u.table;
  e.table_streams.push_back(stream.id());
  cache.push_front(std::move(e));
  return cache.front();
}

// t is used on `stream`: unless it was allocated or already recorded there (`seen`), tell
// the caching allocator, so that freeing t later waits for this stream's work.
inline void record_once(at::Tensor& t, std::vector<c10::StreamId>& seen,
                        const at::cuda::CUDAStream& stream) {
  if (std::find(seen.begin(), seen.end(), stream.id()) != seen.end()) return;
  t.record_stream(stream);
  seen.push_back(stream.id());
}

}  // namespace glue
}  // namespace fptt
