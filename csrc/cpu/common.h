// Shared helpers for the CPU kernels: SIMD loads that widen to the accumulation type, NaN-propagating
// min/max, and the grain size for at::parallel_for.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <limits>
#include <type_traits>

namespace stabkernels::cpu {

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

// Rows per parallel_for chunk so that each chunk touches at least ~32K elements.
inline int64_t grain_rows(int64_t cols) {
  return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(cols, 1));
}

}  // namespace stabkernels::cpu
