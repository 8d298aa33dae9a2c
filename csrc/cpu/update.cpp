// Fused optimizer updates on CPU (SPEC 2.4, 3.1): Adam/AdamW and SGD(momentum) steps over a list of
// parameters in one parallel region, with the per-step scale (radius factor, S-Adam damping) read from a
// 0-d tensor, and the unit proposal u (the step at lr = 1) optionally written out with its squared norm.
//
// The arithmetic follows torch.optim's single-tensor implementations step by step (lerp for the first
// moment, v*b2 + (1-b2)*g*g, denom = sqrt(v)/sqrt(bc2) + eps, u = (m / bc1) / denom), so results agree with
// torch to fp32 rounding. One math template serves scalars and ATen Vectorized<> alike.
//
// skip (SPEC 7.1): a 0-d tensor read here (free on CPU); nonzero returns before any memory is written (the
// lists are still checked), with zero sums. clip_stats (SPEC 7.2): 1, the Adam pass also sums
// g^2 / max(v_hat / bc2, eps^2) per tensor (update clipping's RMS^2 * numel), returned as a second row; 2, a
// pass that reads g and v (max v; p for coupled decay), writes nothing and returns those sums alone; 3, the
// whole clipped step (StableAdamW): per block of whole tensors, that pass, then the step of each tensor at
// lr / max(1, RMS) (as update.clip_lrs computes it), so that the second pass finds part of the block's g and v
// still in cache (9 element-passes by count; reads, which bound these passes here, 6 against AdamW's 4, fewer
// from memory). lr: one number or one per tensor.

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>

#include "common.h"
#include "../list_checks.h"

