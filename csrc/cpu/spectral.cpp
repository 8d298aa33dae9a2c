// Spectral family on CPU (SPEC 1.1): grouped power iteration and grouped sums of squares.
//
// power_iteration_: every matrix of the list in one parallel region per iteration. Work is split into
// chunks of rows of about the same byte size, across all matrices; for each row i of a chunk the kernel
// computes x_i = W_i. v and immediately accumulates y += x_i W_i. into a per-thread y, while the row is still
// in L1. So W is streamed from memory once per iteration, where the two mat-vecs of the textbook form read
// it twice. Then, per matrix: sigma = |y| / |x| (= u^T W v_new), u = x / |x|, v = y / |y|.

#include <cmath>

#include "common.h"

namespace stabkernels::cpu::CPU_CAPABILITY {
namespace {

// x[r] = W[r, :] . v and y += x[r] * W[r, :] for rows [r0, r1) of a row-contiguous W.
template <typename T>
void rows_pass_contiguous(const T* W, int64_t s0, int64_t r0, int64_t r1, int64_t n, const acc_t<T>* v,
                          acc_t<T>* x, acc_t<T>* y) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t L = vec_width<T>();
  int64_t r = r0;
  // Four rows at a time: v is loaded once per four dot products, y once per four updates.
  for (; r + 4 <= r1; r += 4) {
    const T* w0 = W + r * s0;
    const T* w1 = w0 + s0;
    const T* w2 = w1 + s0;
    const T* w3 = w2 + s0;
    V a0(A(0)), a1(A(0)), a2(A(0)), a3(A(0));
    int64_t j = 0;
    for (; j + L <= n; j += L) {
      V vv = V::loadu(v + j);
      a0 = at::vec::fmadd(load_acc(w0 + j), vv, a0);
      a1 = at::vec::fmadd(load_acc(w1 + j), vv, a1);
      a2 = at::vec::fmadd(load_acc(w2 + j), vv, a2);
      a3 = at::vec::fmadd(load_acc(w3 + j), vv, a3);
    }
    A d0 = lane_sum(a0), d1 = lane_sum(a1), d2 = lane_sum(a2), d3 = lane_sum(a3);
    for (int64_t t = j; t < n; ++t) {
      d0 += static_cast<A>(w0[t]) * v[t];
      d1 += static_cast<A>(w1[t]) * v[t];
      d2 += static_cast<A>(w2[t]) * v[t];
      d3 += static_cast<A>(w3[t]) * v[t];
    }
    x[r] = d0, x[r + 1] = d1, x[r + 2] = d2, x[r + 3] = d3;
    const V c0(d0), c1(d1), c2(d2), c3(d3);
    j = 0;
    for (; j + L <= n; j += L) {
      V acc = V::loadu(y + j);
      acc = at::vec::fmadd(load_acc(w0 + j), c0, acc);
      acc = at::vec::fmadd(load_acc(w1 + j), c1, acc);
      acc = at::vec::fmadd(load_acc(w2 + j), c2, acc);
      acc = at::vec::fmadd(load_acc(w3 + j), c3, acc);
      acc.store(y + j);
    }
    for (; j < n; ++j)
      y[j] += static_cast<A>(w0[j]) * d0 + static_cast<A>(w1[j]) * d1 + static_cast<A>(w2[j]) * d2 +
              static_cast<A>(w3[j]) * d3;
  }
  for (; r < r1; ++r) {
    const T* w = W + r * s0;
    const A d = dot_acc(w, v, n);
    x[r] = d;
    const V c(d);
    int64_t j = 0;
    for (; j + L <= n; j += L) at::vec::fmadd(load_acc(w + j), c, V::loadu(y + j)).store(y + j);
    for (; j < n; ++j) y[j] += static_cast<A>(w[j]) * d;
  }
}

// The same for arbitrary strides (scalar).
template <typename T>
void rows_pass_strided(const T* W, int64_t s0, int64_t s1, int64_t r0, int64_t r1, int64_t n,
                       const acc_t<T>* v, acc_t<T>* x, acc_t<T>* y) {
  using A = acc_t<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const T* w = W + r * s0;
    A d = 0;
    for (int64_t j = 0; j < n; ++j) d += static_cast<A>(w[j * s1]) * v[j];
    x[r] = d;
    for (int64_t j = 0; j < n; ++j) y[j] += static_cast<A>(w[j * s1]) * d;
  }
}

