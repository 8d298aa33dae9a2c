// Fused optimizer updates on CPU (SPEC 2.4, 3.1): Adam/AdamW and SGD(momentum) steps over a list of
// parameters in one parallel region, with the per-step scale (radius factor, S-Adam damping) read from a
// 0-d tensor, and the unit proposal u (the step at lr = 1) optionally written out with its squared norm.
//
// The arithmetic follows torch.optim's single-tensor implementations step by step (lerp for the first
// moment, v*b2 + (1-b2)*g*g, denom = sqrt(v)/sqrt(bc2) + eps, u = (m / bc1) / denom), so results agree with
// torch to fp32 rounding. One math template serves scalars and ATen Vectorized<> alike.
#include <torch/library.h>

#include <cmath>

#include "common.h"

namespace stabkernels::cpu {
namespace {

template <typename V> inline V vsqrt(const V& x) { return x.sqrt(); }
inline float vsqrt(float x) { return std::sqrt(x); }
inline double vsqrt(double x) { return std::sqrt(x); }
template <typename V> inline V vmaximum(const V& a, const V& b) { return at::vec::maximum(a, b); }
inline float vmaximum(float a, float b) { return std::max(a, b); }
inline double vmaximum(double a, double b) { return std::max(a, b); }

// The scalar type of a scalar or of a Vectorized<> value.
template <typename V> struct ScalarOf { using type = typename V::value_type; };
template <> struct ScalarOf<float> { using type = float; };
template <> struct ScalarOf<double> { using type = double; };

struct AdamConsts {
  double lr, beta1, beta2, eps, weight_decay, bc1, bc2_sqrt;
  bool decoupled, amsgrad, maximize, apply;
};

// One element (or one SIMD vector) of an Adam step. p, m, v, vmax are updated in place; returns u.
template <typename V>
inline V adam_math(V& p, V g, V& m, V& v, V& vmax, const AdamConsts& c, const V& step_lr, const V& decay) {
  using A = typename ScalarOf<V>::type;
  if (c.maximize) g = V(A(0)) - g;
  if (c.apply && c.decoupled) p = p * decay;  // torch: param.mul_(1 - lr * wd) before the moments
  if (!c.decoupled && c.weight_decay != 0) g = g + p * V(A(c.weight_decay));
  m = m + (g - m) * V(A(1 - c.beta1));  // lerp(m, g, 1 - beta1), weight < 0.5
  v = v * V(A(c.beta2)) + g * V(A(1 - c.beta2)) * g;
  V vh = v;
  if (c.amsgrad) {
    vmax = vmaximum(vmax, v);
    vh = vmax;
  }
  const V denom = vsqrt(vh) / V(A(c.bc2_sqrt)) + V(A(c.eps));
  const V u = (m / V(A(c.bc1))) / denom;
  if (c.apply) p = p - step_lr * u;
  return u;
}

struct SgdConsts {
  double momentum, dampening, weight_decay;
  bool nesterov, maximize, first, apply;
};

template <typename V>
inline V sgd_math(V& p, V g, V& b, const SgdConsts& c, const V& step_lr) {
  using A = typename ScalarOf<V>::type;
  if (c.maximize) g = V(A(0)) - g;
  if (c.weight_decay != 0) g = g + p * V(A(c.weight_decay));
  V u = g;
  if (c.momentum != 0) {
    b = c.first ? g : b * V(A(c.momentum)) + g * V(A(1 - c.dampening));
    u = c.nesterov ? g + b * V(A(c.momentum)) : b;
  }
  if (c.apply) p = p - step_lr * u;
  return u;
}

// SIMD for float32/float64 storage; fp16/bf16 take the scalar loop (math in fp32, one rounding per store).
template <typename T>
constexpr bool kSimd = std::is_same_v<T, acc_t<T>>;

double read_scale(const at::Tensor& scale) {
  TORCH_CHECK(scale.numel() == 1, "step_scale must hold one number");
  return scale.to(at::kDouble).item<double>();
}

at::ScalarType grouped_acc(at::TensorList ts) { return grouped_acc_dtype(ts); }

// Sums of u^2 per tensor from per-chunk partial sums.
at::Tensor per_tensor_sums(const std::vector<Chunk>& chunks, const std::vector<double>& partial, int64_t T,
                           at::ScalarType dtype) {
  std::vector<double> total(T, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) total[chunks[c].index] += partial[c];
  at::Tensor out = at::empty({T}, at::TensorOptions().dtype(at::kDouble));
  std::copy(total.begin(), total.end(), out.mutable_data_ptr<double>());
  return out.to(dtype);
}

std::vector<Chunk> element_chunks(at::TensorList params) {
  std::vector<int64_t> sizes;
  for (const auto& p : params) sizes.push_back(p.numel());
  return make_chunks(sizes, int64_t{1} << 15);
}

at::Tensor adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList updates,
                         const at::Tensor& step_scale, double lr, double beta1, double beta2, double eps,
                         double weight_decay, int64_t step, bool decoupled, bool amsgrad, bool maximize,
                         bool apply) {
  const int64_t T = static_cast<int64_t>(params.size());
  TORCH_CHECK(step >= 1, "adam_step_: step must be >= 1");
  const AdamConsts c{lr, beta1, beta2, eps, weight_decay, 1 - std::pow(beta1, static_cast<double>(step)),
                     std::sqrt(1 - std::pow(beta2, static_cast<double>(step))), decoupled, amsgrad, maximize, apply};
  const double scale = read_scale(step_scale);
  const bool write_u = !updates.empty();
  const auto chunks = element_chunks(params);
  std::vector<double> partial(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t ci = b0; ci < b1; ++ci) {
      const Chunk& ch = chunks[ci];
      const int64_t i = ch.index;
      STABKERNELS_DISPATCH_FLOAT(params[i], "adam_step_cpu", [&] {
        using T = scalar_t;
        using A = acc_t<T>;
        T* p = params[i].mutable_data_ptr<T>();
        const T* g = grads[i].const_data_ptr<T>();
        T* m = exp_avgs[i].mutable_data_ptr<T>();
        T* v = exp_avg_sqs[i].mutable_data_ptr<T>();
        T* vm = amsgrad ? max_exp_avg_sqs[i].mutable_data_ptr<T>() : nullptr;
        A* u_out = write_u ? updates[i].mutable_data_ptr<A>() : nullptr;
        const A step_lr = static_cast<A>(lr * scale), decay = static_cast<A>(1 - lr * weight_decay);
        double sum = 0;
        int64_t j = ch.begin;
        if constexpr (kSimd<T>) {
          using Vec = Vectorized<A>;
          constexpr int64_t L = Vec::size();
          const Vec vlr(step_lr), vdecay(decay);
          Vec acc(A(0));
          for (; j + L <= ch.end; j += L) {
            Vec vp = Vec::loadu(p + j), vmm = Vec::loadu(m + j), vv = Vec::loadu(v + j);
            Vec vmax = amsgrad ? Vec::loadu(vm + j) : Vec(A(0));
            const Vec u = adam_math(vp, Vec::loadu(g + j), vmm, vv, vmax, c, vlr, vdecay);
            if (apply) vp.store(p + j);
            vmm.store(m + j), vv.store(v + j);
            if (amsgrad) vmax.store(vm + j);
            if (write_u) u.store(u_out + j);
            acc = at::vec::fmadd(u, u, acc);
          }
          sum = at::vec::vec_reduce_all<A>([](Vec& a, Vec& b2) { return a + b2; }, acc);
        }
        for (; j < ch.end; ++j) {  // tail, and every element of fp16/bf16 tensors (math in fp32)
          A vp = p[j], vmm = m[j], vv = v[j], vmax = amsgrad ? A(vm[j]) : A(0);
          const A u = adam_math(vp, A(g[j]), vmm, vv, vmax, c, step_lr, decay);
          if (apply) p[j] = static_cast<T>(vp);
          m[j] = static_cast<T>(vmm), v[j] = static_cast<T>(vv);
          if (amsgrad) vm[j] = static_cast<T>(vmax);
          if (write_u) u_out[j] = u;
          sum += static_cast<double>(u) * u;
        }
        partial[ci] = sum;
      });
    }
  });
  return per_tensor_sums(chunks, partial, T, grouped_acc(params));
}

