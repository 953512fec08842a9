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
    const char* t = "FpttState";
    read(src, t, "params", &value.params);
    read(src, t, "grads", &value.grads);
    read(src, t, "w_bar", &value.w_bar);
    read(src, t, "lam", &value.lam);
    read(src, t, "exp_avg", &value.exp_avg);
    read(src, t, "exp_avg_sq", &value.exp_avg_sq);
    read(src, t, "step", &value.step);
    read_tensor(src, t, "hyper", &value.hyper);
    read(src, t, "group_of", &value.group_of);
    read(src, t, "optimizer", &value.optimizer);
    read(src, t, "clip", &value.clip);
    read_tensor(src, t, "status", &value.status);
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
    const char* t = "SegmentIO";
    read_tensor(src, t, "x", &value.x);
    read_tensor(src, t, "target", &value.target);
    read_tensor(src, t, "h0", &value.h0);
    read_tensor(src, t, "c0", &value.c0);
    read_tensor(src, t, "h_out", &value.h_out);
    read_tensor(src, t, "c_out", &value.c_out);
    read_tensor(src, t, "losses", &value.losses);
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
    const char* t = "SegmentConfig";
    read(src, t, "weight", &value.weight);
    read(src, t, "loss", &value.loss);
    read(src, t, "per_step", &value.per_step);
    read(src, t, "update", &value.update);
    read(src, t, "n_segs", &value.n_segs);
    read(src, t, "ramp", &value.ramp);
    read(src, t, "tf32", &value.tf32);
    read(src, t, "kernel", &value.kernel);
    read(src, t, "builtin_gemm", &value.builtin_gemm);
    return true;
  }
  static handle cast(const fptt::SegmentConfig&, return_value_policy, handle) {
    throw type_error("SegmentConfig does not convert back to Python");
  }
};

}  // namespace detail
}  // namespace pybind11