namespace stabkernels::cpu::CPU_CAPABILITY {
namespace {

template <typename V> inline V vsqrt(const V& x) { return x.sqrt(); }
inline float vsqrt(float x) { return std::sqrt(x); }
inline double vsqrt(double x) { return std::sqrt(x); }
template <typename V> inline V vmaximum(const V& a, const V& b) { return at::vec::maximum(a, b); }
inline float vmaximum(float a, float b) { return std::max(a, b); }
inline double vmaximum(double a, double b) { return std::max(a, b); }

struct AdamConsts {
  double beta1, beta2, eps, weight_decay, bc1, bc2_sqrt, bc2, eps_clip;
  bool decoupled, amsgrad, maximize, apply, clip;
};

// A chunk's own copy of the constants, in its math type A (each rounded from double once, as before the
// loop). It is a local of the chunk's code on purpose: vector stores may alias any memory (the intrinsics'
// unaligned types are may_alias), and constants shared with the parallel region are memory the OpenMP
// runtime can see, so read from there they were reloaded, converted and broadcast, and their flags tested,
// in every vector iteration; from a private copy the compiler keeps them in registers.
template <typename A>
struct AdamArgs {
  A one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, bc1, bc2_sqrt, step_lr, decay, inv_bc2, eps2;
  bool decoupled, l2, amsgrad, maximize, apply, clip;  // l2: Adam's weight decay on g (tested in double)
  AdamArgs(const AdamConsts& c, double lr, double scale)
      : one_minus_beta1(A(1 - c.beta1)), beta2(A(c.beta2)), one_minus_beta2(A(1 - c.beta2)), eps(A(c.eps)),
        weight_decay(A(c.weight_decay)), bc1(A(c.bc1)), bc2_sqrt(A(c.bc2_sqrt)), step_lr(A(lr * scale)),
        decay(A(1 - lr * c.weight_decay)), inv_bc2(A(1 / c.bc2)),
        // at least the smallest normal number: a tiny eps (1e-25) squares to 0 in float32, and 0 / 0 is NaN
        eps2(std::max(A(c.eps_clip * c.eps_clip), std::numeric_limits<A>::min())),
        decoupled(c.decoupled), l2(!c.decoupled && c.weight_decay != 0), amsgrad(c.amsgrad), maximize(c.maximize),
        apply(c.apply), clip(c.clip) {}
};

// The parts of an Adam step that update clipping's statistic needs too (the "only" pass and the step compute
// v the same way, so the RMS is that of the v the step then stores).
template <typename V, typename A>
inline V adam_grad(V p, V g, const AdamArgs<A>& c) {
  if (c.maximize) g = V(A(0)) - g;
  if (c.l2) g = g + p * V(c.weight_decay);
  return g;
}
template <typename V, typename A>
inline V adam_next_v(V v, V g, const AdamArgs<A>& c) {
  return v * V(c.beta2) + g * V(c.one_minus_beta2) * g;
}
// g^2 / max(v_hat / bc2, eps^2), v_hat unrounded in the math type (1 / bc2 formed in double, rounded once).
template <typename V, typename A>
inline V clip_stat(V g, V vh, const AdamArgs<A>& c) {
  return g * g / vmaximum(vh * V(c.inv_bc2), V(c.eps2));
}

// One element (or one SIMD vector) of an Adam step. p, m, v, vmax are updated in place; returns u. With
// c.clip, stat receives clip_stat.
template <typename V, typename A>
inline V adam_math(V& p, V g, V& m, V& v, V& vmax, V& stat, const AdamArgs<A>& c) {
  if (c.apply && c.decoupled) p = p * V(c.decay);  // torch: param.mul_(1 - lr * wd) before the moments
  g = adam_grad(p, g, c);  // p is decayed only when decoupled, and l2 only when not: the order is immaterial
  m = m + (g - m) * V(c.one_minus_beta1);  // lerp(m, g, 1 - beta1), weight < 0.5
  v = adam_next_v(v, g, c);
  V vh = v;
  if (c.amsgrad) {
    vmax = vmaximum(vmax, v);
    vh = vmax;
  }
  const V denom = vsqrt(vh) / V(c.bc2_sqrt) + V(c.eps);
  const V u = (m / V(c.bc1)) / denom;
  if (c.clip) stat = clip_stat(g, vh, c);
  if (c.apply) p = p - V(c.step_lr) * u;
  return u;
}

struct SgdConsts {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first, apply;
};

// As AdamArgs, for SGD.
template <typename A>
struct SgdArgs {
  A momentum, one_minus_dampening, weight_decay, step_lr;
  bool decay, nesterov, maximize, first, apply;  // decay: weight_decay != 0 (tested in double)
  SgdArgs(const SgdConsts& c, double scale)
      : momentum(A(c.momentum)), one_minus_dampening(A(1 - c.dampening)), weight_decay(A(c.weight_decay)),
        step_lr(A(c.lr * scale)), decay(c.weight_decay != 0), nesterov(c.nesterov), maximize(c.maximize),
        first(c.first), apply(c.apply) {}
};

template <typename V, typename A>
inline V sgd_math(V& p, V g, V& b, const SgdArgs<A>& c, bool has_momentum) {
  if (c.maximize) g = V(A(0)) - g;
  if (c.decay) g = g + p * V(c.weight_decay);
  V u = g;
  if (has_momentum) {
    b = c.first ? g : b * V(c.momentum) + g * V(c.one_minus_dampening);
    u = c.nesterov ? g + b * V(c.momentum) : b;
  }
  if (c.apply) p = p - V(c.step_lr) * u;
  return u;
}

// SIMD for float32/float64 storage; fp16/bf16 take the scalar loop (math in fp32, one rounding per store).
template <typename T>
constexpr bool kSimd = std::is_same_v<T, acc_t<T>>;

// One scalar or one SIMD vector of acc_t<T>, loaded from and stored to T storage.
template <typename V, typename T>
inline V load(const T* p) {
  if constexpr (std::is_floating_point_v<V>) {
    return static_cast<V>(*p);
  } else {
    return V::loadu(p);
  }
}
template <typename V, typename T>
inline void store(T* p, const V& v) {
  if constexpr (std::is_floating_point_v<V>) {
    *p = static_cast<T>(v);
  } else {
    v.store(p);
  }
}

// Runs body(j, stat) over [begin, end): whole SIMD vectors when T is the math type, then scalars (the tail, or
// every element of fp16/bf16 tensors); stat is a V (or A) zero the body may set. body updates its block in
// place and returns the unit proposal u, which is stored into u_out when given; returns {sum(u^2), sum(stat)}
// (the second only with kStat). Each kernel's arithmetic is written once.
template <typename T, bool kStat = false, typename Body>
std::array<double, 2> run_chunk(int64_t begin, int64_t end, acc_t<T>* u_out, Body&& body) {
  using A = acc_t<T>;
  double sum = 0, stat_sum = 0;
  int64_t j = begin;
  if constexpr (kSimd<T>) {
    using V = Vectorized<A>;
    constexpr int64_t L = V::size();
    V acc(A(0)), acc_stat(A(0));
    for (; j + L <= end; j += L) {
      V stat(A(0));
      const V u = body(j, stat);
      if (u_out) u.store(u_out + j);
      acc = at::vec::fmadd(u, u, acc);
      if constexpr (kStat) acc_stat = acc_stat + stat;
    }
    sum = lane_sum(acc);
    if constexpr (kStat) stat_sum = lane_sum(acc_stat);
  }
  for (; j < end; ++j) {
    A stat(0);
    const A u = body(j, stat);
    if (u_out) u_out[j] = u;
    sum += static_cast<double>(u) * u;
    if constexpr (kStat) stat_sum += static_cast<double>(stat);
  }
  return {sum, stat_sum};
}

double read_number(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.numel() == 1, name, " must hold one number, got shape ", t.sizes());
  return t.item().toDouble();  // any dtype, read as it is (a .to(kDouble) first would be one more op)
}

double read_scale(const at::Tensor& scale) { return read_number(scale, "step_scale"); }

// Whether the optional skip flag says "skip this step" (SPEC 7.1; read on the host: free on CPU).
bool skipped(const std::optional<at::Tensor>& skip) { return skip.has_value() && read_number(*skip, "skip") != 0; }

// Calls fn(chunk) -> {double, double} for chunks of ~32K elements across all parameters in one parallel region
// and returns the per-tensor totals of the first (rows == 1: shape (T,)) or of both (rows == 2: (2, T)), float64
// if a parameter is float64, else float32.
template <typename F>
at::Tensor chunked_sums(at::TensorList params, int64_t rows, F&& fn) {
  std::vector<int64_t> sizes;
  for (const auto& p : params) sizes.push_back(p.numel());
  const auto chunks = make_chunks(sizes, int64_t{1} << 15);
  std::vector<std::array<double, 2>> partial(chunks.size(), {0.0, 0.0});
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t ci = b0; ci < b1; ++ci) partial[ci] = fn(chunks[ci]);
  });
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<double> total(rows * n, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c)
    for (int64_t r = 0; r < rows; ++r) total[r * n + chunks[c].index] += partial[c][r];
  at::Tensor out = rows == 1 ? at::empty({n}, at::TensorOptions().dtype(at::kDouble))
                             : at::empty({rows, n}, at::TensorOptions().dtype(at::kDouble));
  std::copy(total.begin(), total.end(), out.mutable_data_ptr<double>());
  return out.to(grouped_acc_dtype(params));
}

