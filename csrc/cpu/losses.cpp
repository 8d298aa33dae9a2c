// Fused losses on CPU (SPEC 4): softmax cross-entropy with z-loss, and StableMax cross-entropy. Each row is
// read from memory once (its first pass); the remaining passes find it in L2 (a 32000-class fp32 row is
// 128 KB). The gradient of the row is written in the same call, scaled by grad_scale (1 / rows for a mean),
// optionally into the logits buffer itself (grad may alias logits: every element is read before it is
// written). No (N, V) buffer besides the gradient exists. The logits may also be stored with each row a
// column (linear_cross_entropy's chunks on CPU); then L rows are swept at once, one vector per class.

#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>

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

// The two layouts of the (N, V) logits the kernels read: each row contiguous, or each row a column (a (V, N)
// matrix seen transposed: the logits chunk of linear_cross_entropy computed as W @ h^T, the faster product
// for the CPU's BLAS).
bool rows_contiguous(const at::Tensor& t) { return t.dim() == 2 && t.stride(1) == 1; }
bool rows_as_columns(const at::Tensor& t) { return t.dim() == 2 && t.stride(0) == 1 && t.stride(1) >= t.size(0); }

// Up to L rows of logits stored as columns, L one vector of the math dtype: lane r of the vector of class j is
// row i0 + r's logit of class j, at x[j * ld + r] (gradient g[j * gld + r]). The lanes past `rows` (the last
// strip of a chunk) read as 0 and are never written.
template <typename T>
struct Lanes {
  using A = acc_t<T>;
  using VA = Vectorized<A>;
  static constexpr int64_t L = VA::size();
  const T* x;
  int64_t ld;
  T* g;
  int64_t gld;
  int64_t rows;
  VA load(int64_t j) const {
    if (rows == L) return load_acc(x + j * ld);
    T tmp[L] = {};
    std::copy_n(x + j * ld, rows, tmp);
    return load_acc(tmp);
  }
  void store(int64_t j, const VA& v) const {
    if constexpr (std::is_same_v<T, A>) {
      if (rows == L) return v.store(g + j * gld);
    }
    A tmp[L];
    v.store(tmp);
    for (int64_t r = 0; r < rows; ++r) g[j * gld + r] = static_cast<T>(tmp[r]);
  }
};

// The targets of a strip's lanes: which lanes count (not ignore_index, not past the end; the others' loss is 0
// and their gradient 0), and the distinct target classes in ascending order with a bit mask of the lanes of each.
template <int64_t L>
struct LaneTargets {
  bool counts[L] = {};
  int64_t cls[L];
  uint64_t lanes[L];
  int64_t n = 0;
  bool all_count = true;
  LaneTargets(const char* op, const int64_t* y, int64_t rows, int64_t ignore_index, int64_t V) {
    for (int64_t r = 0; r < L; ++r) {
      counts[r] = r < rows && y[r] != ignore_index;
      all_count = all_count && counts[r];
      if (!counts[r]) continue;
      TORCH_CHECK(y[r] >= 0 && y[r] < V, op, ": target ", y[r], " out of range [0, ", V, ")");
      int64_t k = 0;
      while (k < n && cls[k] < y[r]) ++k;
      if (k < n && cls[k] == y[r]) {
        lanes[k] |= uint64_t{1} << r;
        continue;
      }
      std::copy_backward(cls + k, cls + n, cls + n + 1);
      std::copy_backward(lanes + k, lanes + n, lanes + n + 1);
      cls[k] = y[r], lanes[k] = uint64_t{1} << r, ++n;
    }
  }
  // Zeroes the lanes that do not count (even a NaN there), with a blend mask built once per strip.
  template <typename VA>
  struct Keep {
    bool all;
    VA mask;
    VA operator()(const VA& v) const { return all ? v : VA::blendv(VA(0), v, mask); }
  };
  template <typename VA>
  Keep<VA> keep() const {
    typename VA::value_type ones[L];
    for (int64_t r = 0; r < L; ++r) ones[r] = counts[r] ? 1 : 0;
    return {all_count, VA::loadu(ones) == VA(1)};
  }
};