template <typename A>
A norm2(const A* p, int64_t n) {
  double s = 0;  // double: a few thousand terms, summed once per iteration
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(p[i]) * p[i];
  return static_cast<A>(std::sqrt(s));
}

void check_lists(at::TensorList mats, at::TensorList us, at::TensorList vs) {
  TORCH_CHECK(us.size() == mats.size() && vs.size() == mats.size(),
              "power_iteration_: mats, us and vs must have the same length");
  for (size_t i = 0; i < mats.size(); ++i) {
    const auto& W = mats[i];
    TORCH_CHECK(W.dim() == 2, "power_iteration_: mats[", i, "] must be 2-D");
    const auto acc = acc_dtype(W.scalar_type());
    for (const auto* t : {&us[i], &vs[i]}) {
      TORCH_CHECK(t->dim() == 1 && t->is_contiguous() && t->scalar_type() == acc,
                  "power_iteration_: us[", i, "]/vs[", i, "] must be contiguous 1-D ", acc, " tensors");
    }
    TORCH_CHECK(us[i].size(0) == W.size(0) && vs[i].size(0) == W.size(1), "power_iteration_: mats[", i,
                "] is ", W.sizes(), " but us/vs have ", us[i].size(0), "/", vs[i].size(0), " elements");
  }
}

at::Tensor power_iteration_cpu(at::TensorList mats, at::TensorList us, at::TensorList vs, int64_t iters,
                               double eps) {
  check_lists(mats, us, vs);
  const int64_t T = static_cast<int64_t>(mats.size());
  at::Tensor sigma = at::zeros({T}, at::TensorOptions().dtype(grouped_acc_dtype(mats)));
  if (T == 0 || iters <= 0) return sigma;
  const int64_t threads = at::get_num_threads();
  std::vector<at::Tensor> xs(T), ys(T);  // x: (m,), y: per-thread partial sums (threads, n)
  std::vector<int64_t> rows(T);
  std::vector<char> active(T, 1);  // cleared for zero or non-finite matrices: their u, v stay as they were
  for (int64_t i = 0; i < T; ++i) {
    xs[i] = at::empty({mats[i].size(0)}, us[i].options());
    ys[i] = at::empty({threads, mats[i].size(1)}, vs[i].options());
    rows[i] = mats[i].size(0);
  }
  std::vector<Chunk> all_chunks;
  {
    // Chunks of ~64K elements: rows per chunk depend on each matrix's width.
    for (int64_t i = 0; i < T; ++i) {
      const int64_t per = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, mats[i].size(1)));
      for (int64_t b = 0; b < rows[i]; b += per) all_chunks.push_back({i, b, std::min(rows[i], b + per)});
    }
  }
  for (int64_t it = 0; it < iters; ++it) {
    for (int64_t i = 0; i < T; ++i)
      if (active[i]) ys[i].zero_();
    at::parallel_for(0, static_cast<int64_t>(all_chunks.size()), 1, [&](int64_t b, int64_t e) {
      const int64_t tid = at::get_thread_num();
      for (int64_t c = b; c < e; ++c) {
        const Chunk& ch = all_chunks[c];
        if (!active[ch.index]) continue;
        const at::Tensor& W = mats[ch.index];
        STABKERNELS_DISPATCH_FLOAT(W, "power_iteration_cpu", [&] {
          using A = acc_t<scalar_t>;
          const auto* w = W.const_data_ptr<scalar_t>();
          const A* v = vs[ch.index].const_data_ptr<A>();
          A* x = xs[ch.index].mutable_data_ptr<A>();
          A* y = ys[ch.index].mutable_data_ptr<A>() + tid * W.size(1);
          if (W.stride(1) == 1 || W.size(1) == 1)
            rows_pass_contiguous(w, W.stride(0), ch.begin, ch.end, W.size(1), v, x, y);
          else
            rows_pass_strided(w, W.stride(0), W.stride(1), ch.begin, ch.end, W.size(1), v, x, y);
        });
      }
    });
    at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        if (!active[i]) continue;
        AT_DISPATCH_FLOATING_TYPES(us[i].scalar_type(), "power_iteration_norm", [&] {
          const int64_t m = mats[i].size(0), n = mats[i].size(1);
          scalar_t* y = ys[i].mutable_data_ptr<scalar_t>();
          for (int64_t t = 1; t < threads; ++t)
            for (int64_t j = 0; j < n; ++j) y[j] += y[t * n + j];
          const scalar_t* x = xs[i].const_data_ptr<scalar_t>();
          const scalar_t nx = norm2(x, m), ny = norm2(y, n);
          double s;
          if (!std::isfinite(nx) || !std::isfinite(ny)) {
            s = std::numeric_limits<double>::quiet_NaN();
            active[i] = 0;
          } else if (nx <= eps || ny <= 0) {
            s = 0.0;  // zero matrix: sigma 0, the vectors keep their last unit values
            active[i] = 0;
          } else {
            scalar_t* u = us[i].mutable_data_ptr<scalar_t>();
            scalar_t* v = vs[i].mutable_data_ptr<scalar_t>();
            for (int64_t j = 0; j < m; ++j) u[j] = x[j] / nx;
            for (int64_t j = 0; j < n; ++j) v[j] = y[j] / ny;
            s = static_cast<double>(ny) / nx;
          }
          if (sigma.scalar_type() == at::kDouble)
            sigma.mutable_data_ptr<double>()[i] = s;
          else
            sigma.mutable_data_ptr<float>()[i] = static_cast<float>(s);
        });
      }
    });
  }
  return sigma;
}