at::Tensor sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList updates,
                        const at::Tensor& step_scale, double lr, double momentum, double dampening,
                        double weight_decay, bool nesterov, bool maximize, bool first, bool apply) {
  const int64_t T = static_cast<int64_t>(params.size());
  const SgdConsts c{momentum, dampening, weight_decay, nesterov, maximize, first, apply};
  const double scale = read_scale(step_scale);
  const bool write_u = !updates.empty();
  const auto chunks = element_chunks(params);
  std::vector<double> partial(chunks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t ci = b0; ci < b1; ++ci) {
      const Chunk& ch = chunks[ci];
      const int64_t i = ch.index;
      STABKERNELS_DISPATCH_FLOAT(params[i], "sgd_step_cpu", [&] {
        using T = scalar_t;
        using A = acc_t<T>;
        T* p = params[i].mutable_data_ptr<T>();
        const T* g = grads[i].const_data_ptr<T>();
        T* b = momentum != 0 ? bufs[i].mutable_data_ptr<T>() : nullptr;
        A* u_out = write_u ? updates[i].mutable_data_ptr<A>() : nullptr;
        const A step_lr = static_cast<A>(lr * scale);
        double sum = 0;
        int64_t j = ch.begin;
        if constexpr (kSimd<T>) {
          using Vec = Vectorized<A>;
          constexpr int64_t L = Vec::size();
          const Vec vlr(step_lr);
          Vec acc(A(0));
          for (; j + L <= ch.end; j += L) {
            Vec vp = Vec::loadu(p + j), vb = b ? Vec::loadu(b + j) : Vec(A(0));
            const Vec u = sgd_math(vp, Vec::loadu(g + j), vb, c, vlr);
            if (apply) vp.store(p + j);
            if (b) vb.store(b + j);
            if (write_u) u.store(u_out + j);
            acc = at::vec::fmadd(u, u, acc);
          }
          sum = at::vec::vec_reduce_all<A>([](Vec& a, Vec& b2) { return a + b2; }, acc);
        }
        for (; j < ch.end; ++j) {
          A vp = p[j], vb = b ? A(b[j]) : A(0);
          const A u = sgd_math(vp, A(g[j]), vb, c, step_lr);
          if (apply) p[j] = static_cast<T>(vp);
          if (b) b[j] = static_cast<T>(vb);
          if (write_u) u_out[j] = u;
          sum += static_cast<double>(u) * u;
        }
        partial[ci] = sum;
      });
    }
  });
  return per_tensor_sums(chunks, partial, T, grouped_acc(params));
}

