// Shared helpers for the CPU kernels: SIMD loads that widen to the accumulation type, NaN-propagating
// min/max, and the grain size for at::parallel_for.
//
// Compiled once per ISA level (csrc/cpu/isa/): everything lives in namespace
// stabkernels::cpu::CPU_CAPABILITY, so inline helpers built with AVX-512 flags never stand in for the
// baseline ones at link time.
#pragma once
#ifndef CPU_CAPABILITY
#error "csrc/cpu kernels are compiled through csrc/cpu/isa/*.cpp, which define CPU_CAPABILITY"
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "kernels.h"

#include <limits>
#include <vector>
#include <type_traits>

namespace stabkernels::cpu::CPU_CAPABILITY {
using stabkernels::cpu::CpuKernels;

using at::vec::Vectorized;

// Math in fp32 for fp32/fp16/bf16 storage, fp64 for fp64 (SPEC 6).
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Elements handled by one SIMD step: a Vectorized<acc_t> worth, loaded from T storage.
template <typename T>
constexpr int64_t vec_width() {
  return Vectorized<acc_t<T>>::size();
}

// Loads vec_width<T>() elements of T starting at p, widened to acc_t<T>.
template <typename T>
inline Vectorized<acc_t<T>> load_acc(const T* p) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return Vectorized<T>::loadu(p);
  } else {
    Vectorized<float> out;  // fp16/bf16: vec_width<T>() elements widened to fp32
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

// NaN-propagating scalar max/min: once NaN, always NaN (matches torch.amax/amin).
template <typename A>
inline A nan_max(A a, A b) {
  return (a != a || a > b) ? a : b;
}
template <typename A>
inline A nan_min(A a, A b) {
  return (a != a || a < b) ? a : b;
}

// Horizontal reductions of one vector: the sum of its lanes, and their NaN-propagating maximum and minimum
// (at::vec's max/min reductions would drop a NaN).
template <typename A>
inline A lane_sum(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& a, Vectorized<A>& b) { return a + b; }, v);
}
template <typename A, typename F>
inline A lane_fold(const Vectorized<A>& v, F combine) {
  A lanes[Vectorized<A>::size()];
  v.store(lanes);
  A out = lanes[0];
  for (int64_t l = 1; l < Vectorized<A>::size(); ++l) out = combine(out, lanes[l]);
  return out;
}
template <typename A>
inline A lane_max(const Vectorized<A>& v) {
  return lane_fold(v, nan_max<A>);
}
template <typename A>
inline A lane_min(const Vectorized<A>& v) {
  return lane_fold(v, nan_min<A>);
}

// Rows per parallel_for chunk so that each chunk touches at least ~32K elements.
inline int64_t grain_rows(int64_t cols) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(cols, 1));
}

}  // namespace stabkernels::cpu::CPU_CAPABILITY

namespace stabkernels::cpu::CPU_CAPABILITY {

// A slice [begin, end) of tensor `index` in a list: the unit of parallel work for grouped ops, so that one
// parallel region covers many tensors of different sizes with balanced chunks.
struct Chunk {
  int64_t index, begin, end;
};

// Splits each extent into chunks of about `target` units (at least one unit each).
inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& extents, int64_t target) {
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < static_cast<int64_t>(extents.size()); ++i) {
    const int64_t n = extents[i], step = std::max<int64_t>(1, target);
    for (int64_t b = 0; b < n; b += step) chunks.push_back({i, b, std::min(n, b + step)});
  }
  return chunks;
}

// Dispatches on the storage dtype of `t` (float32/float64/float16/bfloat16), naming the type scalar_t.
#define STABKERNELS_DISPATCH_FLOAT(t, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (t).scalar_type(), name, __VA_ARGS__)

// The math dtype of a storage dtype: float64 for float64, float32 otherwise (SPEC 6).
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The result dtype of a grouped reduction: float64 if any input is float64, else float32.
inline at::ScalarType grouped_acc_dtype(at::TensorList ts) {
  for (const auto& t : ts)
    if (t.scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

// Sum of v[i] * w[i] over n elements with acc_t<T> math (w in acc_t<T>, v in storage T).
template <typename T>
inline acc_t<T> dot_acc(const T* v, const acc_t<T>* w, int64_t n) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t W = vec_width<T>();
  V s0(A(0)), s1(A(0));
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    s0 = at::vec::fmadd(load_acc(v + j), V::loadu(w + j), s0);
    s1 = at::vec::fmadd(load_acc(v + j + W), V::loadu(w + j + W), s1);
  }
  A s = lane_sum(s0 + s1);
  for (; j < n; ++j) s += static_cast<A>(v[j]) * w[j];
  return s;
}

}  // namespace stabkernels::cpu::CPU_CAPABILITY