// The sums of a skipped step: zeros of chunked_sums' shape and dtype.
at::Tensor zero_sums(at::TensorList params, int64_t rows) {
  const int64_t n = static_cast<int64_t>(params.size());
  const auto options = at::TensorOptions().dtype(grouped_acc_dtype(params));
  return rows == 1 ? at::zeros({n}, options) : at::zeros({rows, n}, options);
}

// lr as one number or one per tensor (read from a CPU tensor; ValueError otherwise).
struct Lrs {
  at::Tensor t;
  const double* v;
  bool per_tensor;
  double operator[](int64_t i) const { return v[per_tensor ? i : 0]; }
};
Lrs read_lrs(const at::Tensor& lr_t, at::TensorList params, const char* op) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(lr_t.numel() == 1 || (lr_t.dim() == 1 && lr_t.numel() == n), op,
                    ": lr must hold one number or one per tensor (", n, "), got shape ", lr_t.sizes());
  at::Tensor t = lr_t.to(at::kDouble).contiguous();
  const double* v = t.const_data_ptr<double>();
  return {std::move(t), v, lr_t.numel() != 1};
}

// The lists of one adam_step_ call.
struct AdamLists {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, updates;
};

// One chunk of an Adam call: with `only`, update clipping's statistic alone (g, v, max v and, for Adam's L2
// decay, p read; nothing written), returned as sums[1]; else the step at learning rate lr (sums[0] = sum(u^2),
// sums[1] the statistic when c.clip).
std::array<double, 2> adam_chunk(const AdamLists& L, const Chunk& ch, const AdamConsts& c, double lr, double scale,
                                 bool only) {
  const int64_t i = ch.index;
  std::array<double, 2> sums{0.0, 0.0};
  STABKERNELS_DISPATCH_FLOAT(L.params[i], "adam_step_cpu", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const AdamArgs<A> k(c, lr, scale);
    const bool apply = k.apply && !only;
    // p is read only when the step needs it: applied, or Adam's L2 decay on g
    const bool read_p = apply || k.l2;
    T* p = L.params[i].mutable_data_ptr<T>();
    const T* g = L.grads[i].const_data_ptr<T>();
    T* m = L.exp_avgs[i].mutable_data_ptr<T>();
    T* v = L.exp_avg_sqs[i].mutable_data_ptr<T>();
    T* vm = k.amsgrad ? L.max_exp_avg_sqs[i].mutable_data_ptr<T>() : nullptr;
    if (only) {
      sums = run_chunk<T, true>(ch.begin, ch.end, nullptr, [&](int64_t j, auto& stat) {
        using V = std::remove_reference_t<decltype(stat)>;
        const V gj = adam_grad(read_p ? load<V>(p + j) : V(A(0)), load<V>(g + j), k);
        const V vj = adam_next_v(load<V>(v + j), gj, k);
        stat = clip_stat(gj, vm ? vmaximum(load<V>(vm + j), vj) : vj, k);
        return V(A(0));
      });
      return;
    }
    A* u_out = L.updates.empty() ? nullptr : L.updates[i].mutable_data_ptr<A>();
    auto body = [&](int64_t j, auto& stat) {
      using V = std::remove_reference_t<decltype(stat)>;
      V vp = read_p ? load<V>(p + j) : V(A(0)), vmm = load<V>(m + j), vv = load<V>(v + j);
      V vmax = vm ? load<V>(vm + j) : V(A(0));
      const V u = adam_math(vp, load<V>(g + j), vmm, vv, vmax, stat, k);
      if (k.apply) store(p + j, vp);
      store(m + j, vmm);
      store(v + j, vv);
      if (vm) store(vm + j, vmax);
      return u;
    };
    sums = k.clip ? run_chunk<T, true>(ch.begin, ch.end, u_out, body)
                  : run_chunk<T, false>(ch.begin, ch.end, u_out, body);
  });
  return sums;
}

