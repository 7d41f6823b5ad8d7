// Shared helpers for the CPU kernels: input checks, vector load/store in float32 (or float64) whatever the
// storage dtype, and the label-range error raised as a Python ValueError.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>

namespace spa {

// Accumulation type: float64 stays float64 (used for gradcheck-style tests), everything else accumulates in float32.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename AccType<scalar_t>::type;

// Load / store one vector's worth of elements as acc_t, converting from/to the storage dtype.
template <typename scalar_t>
struct VecIO {
  using A = acc_t<scalar_t>;
  using Vec = at::vec::Vectorized<A>;
  static inline Vec load(const scalar_t* p) {
    return Vec::loadu(p);
  }
  static inline void store(scalar_t* p, const Vec& v) {
    v.store(p);
  }
};

template <typename reduced_t>
struct VecIOReduced {
  using Vec = at::vec::Vectorized<float>;
  static inline Vec load(const reduced_t* p) {
    Vec out;
    at::vec::load_to_float<reduced_t>(p, out);
    return out;
  }
  static inline void store(reduced_t* p, const Vec& v) {
    auto packed = at::vec::convert_from_float<reduced_t>(v, Vec(0.0f));
    packed.store(p, Vec::size());
  }
};
template <>
struct VecIO<c10::BFloat16> : VecIOReduced<c10::BFloat16> {};
template <>
struct VecIO<c10::Half> : VecIOReduced<c10::Half> {};

// max(a, b) that propagates NaN from either side (as at::vec::maximum and torch.max do): a NaN logit must reach
// the log-sum-exp instead of being skipped by a `>` comparison, which is false for NaN.
template <typename A>
inline A nan_max(A a, A b) {
  return (b > a || b != b) ? b : a;
}

template <typename A>
inline A horizontal_max(const at::vec::Vectorized<A>& v) {
  A buf[at::vec::Vectorized<A>::size()];
  v.store(buf);
  A m = buf[0];
  for (int i = 1; i < at::vec::Vectorized<A>::size(); ++i) m = nan_max(m, buf[i]);
  return m;
}

template <typename A>
inline A horizontal_sum(const at::vec::Vectorized<A>& v) {
  A buf[at::vec::Vectorized<A>::size()];
  v.store(buf);
  A s = 0;
  for (int i = 0; i < at::vec::Vectorized<A>::size(); ++i) s += buf[i];
  return s;
}

// Records the smallest flat index of an out-of-range label seen by any thread (lock-free min).
struct FirstBadLabel {
  std::atomic<int64_t> index{std::numeric_limits<int64_t>::max()};
  void record(int64_t i) {
    int64_t cur = index.load(std::memory_order_relaxed);
    while (i < cur && !index.compare_exchange_weak(cur, i, std::memory_order_relaxed)) {
    }
  }
  bool any() const {
    return index.load() != std::numeric_limits<int64_t>::max();
  }
};

// Raises ValueError("labels[n, t] = y is outside [0, V) ...") for the first bad label; never reads out of bounds.
inline void throw_bad_label(const at::Tensor& labels, int64_t flat, int64_t T, int64_t V, int64_t ignore_index,
                            const char* name = "labels") {
  const int64_t n = flat / T, t = flat % T;
  const int64_t value = labels.select(0, n).select(0, t).item<int64_t>();
  std::ostringstream msg;
  msg << name << "[" << n << ", " << t << "] = " << value << " is outside [0, " << V
      << ") and is not ignore_index (" << ignore_index << ")";
  TORCH_CHECK_VALUE(false, msg.str());
}

inline void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.dim() == 3, name, " must be [N, T, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(2) == 0 || logits.stride(2) == 1, name,
              " must be contiguous along the vocabulary dimension, got strides ", logits.strides());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), name, " must be floating point, got ",
              logits.scalar_type());
}

inline void check_labels(const at::Tensor& labels, const at::Tensor& logits) {
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == logits.size(0) && labels.size(1) == logits.size(1),
              "labels must be [N, T] = [", logits.size(0), ", ", logits.size(1), "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
}

}  // namespace spa
