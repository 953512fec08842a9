// Error messages of fptt_fast._C, built without iostreams: FPTT_CHECK(cond, parts...),
// used by every binding's checks (update_checks.h, lstm_checks.h) and the glue.
// Contract: the message is assembled with std::to_string / snprintf (no locale facets) and
// TORCH_CHECK receives ONE std::string, built only when the check fails: TORCH_CHECK's own
// stream formatting crashes the process on the GPU image. tests/test_cuda_sources.py keeps
// other TORCH_CHECK messages and stream operator<< out of csrc/.
// Design: docs/KERNELS.md#csrcincludefptt_fasterror_messageh
#pragma once

#include <c10/core/Device.h>
#include <c10/core/Layout.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>

namespace fptt {
namespace msg {

inline void put(std::string& s, const char* v) { s += v ? v : "(null)"; }
inline void put(std::string& s, const std::string& v) { s += v; }
inline void put(std::string& s, char v) { s += v; }
inline void put(std::string& s, bool v) { s += v ? "true" : "false"; }
template <class T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                        !std::is_same_v<T, char>,
                                    int> = 0>
inline void put(std::string& s, T v) {
  s += std::to_string(v);
}
inline void put(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  s += buf;
}
inline void put(std::string& s, float v) { put(s, double(v)); }
// shapes and strides as torch prints them: [2, 3]
inline void put(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
inline void put(std::string& s, const c10::Device& d) { s += d.str(); }  // "cuda:0"
inline void put(std::string& s, c10::Layout l) {
  s += l == c10::kStrided ? "Strided" : l == c10::kSparse ? "Sparse" : "non-strided";
}

template <class... Parts>
std::string cat(const Parts&... parts) {
  std::string s;
  (put(s, parts), ...);
  return s;
}

}  // namespace msg
}  // namespace fptt

// TORCH_CHECK (a c10::Error, i.e. a Python RuntimeError) with an iostream-free message.
#define FPTT_CHECK(cond, ...) TORCH_CHECK(cond, ::fptt::msg::cat(__VA_ARGS__))