// Per lane the sum over the classes of f(logits), each lane leaving out its own target's class (row_sum_except's
// rule, for rows stored as columns).
template <typename T, typename F>
Vectorized<acc_t<T>> lanes_sum_except(const Lanes<T>& s, int64_t V, const LaneTargets<Lanes<T>::L>& t, F f) {
  using A = acc_t<T>;
  using VA = Vectorized<A>;
  VA acc(A(0)), acc1(A(0)), acc2(A(0)), acc3(A(0));  // four chains: the adds' latency, not their count, bounds
  int64_t j = 0;
  for (int64_t k = 0;; ++k) {
    const int64_t stop = k < t.n ? t.cls[k] : V;
    for (; j + 4 <= stop; j += 4) {
      acc = acc + f(s.load(j));
      acc1 = acc1 + f(s.load(j + 1));
      acc2 = acc2 + f(s.load(j + 2));
      acc3 = acc3 + f(s.load(j + 3));
    }
    for (; j < stop; ++j) acc = acc + f(s.load(j));
    if (k == t.n) return (acc + acc1) + (acc2 + acc3);
    A tmp[Lanes<T>::L];
    f(s.load(j++)).store(tmp);
    for (int64_t r = 0; r < Lanes<T>::L; ++r)
      if (t.lanes[k] >> r & 1) tmp[r] = A(0);
    acc = acc + VA::loadu(tmp);
  }
}

// Per lane the NaN-propagating maximum over the classes (row_max for rows stored as columns).
template <typename T>
Vectorized<acc_t<T>> lanes_max(const Lanes<T>& s, int64_t V) {
  using VA = Vectorized<acc_t<T>>;
  VA m(-std::numeric_limits<acc_t<T>>::infinity()), m1 = m, m2 = m, m3 = m;
  int64_t j = 0;
  for (; j + 4 <= V; j += 4) {
    m = at::vec::maximum(m, s.load(j));
    m1 = at::vec::maximum(m1, s.load(j + 1));
    m2 = at::vec::maximum(m2, s.load(j + 2));
    m3 = at::vec::maximum(m3, s.load(j + 3));
  }
  for (; j < V; ++j) m = at::vec::maximum(m, s.load(j));
  return at::vec::maximum(at::vec::maximum(m, m1), at::vec::maximum(m2, m3));
}

// Runs the row op over every row of logits: row(z, g, i) on each contiguous row (z its V logits, g its gradient
// or nullptr), or, for rows stored as columns, strip(lanes, i0) on each strip of L rows: a strip's columns are
// read as vectors of L rows (a cache line of fp32), so the op sweeps L rows at once, vectorised across them,
// where the (L, V) strip (1 MB at 16 fp32 rows of 16384 classes) stays in L2 between its sweeps.
template <typename T, typename Row, typename Strip>
void for_each_row(const at::Tensor& logits, const at::Tensor& grad, bool with_grad, Row row, Strip strip) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const T* x = logits.const_data_ptr<T>();
  T* gx = with_grad ? grad.mutable_data_ptr<T>() : nullptr;
  if (rows_contiguous(logits)) {
    at::parallel_for(0, N, std::max<int64_t>(1, (int64_t{1} << 14) / V), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        row(x + i * logits.stride(0), gx ? gx + i * grad.stride(0) : nullptr, i);
    });
    return;
  }
  constexpr int64_t L = Lanes<T>::L;
  at::parallel_for(0, (N + L - 1) / L, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const int64_t i0 = k * L;
      strip(Lanes<T>{x + i0, logits.stride(1), gx ? gx + i0 : nullptr, with_grad ? grad.stride(1) : 0,
                     std::min(L, N - i0)},
            i0);
    }
  });
}

