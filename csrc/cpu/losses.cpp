// Fused losses on CPU (SPEC 4): softmax cross-entropy with z-loss, and StableMax cross-entropy. Each row is
// read from memory once (its first pass); the remaining passes find it in L2 (a 32000-class fp32 row is
// 128 KB). The gradient of the row is written in the same call, scaled by grad_scale (1 / rows for a mean),
// optionally into the logits buffer itself (grad may alias logits: every element is read before it is
// written). No (N, V) buffer besides the gradient exists.

#include <cmath>

#include "common.h"

namespace stabkernels::cpu::CPU_CAPABILITY {
namespace {

// exp on a vector: the fast polynomial for float (about 2 ulp), Sleef's for double.
inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

// Maximum of a row (NaN-propagating), math in acc_t<T>.
template <typename T>
acc_t<T> row_max(const T* z, int64_t V) {
  using A = acc_t<T>;
  using VA = Vectorized<A>;
  constexpr int64_t L = VA::size();
  VA m(-std::numeric_limits<A>::infinity());
  int64_t j = 0;
  for (; j + L <= V; j += L) m = at::vec::maximum(m, load_acc(z + j));
  A out = lane_max(m);
  for (; j < V; ++j) out = nan_max(out, static_cast<A>(z[j]));
  return out;
}

// Sum over a row of f(x) for every column but the target's, y: S_rest, summed apart from the target's own term
// (adding it in and subtracting it afterwards would cancel exactly where the target dominates). The vector
// holding column y is summed with that lane zeroed; the rest of the row as usual. fv / fs: f on a vector /
// a scalar of acc_t<T>.
template <typename T, typename FV, typename FS>
acc_t<T> row_sum_except(const T* z, int64_t V, int64_t y, FV fv, FS fs) {
  using A = acc_t<T>;
  using VA = Vectorized<A>;
  constexpr int64_t L = VA::size();
  const int64_t vend = V - V % L, yv = y - y % L;  // vectors cover [0, vend); column y lies in [yv, yv + L)
  VA s(A(0));
  int64_t j = 0;
  for (; j < std::min(yv, vend); j += L) s = s + fv(load_acc(z + j));
  if (yv < vend) {
    A lanes[L];
    fv(load_acc(z + j)).store(lanes);
    lanes[y - yv] = A(0);
    s = s + VA::loadu(lanes);
    for (j += L; j < vend; j += L) s = s + fv(load_acc(z + j));
  }
  A out = lane_sum(s);
  for (; j < V; ++j)
    if (j != y) out += fs(static_cast<A>(z[j]));
  return out;
}

// Stores a vector of acc_t<T> into T storage at g + j.
template <typename T, typename VA>
void store_row(T* g, int64_t j, const VA& v) {
  if constexpr (std::is_same_v<T, typename VA::value_type>) {
    v.store(g + j);
  } else {
    typename VA::value_type tmp[VA::size()];
    v.store(tmp);
    for (int64_t l = 0; l < VA::size(); ++l) g[j + l] = static_cast<T>(tmp[l]);
  }
}

// Rows whose target is ignore_index get a zero gradient row and are skipped (their loss stays 0); any other
// target must be a class index.
template <typename T>
bool skip_ignored_row(const char* op, int64_t y, int64_t ignore_index, int64_t V, T* g) {
  if (y == ignore_index) {
    if (g) std::fill(g, g + V, static_cast<T>(0));
    return true;
  }
  TORCH_CHECK(y >= 0 && y < V, op, ": target ", y, " out of range [0, ", V, ")");
  return false;
}

double read_scalar(const at::Tensor& t) { return t.to(at::kDouble).item<double>(); }

void check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target, const at::Tensor& grad) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, op, ": logits must be (N, V) with contiguous rows");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0) && target.scalar_type() == at::kLong, op,
              ": target must be an int64 (N,) tensor");
  TORCH_CHECK(grad.numel() == 0 || (grad.sizes() == logits.sizes() && grad.stride(1) == 1 &&
                                    grad.scalar_type() == logits.scalar_type()),
              op, ": grad must be empty or shaped like logits with contiguous rows");
}