// Sum of squares of each tensor, in chunks across all tensors; chunk sums in acc_t, combined in double.
at::Tensor sq_norms_cpu(at::TensorList tensors) {
  const int64_t T = static_cast<int64_t>(tensors.size());
  at::Tensor out = at::zeros({T}, at::TensorOptions().dtype(grouped_acc_dtype(tensors)));
  std::vector<at::Tensor> flat(T);
  std::vector<int64_t> sizes(T);
  for (int64_t i = 0; i < T; ++i) {
    TORCH_CHECK(tensors[i].layout() == at::kStrided, "sq_norms: tensors[", i, "] must be dense");
    flat[i] = tensors[i].contiguous();
    sizes[i] = flat[i].numel();
  }
  const auto chunks = make_chunks(sizes, int64_t{1} << 16);
  std::vector<double> partial(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const Chunk& ch = chunks[c];
      STABKERNELS_DISPATCH_FLOAT(flat[ch.index], "sq_norms_cpu", [&] {
        using A = acc_t<scalar_t>;
        using V = Vectorized<A>;
        constexpr int64_t L = vec_width<scalar_t>();
        const scalar_t* p = flat[ch.index].const_data_ptr<scalar_t>();
        V s0(A(0)), s1(A(0));
        int64_t j = ch.begin;
        for (; j + 2 * L <= ch.end; j += 2 * L) {
          V a = load_acc(p + j), q = load_acc(p + j + L);
          s0 = at::vec::fmadd(a, a, s0);
          s1 = at::vec::fmadd(q, q, s1);
        }
        A s = lane_sum(s0 + s1);
        for (; j < ch.end; ++j) s += static_cast<A>(p[j]) * static_cast<A>(p[j]);
        partial[c] = s;
      });
    }
  });
  std::vector<double> total(T, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) total[chunks[c].index] += partial[c];
  for (int64_t i = 0; i < T; ++i) {
    if (out.scalar_type() == at::kDouble)
      out.mutable_data_ptr<double>()[i] = total[i];
    else
      out.mutable_data_ptr<float>()[i] = static_cast<float>(total[i]);
  }
  return out;
}

}  // namespace

void fill_spectral(CpuKernels& k) {
  k.power_iteration_ = &power_iteration_cpu;
  k.sq_norms = &sq_norms_cpu;
}

}  // namespace stabkernels::cpu