void check_inputs(const char* op, const at::Tensor& logits, const at::Tensor& target, const at::Tensor& grad,
                  const std::optional<at::Tensor>& weight, double label_smoothing, double softcap) {
  TORCH_CHECK(logits.dim() == 2 && (rows_contiguous(logits) || rows_as_columns(logits)), op,
              ": logits must be (N, V) with contiguous rows, or with each row a column (stride (1, >= N))");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0) && target.scalar_type() == at::kLong, op,
              ": target must be an int64 (N,) tensor");
  const bool same_layout = rows_contiguous(logits) ? rows_contiguous(grad) : rows_as_columns(grad);
  TORCH_CHECK(grad.numel() == 0 || (grad.sizes() == logits.sizes() && same_layout &&
                                    grad.scalar_type() == logits.scalar_type()),
              op, ": grad must be empty or shaped and laid out like logits");
  TORCH_CHECK(!weight || (weight->dim() == 1 && weight->size(0) == logits.size(1) && weight->is_contiguous() &&
                          weight->scalar_type() == acc_dtype(logits.scalar_type())),
              op, ": class_weight must be a contiguous (V,) tensor in the math dtype");
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1, op, ": label_smoothing must be in [0, 1]");
  TORCH_CHECK(softcap >= 0, op, ": softcap must be >= 0 (0: off)");
}

// The options of SPEC 4.5 for one call, in the math dtype A: softcap (cap = 0: off), label smoothing eps, class
// weights w (null: all 1) and their sum W, the gradient's scale.
template <typename A>
struct RowOpts {
  using VA = Vectorized<A>;
  A cap, eps, scale;
  const A* w;
  A W;
  int64_t V;
  // softcap(x) = cap tanh(x / cap) on a vector / a scalar
  VA capped(const VA& x) const { return cap > 0 ? VA(cap) * (x / VA(cap)).tanh() : x; }
  A capped(A x) const { return cap > 0 ? cap * std::tanh(x / cap) : x; }
  // (softcap(x), d softcap / dx = 1 - tanh^2)
  std::pair<VA, VA> capped_d(const VA& x) const {
    if (!(cap > 0)) return {x, VA(A(1))};
    const VA t = (x / VA(cap)).tanh();
    return {VA(cap) * t, VA(A(1)) - t * t};
  }
  std::pair<A, A> capped_d(A x) const {
    if (!(cap > 0)) return {x, A(1)};
    const A t = std::tanh(x / cap);
    return {cap * t, A(1) - t * t};
  }
  A weight(int64_t j) const { return w ? w[j] : A(1); }
  VA weights(int64_t j) const { return w ? VA::loadu(w + j) : VA(A(1)); }
  // sum_j w_j f(softcap(z_j)) over the whole row (the smoothing term's sweep)
  template <typename T, typename FV, typename FS>
  A weighted_sum(const T* z, FV fv, FS fs) const {
    constexpr int64_t L = VA::size();
    VA s(A(0));
    int64_t j = 0;
    for (; j + L <= V; j += L) s = s + weights(j) * fv(capped(load_acc(z + j)));
    A out = lane_sum(s);
    for (; j < V; ++j) out += weight(j) * fs(capped(static_cast<A>(z[j])));
    return out;
  }
  // the same sum per lane of a strip of rows stored as columns
  template <typename T, typename FV>
  VA weighted_sum(const Lanes<T>& s, FV fv) const {
    VA out(A(0));
    for (int64_t j = 0; j < V; ++j) out = out + VA(weight(j)) * fv(capped(s.load(j)));
    return out;
  }
};

template <typename A>
RowOpts<A> row_opts(const std::optional<at::Tensor>& weight, double label_smoothing, double softcap,
                    const at::Tensor& grad_scale, int64_t V) {
  const A* w = weight ? weight->const_data_ptr<A>() : nullptr;
  A W = static_cast<A>(V);
  if (w) {
    W = A(0);
    for (int64_t j = 0; j < V; ++j) W += w[j];
  }
  return RowOpts<A>{static_cast<A>(softcap), static_cast<A>(label_smoothing), static_cast<A>(read_scalar(grad_scale)),
                    w, W, V};
}

