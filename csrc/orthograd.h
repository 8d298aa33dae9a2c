// OrthoGrad's per-tensor coefficients (SPEC 4), shared by the CPU kernel (doubles) and the CUDA glue ((T,)
// float64 tensors): from the sums w.g, w.w and g.g of each tensor, c = w.g / (w.w + 1e-30) and the rescale
// |g| / (|g - c w| + 1e-30), with |g - c w|^2 = g.g - 2c w.g + c^2 w.w (clamped at 0), so that no pass
// materialises g - c w. stabkernels/_orthograd.py writes the same for the Triton wrapper and the DTensor path.
#pragma once
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>

namespace stabkernels::orthograd {

constexpr double kEps = 1e-30;

// static: each CPU ISA level's translation unit keeps its own copy (csrc/cpu/isa/), as in philox.h.
static inline double sqrt_of(double x) { return std::sqrt(x); }
static inline double clamp_min0(double x) { return std::max(0.0, x); }
static inline at::Tensor sqrt_of(const at::Tensor& x) { return x.sqrt(); }
static inline at::Tensor clamp_min0(const at::Tensor& x) { return x.clamp_min(0); }

template <class T>
struct Coefficients {
  T coef;   // c = w.g / (w.w + eps)
  T scale;  // |g| / (|g - c w| + eps)
};

// The write pass then makes g <- (g - c w) * scale; zero weights or gradients give c = 0 or scale = 0, no NaN.
template <class T>
static inline Coefficients<T> coefficients(const T& wg, const T& ww, const T& gg) {
  const T coef = wg / (ww + kEps);
  const T perp2 = clamp_min0(gg - 2 * coef * wg + coef * coef * ww);
  return {coef, sqrt_of(gg) / (sqrt_of(perp2) + kEps)};
}

}  // namespace stabkernels::orthograd