// Tensors are stepped in blocks of whole tensors of at least this many elements (clip_stats 3): the g and v
// of a block's first pass (8 bytes an element in fp32) fit the last-level cache beside the p and m of its
// second.
constexpr int64_t kClipBlock = int64_t{1} << 20;

// clip_stats 3: the clipped step (see the top of the file). Returns (2, T) as clip_stats 1 does.
at::Tensor clipped_adam_cpu(const AdamLists& L, const AdamConsts& c, const Lrs& lrs, double scale) {
  const at::TensorList params = L.params;
  const int64_t n = static_cast<int64_t>(params.size());
  std::vector<int64_t> sizes;
  for (const auto& p : params) sizes.push_back(p.numel());
  const auto chunks = make_chunks(sizes, int64_t{1} << 15);
  const int64_t nc = static_cast<int64_t>(chunks.size());
  // update.clip_lrs' arithmetic: the sums rounded to the returned dtype, then lr / max(1, sqrt(sum / numel))
  const bool f64 = grouped_acc_dtype(params) == at::kDouble;
  std::vector<std::array<double, 2>> partial(chunks.size(), {0.0, 0.0});
  std::vector<double> total(2 * n, 0.0), lr(n, 0.0);
  int64_t c0 = 0;
  while (c0 < nc) {  // one block: chunks [c0, c1), whole tensors
    int64_t c1 = c0, elems = 0;
    while (c1 < nc && (elems < kClipBlock || chunks[c1].index == chunks[c1 - 1].index)) {
      elems += chunks[c1].end - chunks[c1].begin;
      ++c1;
    }
    at::parallel_for(c0, c1, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t ci = b0; ci < b1; ++ci) partial[ci] = adam_chunk(L, chunks[ci], c, 1.0, scale, true);
    });
    for (int64_t ci = c0; ci < c1; ++ci) total[n + chunks[ci].index] += partial[ci][1];
    for (int64_t i = chunks[c0].index; i <= chunks[c1 - 1].index; ++i) {
      const double s = f64 ? total[n + i] : static_cast<double>(static_cast<float>(total[n + i]));
      const double rms = std::sqrt(s / static_cast<double>(sizes[i]));
      lr[i] = lrs[i] / (rms > 1.0 || std::isnan(rms) ? rms : 1.0);  // max(1, rms), NaN kept (torch's clamp_min)
    }
    // the same range per thread as above, forwards: walking backwards (to meet the last-read chunks first) was
    // slower on a 2-core Zen 4 VM (ResNet-18: 1.23-1.30x AdamW(fused) against 1.20-1.24x, same process)
    at::parallel_for(c0, c1, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t ci = b0; ci < b1; ++ci)
        partial[ci] = adam_chunk(L, chunks[ci], c, lr[chunks[ci].index], scale, false);
    });
    for (int64_t ci = c0; ci < c1; ++ci) total[chunks[ci].index] += partial[ci][0];
    c0 = c1;
  }
  at::Tensor out = at::empty({2, n}, at::TensorOptions().dtype(at::kDouble));
  std::copy(total.begin(), total.end(), out.mutable_data_ptr<double>());
  return out.to(grouped_acc_dtype(params));
}