// The end of a strip (rows stored as columns) once its sums are known, for both losses: finish(i, r) -> (pa, pe,
// gy) of each lane that counts (it writes the row's loss), then unless there is no gradient the sweep
// grad_of(smooth, x, pa, pe, w) over the classes, the lanes that do not count zeroed, and each target's own
// gradient after it.
template <typename T, int64_t L, typename Finish, typename GradOf>
void finish_strip(const Lanes<T>& s, int64_t i0, const LaneTargets<L>& t, const int64_t* y,
                  const RowOpts<acc_t<T>>& o, Finish finish, GradOf grad_of) {
  using A = acc_t<T>;
  using VA = Vectorized<A>;
  A pa[L] = {}, pe[L] = {}, gy[L];
  for (int64_t r = 0; r < s.rows; ++r)
    if (t.counts[r]) {
      const std::array<A, 3> f = finish(i0 + r, r);
      pa[r] = f[0], pe[r] = f[1], gy[r] = f[2];
    }
  if (!s.g) return;
  const VA va = VA::loadu(pa), ve = VA::loadu(pe);
  const auto keep = t.template keep<VA>();
  auto sweep = [&](auto smooth) {
    for (int64_t j = 0; j < o.V; ++j) s.store(j, keep(grad_of(smooth, s.load(j), va, ve, VA(o.weight(j)))));
  };
  if (o.eps > 0)
    sweep(std::true_type{});
  else
    sweep(std::false_type{});
  for (int64_t r = 0; r < s.rows; ++r)
    if (t.counts[r]) s.g[y[i0 + r] * s.gld + r] = static_cast<T>(gy[r]);
}

