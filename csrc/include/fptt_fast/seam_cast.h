// pybind11 conversions of seam.h's structs from their Python twins (fptt_fast/seam.py):
// any object with the struct's field names as attributes converts, field by field, so a
// binding argument declared FpttState, SegmentIO or SegmentConfig takes the twin. A field
// of the wrong type raises TypeError naming it. Conversion only (nothing goes back).
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

#include "fptt_fast/seam.h"

namespace fptt {
namespace seam_detail {

namespace py = pybind11;

template <typename T>
void read(py::handle src, const char* type, const char* field, T* out) {
  py::object v = py::getattr(src, field);
  try {
    *out = v.cast<T>();
  } catch (const py::cast_error&) {
    throw py::type_error(std::string(type) + "." + field + " has the wrong type (" +
                         std::string(py::str(py::type::of(v).attr("__name__"))) + ")");
  }
}

// An optional tensor: None leaves it undefined.
inline void read_tensor(py::handle src, const char* type, const char* field, at::Tensor* out) {
  py::object v = py::getattr(src, field);
  if (v.is_none()) {
    *out = at::Tensor();
    return;
  }
  read(src, type, field, out);
}

// One field: a tensor may be None, anything else must convert.
template <typename T>
void read_field(py::handle src, const char* type, const char* field, T* out) {
  read(src, type, field, out);
}
inline void read_field(py::handle src, const char* type, const char* field, at::Tensor* out) {
  read_tensor(src, type, field, out);
}

// A struct's fields by name: fields("x", &S::x, "y", &S::y, ...) read into `value`.
template <typename S>
void read_fields(py::handle, const char*, S&) {}
template <typename S, typename M, typename... Rest>
void read_fields(py::handle src, const char* type, S& value, const char* name, M S::*member,
                 Rest... rest) {
  read_field(src, type, name, &(value.*member));
  read_fields(src, type, value, rest...);
}

}  // namespace seam_detail
}  // namespace fptt

namespace pybind11 {
namespace detail {

template <>
struct type_caster<fptt::FpttState> {
  PYBIND11_TYPE_CASTER(fptt::FpttState, const_name("FpttState"));
  bool load(handle src, bool) {
    using namespace fptt::seam_detail;
    if (!hasattr(src, "w_bar")) return false;
    using S = fptt::FpttState;
    read_fields(src, "FpttState", value, "params", &S::params, "grads", &S::grads, "w_bar",
                &S::w_bar, "lam", &S::lam, "exp_avg", &S::exp_avg, "exp_avg_sq",
                &S::exp_avg_sq, "step", &S::step, "hyper", &S::hyper, "group_of", &S::group_of,
                "optimizer", &S::optimizer, "clip", &S::clip, "status", &S::status);
    return true;
  }
  static handle cast(const fptt::FpttState&, return_value_policy, handle) {
    throw type_error("FpttState does not convert back to Python");
  }
};

template <>
struct type_caster<fptt::SegmentIO> {
  PYBIND11_TYPE_CASTER(fptt::SegmentIO, const_name("SegmentIO"));
  bool load(handle src, bool) {
    using namespace fptt::seam_detail;
    if (!hasattr(src, "h0")) return false;
    using S = fptt::SegmentIO;
    read_fields(src, "SegmentIO", value, "x", &S::x, "target", &S::target, "h0", &S::h0, "c0",
                &S::c0, "h_out", &S::h_out, "c_out", &S::c_out, "losses", &S::losses, "dh_seq",
                &S::dh_seq, "dx", &S::dx, "h_seq", &S::h_seq);
    return true;
  }
  static handle cast(const fptt::SegmentIO&, return_value_policy, handle) {
    throw type_error("SegmentIO does not convert back to Python");
  }
};

template <>
struct type_caster<fptt::SegmentConfig> {
  PYBIND11_TYPE_CASTER(fptt::SegmentConfig, const_name("SegmentConfig"));
  bool load(handle src, bool) {
    using namespace fptt::seam_detail;
    if (!hasattr(src, "n_segs")) return false;
    using S = fptt::SegmentConfig;
    read_fields(src, "SegmentConfig", value, "weight", &S::weight, "loss", &S::loss, "per_step",
                &S::per_step, "update", &S::update, "n_segs", &S::n_segs, "ramp", &S::ramp,
                "tf32", &S::tf32, "kernel", &S::kernel, "builtin_gemm", &S::builtin_gemm,
                "head", &S::head, "forward_only", &S::forward_only);
    return true;
  }
  static handle cast(const fptt::SegmentConfig&, return_value_policy, handle) {
    throw type_error("SegmentConfig does not convert back to Python");
  }
};

}  // namespace detail
}  // namespace pybind11