at::Tensor adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList updates,
                         const at::Tensor& step_scale, const at::Tensor& lr_t, const at::Tensor& step_t,
                         double beta1, double beta2, double eps, double weight_decay, bool decoupled, bool amsgrad,
                         bool maximize, bool apply, bool eps_raw, const std::optional<at::Tensor>& skip,
                         int64_t clip_stats) {
  // lr, step and skip arrive as float64 CPU tensors: reading them is free on CPU.
  const bool skip_now = skipped(skip);
  const double step = read_number(step_t, "step");
  // a skipped step may come with a counter that it left at 0 (its bias corrections are never used)
  TORCH_CHECK_VALUE(skip_now || step >= 1, "adam_step_: step must be >= 1, got ", step);
  TORCH_CHECK_VALUE(clip_stats >= 0 && clip_stats <= 3, "adam_step_: clip_stats must be 0, 1, 2 or 3, got ",
                    clip_stats);
  const Lrs lrs = read_lrs(lr_t, params, "adam_step_");
  check_update_lists("adam_step_", params,
                     {{"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
                      {"max_exp_avg_sqs", max_exp_avg_sqs, false, amsgrad}, {"updates", updates, true, false}},
                     at::kCPU);
  const int64_t rows = clip_stats ? 2 : 1;
  if (skip_now) return zero_sums(params, rows);
  const bool only = clip_stats == 2;
  const double bc2 = 1 - std::pow(beta2, step), bc2_sqrt = std::sqrt(bc2);
  const AdamConsts c{beta1, beta2, eps_raw ? eps / bc2_sqrt : eps, weight_decay, 1 - std::pow(beta1, step),
                     bc2_sqrt, bc2, eps, decoupled, amsgrad, maximize, apply && !only, clip_stats == 1};
  const double scale = read_scale(step_scale);
  const AdamLists lists{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, updates};
  if (clip_stats == 3) return clipped_adam_cpu(lists, c, lrs, scale);
  return chunked_sums(params, rows, [&](const Chunk& ch) { return adam_chunk(lists, ch, c, lrs[ch.index], scale, only); });
}

at::Tensor sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList updates,
                        const at::Tensor& step_scale, const at::Tensor& lr_t, double momentum, double dampening,
                        double weight_decay, bool nesterov, bool maximize, bool first, bool apply,
                        const std::optional<at::Tensor>& skip) {
  const bool skip_now = skipped(skip);
  const double lr = read_number(lr_t, "lr");
  check_update_lists("sgd_step_", params,
                     {{"grads", grads}, {"momentum_buffers", bufs, false, momentum != 0},
                      {"updates", updates, true, false}},
                     at::kCPU);
  if (skip_now) return zero_sums(params, 1);
  const SgdConsts c{lr, momentum, dampening, weight_decay, nesterov, maximize, first, apply};
  const double scale = read_scale(step_scale);
  return chunked_sums(params, 1, [&](const Chunk& ch) {
    const int64_t i = ch.index;
    std::array<double, 2> sums{0.0, 0.0};
    STABKERNELS_DISPATCH_FLOAT(params[i], "sgd_step_cpu", [&] {
      using T = scalar_t;
      using A = acc_t<T>;
      const SgdArgs<A> k(c, scale);
      T* p = params[i].mutable_data_ptr<T>();
      const T* g = grads[i].const_data_ptr<T>();
      T* b = c.momentum != 0 ? bufs[i].mutable_data_ptr<T>() : nullptr;
      sums = run_chunk<T>(ch.begin, ch.end, updates.empty() ? nullptr : updates[i].mutable_data_ptr<A>(),
                          [&](int64_t j, auto& stat) {
                            using V = std::remove_reference_t<decltype(stat)>;
                            V vp = load<V>(p + j), vb = b ? load<V>(b + j) : V(A(0));
                            const V u = sgd_math(vp, load<V>(g + j), vb, k, b != nullptr);
                            if (k.apply) store(p + j, vp);
                            if (b) store(b + j, vb);
                            return u;
                          });
    });
    return sums;
  });
}