// Per row (math in fp32, fp64 for fp64; SPEC 4.3, 4.5), on z = softcap(logits): lse = log sum exp(z);
// ce = (1 - eps) w_y (lse - z_y) + eps / V sum_j w_j (lse - z_j); zl = c w_y lse^2;
// grad_j = scale (p_j a - eps w_j / V) dz_j, a = (1 - eps) w_y + eps W / V + 2 c w_y lse, less b_y = (1 - eps + eps / V) w_y at y.
// Without softmax collapse (stabkernels/losses.py, cross_entropy_z_loss_reference): with m = max z,
// s_y = exp(z_y - m) and S_rest the other columns' sum, log S = log1p(S_rest) where z_y = m, lse - z_y = (m - z_y) + log S,
// the smoothing sum is sum_j w_j (m - z_j) + W log S, and the target's gradient scale (s_y (a - b_y) - b_y S_rest) / S.
std::tuple<at::Tensor, at::Tensor> cross_entropy_z_loss_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                            at::Tensor grad, const at::Tensor& grad_scale,
                                                            double z_coef, int64_t ignore_index,
                                                            const std::optional<at::Tensor>& weight,
                                                            double label_smoothing, double softcap) {
  check_inputs("cross_entropy_z_loss", logits, target, grad, weight, label_smoothing, softcap);
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto acc = acc_dtype(logits.scalar_type());
  at::Tensor ce = at::zeros({N}, logits.options().dtype(acc)), zl = at::zeros_like(ce);
  const bool with_grad = grad.numel() > 0;
  const at::Tensor tgt = target.contiguous();  // the kernels read y[i]: a strided target is copied
  const int64_t* y = tgt.const_data_ptr<int64_t>();
  STABKERNELS_DISPATCH_FLOAT(logits, "cross_entropy_z_loss_cpu", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    using VA = Vectorized<A>;
    constexpr int64_t L = VA::size();
    const RowOpts<A> o = row_opts<A>(weight, label_smoothing, softcap, grad_scale, V);
    const A c = static_cast<A>(z_coef), eps = o.eps, scale = o.scale;
    A* ce_rows = ce.mutable_data_ptr<A>();
    A* zl_rows = zl.mutable_data_ptr<A>();
    // Row i's loss and z-loss from its sweeps (m = max softcap(z), rest = S_rest, smooth = sum_j w_j (m - z_j)
    // when eps > 0) and its target's logit; returns the gradient's factors (pa, pe) and the target's gradient.
    auto finish = [&](int64_t i, A m, A rest, A smooth, A z_y) -> std::array<A, 3> {
      const auto [zy, dy] = o.capped_d(z_y);
      const A sy = zy == m ? A(1) : std::exp(zy - m);
      const A S = sy + rest;
      const A log_S = zy == m ? std::log1p(rest) : std::log(S);
      const A lse = m + log_S, wy = o.weight(y[i]);
      A loss = (A(1) - eps) * wy * ((m - zy) + log_S);
      if (eps > 0) loss += eps / A(V) * (smooth + o.W * log_S);
      ce_rows[i] = loss;
      zl_rows[i] = c * wy * lse * lse;
      const A a = (A(1) - eps) * wy + eps * o.W / A(V) + A(2) * c * wy * lse;
      const A by = (A(1) - eps + eps / A(V)) * wy;
      return {scale * a / S, scale * eps / A(V), scale * ((sy * (a - by) - by * rest) / S) * dy};
    };
    // grad_j = (exp(z_j - m) pa - pe w_j) dz_j; the smoothing term only where there is smoothing
    auto grad_of = [&](auto smooth, const VA& x, const VA& m, const VA& pa, const VA& pe, const VA& w) {
      const auto [z, d] = o.capped_d(x);
      VA gj = vexp(z - m) * pa;
      if constexpr (decltype(smooth)::value) gj = gj - pe * w;
      return gj * d;
    };
    auto row = [&](const T* z, T* g, int64_t i) {
      if (skip_ignored_row("cross_entropy_z_loss", y[i], ignore_index, V, g)) return;
      const A m = o.capped(row_max(z, V));  // tanh is increasing: the maximum's softcap is the softcap's maximum
      const VA vm(m);
      const A rest = row_sum_except(z, V, y[i], [&](const VA& x) { return vexp(o.capped(x) - vm); },
                                    [&](A x) { return std::exp(o.capped(x) - m); });
      const A smooth =
          eps > 0 ? o.weighted_sum(z, [&](const VA& x) { return vm - x; }, [&](A x) { return m - x; }) : A(0);
      const auto [pa, pe, gy] = finish(i, m, rest, smooth, static_cast<A>(z[y[i]]));
      if (!g) return;
      auto sweep = [&](auto smooth) {
        const VA va(pa), ve(pe);
        int64_t j = 0;
        for (; j + L <= V; j += L) store_row(g, j, grad_of(smooth, load_acc(z + j), vm, va, ve, o.weights(j)));
        for (; j < V; ++j) {
          const auto [x, d] = o.capped_d(static_cast<A>(z[j]));
          A gj = std::exp(x - m) * pa;
          if constexpr (decltype(smooth)::value) gj -= pe * o.weight(j);
          g[j] = static_cast<T>(gj * d);
        }
      };
      if (eps > 0)
        sweep(std::true_type{});
      else
        sweep(std::false_type{});
      g[y[i]] = static_cast<T>(gy);
    };
    auto strip = [&](const Lanes<T>& s, int64_t i0) {
      const LaneTargets<L> t("cross_entropy_z_loss", y + i0, s.rows, ignore_index, V);
      A m[L], rest[L], smooth[L] = {};
      lanes_max(s, V).store(m);
      for (int64_t r = 0; r < L; ++r) m[r] = o.capped(m[r]);
      const VA vm = VA::loadu(m);
      lanes_sum_except(s, V, t, [&](const VA& x) { return vexp(o.capped(x) - vm); }).store(rest);
      if (eps > 0) o.weighted_sum(s, [&](const VA& x) { return vm - x; }).store(smooth);
      finish_strip(
          s, i0, t, y, o,
          [&](int64_t i, int64_t r) {
            return finish(i, m[r], rest[r], smooth[r], static_cast<A>(s.x[y[i] * s.ld + r]));
          },
          [&](auto sm, const VA& x, const VA& pa, const VA& pe, const VA& w) { return grad_of(sm, x, vm, pa, pe, w); });
    };
    for_each_row<T>(logits, grad, with_grad, row, strip);
  });
  return {ce, zl};
}