// p <- p * (1 - lr * weight_decay) - lr * u, with lr read from a 0-d tensor.
void apply_update_cpu(at::TensorList params, at::TensorList updates, const at::Tensor& lr_t, double weight_decay) {
  const double lr = read_scale(lr_t);
  const auto chunks = element_chunks(params);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t ci = b0; ci < b1; ++ci) {
      const Chunk& ch = chunks[ci];
      const int64_t i = ch.index;
      STABKERNELS_DISPATCH_FLOAT(params[i], "apply_update_cpu", [&] {
        using T = scalar_t;
        using A = acc_t<T>;
        T* p = params[i].mutable_data_ptr<T>();
        const A* u = updates[i].const_data_ptr<A>();
        const A a_lr = static_cast<A>(lr), decay = static_cast<A>(1 - lr * weight_decay);
        int64_t j = ch.begin;
        if constexpr (kSimd<T>) {
          using Vec = Vectorized<A>;
          constexpr int64_t L = Vec::size();
          for (; j + L <= ch.end; j += L)
            (Vec::loadu(p + j) * Vec(decay) - Vec(a_lr) * Vec::loadu(u + j)).store(p + j);
        }
        for (; j < ch.end; ++j) p[j] = static_cast<T>(A(p[j]) * decay - a_lr * u[j]);
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(stabkernels_C, CPU, m) {
  m.impl("adam_step_", &adam_step_cpu);
  m.impl("sgd_step_", &sgd_step_cpu);
  m.impl("apply_update_", &apply_update_cpu);
}

}  // namespace stabkernels::cpu