// p <- p * (1 - lr_i * weight_decay) - lr_i * step_scale * u, lr_i = lr (one number) or lr[i] (one per
// tensor, update clipping), read from CPU tensors; nothing when skip is nonzero.
void apply_update_cpu(at::TensorList params, at::TensorList updates, const at::Tensor& lr_t, double weight_decay,
                      const std::optional<at::Tensor>& step_scale, const std::optional<at::Tensor>& skip) {
  check_update_lists("apply_update_", params, {{"updates", updates, true}}, at::kCPU);
  const Lrs lrs = read_lrs(lr_t, params, "apply_update_");
  if (skipped(skip)) return;
  const double scale = step_scale.has_value() ? read_scale(*step_scale) : 1.0;
  chunked_sums(params, 1, [&](const Chunk& ch) {
    const int64_t i = ch.index;
    const double lr = lrs[i];
    STABKERNELS_DISPATCH_FLOAT(params[i], "apply_update_cpu", [&] {
      using T = scalar_t;
      using A = acc_t<T>;
      T* p = params[i].mutable_data_ptr<T>();
      const A* u = updates[i].const_data_ptr<A>();
      const A a_step = static_cast<A>(lr * scale), decay = static_cast<A>(1 - lr * weight_decay);
      run_chunk<T>(ch.begin, ch.end, nullptr, [&](int64_t j, auto& stat) {
        using V = std::remove_reference_t<decltype(stat)>;
        store(p + j, load<V>(p + j) * V(decay) - V(a_step) * load<V>(u + j));
        return V(A(0));
      });
    });
    return std::array<double, 2>{0.0, 0.0};
  });
}