// StableMax (SPEC 4.2, 4.5): s(x) = x + 1 for x >= 0, 1 / (1 - x) below; on z = softcap(logits), p = s(z) / S,
// S = sum s(z); loss = (1 - eps) w_y (log S - log s(z_y)) + eps / V sum_j w_j (log S - log s(z_j));
// d loss / d z_j = s'(z_j) a / S - eps w_j s'(z_j) / (V s(z_j)), a = (1 - eps) w_y + eps W / V, and at y
// s'(z_y) (a / S - b_y / s_y), b_y = (1 - eps + eps / V) w_y; s'(x) = 1 or 1 / (1 - x)^2.
// Without softmax collapse (stabkernels/losses.py, stablemax_cross_entropy_reference): with s_y = s(z_y) and S_rest
// the other columns' sum, log S - log s_y = log1p(S_rest / s_y) and the target's gradient
// scale s'(z_y) (s_y (a - b_y) - b_y S_rest) / (S s_y).
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
// log s(x) = log1p(x) for x >= 0, -log1p(-x) below
template <typename A>
Vectorized<A> stable_log_s(const Vectorized<A>& x) {
  const Vectorized<A> l = x.abs().log1p();
  return Vectorized<A>::blendv(-l, l, x >= Vectorized<A>(A(0)));
}
inline float stable_s(float x) { return x >= 0 ? x + 1.f : 1.f / (1.f - x); }
inline float stable_ds(float x) { return x >= 0 ? 1.f : 1.f / ((1.f - x) * (1.f - x)); }
inline double stable_s(double x) { return x >= 0 ? x + 1.0 : 1.0 / (1.0 - x); }
inline double stable_ds(double x) { return x >= 0 ? 1.0 : 1.0 / ((1.0 - x) * (1.0 - x)); }
template <typename A>
A stable_log_s(A x) { return x >= 0 ? std::log1p(x) : -std::log1p(-x); }

