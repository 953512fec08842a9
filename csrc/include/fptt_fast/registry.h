// Registration functions of fptt_fast._C, one per binding file.
#pragma once

#include <torch/extension.h>

namespace fptt {

void register_update_cpu(pybind11::module_& m);   // csrc/bind_update.cpp
void register_lstm_cpu(pybind11::module_& m);     // csrc/bind_lstm.cpp
void register_gru_cpu(pybind11::module_& m);      // csrc/bind_gru.cpp
#ifdef FPTT_WITH_CUDA
void register_update_cuda(pybind11::module_& m);  // csrc/cuda_glue/update_cuda.cpp
void register_lstm_cuda(pybind11::module_& m);    // csrc/cuda_glue/lstm_cuda.cpp
#endif

inline void register_all(pybind11::module_& m) {
  register_update_cpu(m);
  register_lstm_cpu(m);
  register_gru_cpu(m);
#ifdef FPTT_WITH_CUDA
  register_update_cuda(m);
  register_lstm_cuda(m);
#endif
}

}  // namespace fptt