// SkipStep's rule (SPEC 7.1; the schema's comment): one call instead of the ~15 small torch ops it took, which
// cost ~0.25 ms a step on CPU when run after a step that had flushed the caches.
at::Tensor skip_rule_cpu(const at::Tensor& history, const at::Tensor& skipped, const at::Tensor& loss,
                         const std::optional<at::Tensor>& grad_norm, int64_t count, int64_t warmup,
                         double sigma_factor) {
  TORCH_CHECK_VALUE(history.device().is_cpu() && history.scalar_type() == at::kDouble && history.dim() == 2 &&
                        history.size(0) == 2 && history.size(1) >= 2 && history.is_contiguous(),
                    "skip_rule_: history must be a contiguous (2, window >= 2) float64 CPU tensor, got ",
                    history.scalar_type(), " of shape ", history.sizes(), " on ", history.device());
  TORCH_CHECK_VALUE(skipped.device().is_cpu() && skipped.scalar_type() == at::kLong && skipped.numel() == 1,
                    "skip_rule_: skipped must be a one-element int64 CPU tensor");
  TORCH_CHECK_VALUE(count >= 0, "skip_rule_: count must be >= 0, got ", count);
  const int rows = grad_norm.has_value() ? 2 : 1;
  const double x[2] = {read_number(loss, "loss"), rows == 2 ? read_number(*grad_norm, "grad_norm") : 0.0};
  const int64_t window = history.size(1), n = std::min(count, window);
  double* h = history.mutable_data_ptr<double>();
  bool keep = true;
  if (count + 1 >= warmup) {
    for (int r = 0; r < rows; ++r) {
      const double* row = h + r * window;
      double sum = 0;
      for (int64_t j = 0; j < n; ++j) sum += row[j];
      const double mean = sum / static_cast<double>(n);
      double sq = 0;
      for (int64_t j = 0; j < n; ++j) sq += (row[j] - mean) * (row[j] - mean);
      const double sd = std::sqrt(sq / static_cast<double>(n - 1));
      keep = keep && std::abs(x[r] - mean) / sd <= sigma_factor;  // NaN (a NaN value, std 0 at x = mean) fails
    }
  }
  for (int r = 0; r < rows; ++r) h[r * window + count % window] = x[r];
  if (!keep) *skipped.mutable_data_ptr<int64_t>() += 1;
  return at::scalar_tensor(keep, at::TensorOptions().dtype(at::kBool));
}

// advance_steps_ (the schema's comment): ~0.2 ms a step for a ResNet's 62 counters as _foreach_add_ on CPU
// (one dispatched add_ each), about 1 us here.
void advance_steps_cpu(at::TensorList steps, const std::optional<at::Tensor>& skip) {
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& t = steps[i];
    TORCH_CHECK_VALUE(t.device().is_cpu() && t.numel() == 1 &&
                          (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                      "advance_steps_: steps[", i, "] must be a one-element float32 or float64 CPU tensor, got ",
                      t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
  }
  if (skipped(skip)) return;
  for (const at::Tensor& t : steps) {
    if (t.scalar_type() == at::kFloat) {
      *t.mutable_data_ptr<float>() += 1.0f;
    } else {
      *t.mutable_data_ptr<double>() += 1.0;
    }
  }
}

}  // namespace

void fill_update(CpuKernels& k) {
  k.adam_step_ = &adam_step_cpu;
  k.sgd_step_ = &sgd_step_cpu;
  k.apply_update_ = &apply_update_cpu;
  k.skip_rule_ = &skip_rule_cpu;
  k.advance_steps_ = &advance_steps_cpu;
}

}  // namespace stabkernels::cpu