at::Tensor stablemax_cross_entropy_cpu(const at::Tensor& logits, const at::Tensor& target, at::Tensor grad,
                                       const at::Tensor& grad_scale, int64_t ignore_index,
                                       const std::optional<at::Tensor>& weight, double label_smoothing,
                                       double softcap) {
  check_inputs("stablemax_cross_entropy", logits, target, grad, weight, label_smoothing, softcap);
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto acc = acc_dtype(logits.scalar_type());
  at::Tensor loss = at::zeros({N}, logits.options().dtype(acc));
  const bool with_grad = grad.numel() > 0;
  const at::Tensor tgt = target.contiguous();  // the kernels read y[i]: a strided target is copied
  const int64_t* y = tgt.const_data_ptr<int64_t>();
  STABKERNELS_DISPATCH_FLOAT(logits, "stablemax_cross_entropy_cpu", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    using VA = Vectorized<A>;
    constexpr int64_t L = VA::size();
    const RowOpts<A> o = row_opts<A>(weight, label_smoothing, softcap, grad_scale, V);
    const A eps = o.eps, scale = o.scale;
    A* loss_rows = loss.mutable_data_ptr<A>();
    // Row i's loss from its sweeps (rest = S_rest, smooth = sum_j w_j log s(z_j) when eps > 0) and its target's
    // logit; returns the gradient's factors (pa, pe) and the target's gradient.
    auto finish = [&](int64_t i, A rest, A smooth, A z_y) -> std::array<A, 3> {
      const auto [zy, dy] = o.capped_d(z_y);
      const A sy = stable_s(zy), S = sy + rest, r = rest / sy, wy = o.weight(y[i]);
      A row = (A(1) - eps) * wy * (std::isinf(r) ? std::log(rest) - std::log(sy) : std::log1p(r));
      if (eps > 0) row += eps / A(V) * (o.W * std::log(S) - smooth);
      loss_rows[i] = row;
      const A a = (A(1) - eps) * wy + eps * o.W / A(V);
      const A by = (A(1) - eps + eps / A(V)) * wy;
      return {scale * a / S, scale * eps / A(V), scale * stable_ds(zy) * ((sy * (a - by) - by * rest) / (S * sy)) * dy};
    };
    // grad_j = s'(z_j) (pa - pe w_j / s(z_j)) dz_j; the smoothing term only where there is smoothing
    auto grad_of = [&](auto smooth, const VA& x, const VA& pa, const VA& pe, const VA& w) {
      const auto [z, d] = o.capped_d(x);
      const VA ds = stable_ds(z);
      VA gj = ds * pa;
      if constexpr (decltype(smooth)::value) gj = gj - pe * w * ds / stable_s(z);
      return gj * d;
    };
    auto row = [&](const T* z, T* g, int64_t i) {
      if (skip_ignored_row("stablemax_cross_entropy", y[i], ignore_index, V, g)) return;
      const A rest = row_sum_except(z, V, y[i], [&](const VA& x) { return stable_s(o.capped(x)); },
                                    [&](A x) { return stable_s(o.capped(x)); });
      const A smooth = eps > 0 ? o.weighted_sum(z, [](const VA& x) { return stable_log_s(x); },
                                                [](A x) { return stable_log_s(x); })
                               : A(0);
      const auto [pa, pe, gy] = finish(i, rest, smooth, static_cast<A>(z[y[i]]));
      if (!g) return;
      auto sweep = [&](auto smooth) {
        const VA va(pa), ve(pe);
        int64_t j = 0;
        for (; j + L <= V; j += L) store_row(g, j, grad_of(smooth, load_acc(z + j), va, ve, o.weights(j)));
        for (; j < V; ++j) {
          const auto [x, d] = o.capped_d(static_cast<A>(z[j]));
          const A ds = stable_ds(x);
          A gj = ds * pa;
          if constexpr (decltype(smooth)::value) gj -= pe * o.weight(j) * ds / stable_s(x);
          g[j] = static_cast<T>(gj * d);
        }
      };
      if (eps > 0)
        sweep(std::true_type{});
      else
        sweep(std::false_type{});
      g[y[i]] = static_cast<T>(gy);
    };
    auto strip = [&](const Lanes<T>& s, int64_t i0) {
      const LaneTargets<L> t("stablemax_cross_entropy", y + i0, s.rows, ignore_index, V);
      A rest[L], smooth[L] = {};
      lanes_sum_except(s, V, t, [&](const VA& x) { return stable_s(o.capped(x)); }).store(rest);
      if (eps > 0) o.weighted_sum(s, [](const VA& x) { return stable_log_s(x); }).store(smooth);
      finish_strip(
          s, i0, t, y, o,
          [&](int64_t i, int64_t r) { return finish(i, rest[r], smooth[r], static_cast<A>(s.x[y[i] * s.ld + r])); },
          grad_of);
    };
    for_each_row<T>(logits, grad, with_grad, row, strip);
  });
  return loss;
}

}  // namespace

void fill_losses(CpuKernels& k) {
  k.cross_entropy_z_loss = &cross_entropy_z_loss_cpu;
  k.stablemax_cross_entropy = &stablemax_cross_entropy_cpu;
}

}  // namespace stabkernels::cpu