// Per row (math in fp32, fp64 for fp64): lse = log sum exp(z); ce = lse - z_y; zl = c lse^2; grad = scale (softmax (1 + 2 c lse) - onehot).
// Without softmax collapse (stabkernels/losses.py, cross_entropy_z_loss_reference): with m = max z,
// s_y = exp(z_y - m) and S_rest the other columns' sum, log S = log1p(S_rest) where z_y = m, ce = (m - z_y) + log S,
// and the target's gradient scale (2 c lse s_y - S_rest) / S.
std::tuple<at::Tensor, at::Tensor> cross_entropy_z_loss_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                            at::Tensor grad, const at::Tensor& grad_scale,
                                                            double z_coef, int64_t ignore_index) {
  check_inputs("cross_entropy_z_loss", logits, target, grad);
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto acc = acc_dtype(logits.scalar_type());
  at::Tensor ce = at::zeros({N}, logits.options().dtype(acc)), zl = at::zeros_like(ce);
  const bool with_grad = grad.numel() > 0;
  const int64_t* y = target.const_data_ptr<int64_t>();
  STABKERNELS_DISPATCH_FLOAT(logits, "cross_entropy_z_loss_cpu", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    using VA = Vectorized<A>;
    const A scale = static_cast<A>(read_scalar(grad_scale)), c = static_cast<A>(z_coef);
    at::parallel_for(0, N, std::max<int64_t>(1, (int64_t{1} << 14) / V), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const T* z = logits.const_data_ptr<T>() + i * logits.stride(0);
        T* g = with_grad ? grad.mutable_data_ptr<T>() + i * grad.stride(0) : nullptr;
        if (skip_ignored_row("cross_entropy_z_loss", y[i], ignore_index, V, g)) continue;
        const A m = row_max(z, V);
        const VA vm(m);
        const A rest = row_sum_except(z, V, y[i], [&](const VA& x) { return vexp(x - vm); },
                                      [&](A x) { return std::exp(x - m); });
        const A zy = static_cast<A>(z[y[i]]);
        const A sy = zy == m ? A(1) : std::exp(zy - m);
        const A S = sy + rest;
        const A log_S = zy == m ? std::log1p(rest) : std::log(S);
        const A lse = m + log_S;
        ce.mutable_data_ptr<A>()[i] = (m - zy) + log_S;
        zl.mutable_data_ptr<A>()[i] = c * lse * lse;
        if (!g) continue;
        const A a = scale * (A(1) + A(2) * c * lse) / S;
        const VA va(a);
        constexpr int64_t L = VA::size();
        int64_t j = 0;
        for (; j + L <= V; j += L) store_row(g, j, vexp(load_acc(z + j) - vm) * va);
        for (; j < V; ++j) g[j] = static_cast<T>(std::exp(static_cast<A>(z[j]) - m) * a);
        g[y[i]] = static_cast<T>(scale * (A(2) * c * lse * sy - rest) / S);
      }
    });
  });
  return {ce, zl};
}

// StableMax (SPEC 4): s(x) = x + 1 for x >= 0, 1 / (1 - x) below; p = s(z) / S, S = sum s(z);
// loss = log S - log s(z_y); d loss / d z_j = s'(z_j) / S - [j = y] s'(z_y) / s(z_y), s'(x) = 1 or 1 / (1 - x)^2.
// Without softmax collapse (stabkernels/losses.py, stablemax_cross_entropy_reference): with s_y = s(z_y) and S_rest
// the other columns' sum, loss = log1p(S_rest / s_y) and the target's gradient -scale (s'(z_y) / s_y) (S_rest / S).
template <typename A>
Vectorized<A> stable_s(const Vectorized<A>& x) {
  const Vectorized<A> one(A(1));
  return Vectorized<A>::blendv(one / (one - x), x + one, x >= Vectorized<A>(A(0)));
}
template <typename A>
Vectorized<A> stable_ds(const Vectorized<A>& x) {
  const Vectorized<A> one(A(1)), r = one / (one - x);
  return Vectorized<A>::blendv(r * r, one, x >= Vectorized<A>(A(0)));
}
inline float stable_s(float x) { return x >= 0 ? x + 1.f : 1.f / (1.f - x); }
inline float stable_ds(float x) { return x >= 0 ? 1.f : 1.f / ((1.f - x) * (1.f - x)); }
inline double stable_s(double x) { return x >= 0 ? x + 1.0 : 1.0 / (1.0 - x); }
inline double stable_ds(double x) { return x >= 0 ? 1.0 : 1.0 / ((1.0 - x) * (1.0 - x)); }

at::Tensor stablemax_cross_entropy_cpu(const at::Tensor& logits, const at::Tensor& target, at::Tensor grad,
                                       const at::Tensor& grad_scale, int64_t ignore_index) {
  check_inputs("stablemax_cross_entropy", logits, target, grad);
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto acc = acc_dtype(logits.scalar_type());
  at::Tensor loss = at::zeros({N}, logits.options().dtype(acc));
  const bool with_grad = grad.numel() > 0;
  const int64_t* y = target.const_data_ptr<int64_t>();
  STABKERNELS_DISPATCH_FLOAT(logits, "stablemax_cross_entropy_cpu", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    using VA = Vectorized<A>;
    const A scale = static_cast<A>(read_scalar(grad_scale));
    at::parallel_for(0, N, std::max<int64_t>(1, (int64_t{1} << 14) / V), [&](int64_t b, int64_t e) {
      constexpr int64_t L = VA::size();
      for (int64_t i = b; i < e; ++i) {
        const T* z = logits.const_data_ptr<T>() + i * logits.stride(0);
        T* g = with_grad ? grad.mutable_data_ptr<T>() + i * grad.stride(0) : nullptr;
        if (skip_ignored_row("stablemax_cross_entropy", y[i], ignore_index, V, g)) continue;
        const A rest = row_sum_except(z, V, y[i], [](const VA& x) { return stable_s(x); },
                                      [](A x) { return stable_s(x); });
        const A zy = static_cast<A>(z[y[i]]), sy = stable_s(zy), S = sy + rest, r = rest / sy;
        loss.mutable_data_ptr<A>()[i] = std::isinf(r) ? std::log(rest) - std::log(sy) : std::log1p(r);
        if (!g) continue;
        const A inv = scale / S;
        const VA vinv(inv);
        int64_t j = 0;
        for (; j + L <= V; j += L) store_row(g, j, stable_ds(load_acc(z + j)) * vinv);
        for (; j < V; ++j) g[j] = static_cast<T>(stable_ds(static_cast<A>(z[j])) * inv);
        g[y[i]] = static_cast<T>(-scale * (stable_ds(zy) / sy) * (rest / S));
      }
    });
  });
  return loss;
}

}  // namespace

void fill_losses(CpuKernels& k) {
  k.cross_entropy_z_loss = &cross_entropy_z_loss_cpu;
  k.stablemax_cross_entropy = &stablemax_cross_entropy_cpu;
}

}  // namespace stabkernels::cpu
