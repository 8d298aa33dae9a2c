// Fused losses on CUDA: one block per row, three sweeps (max, sum, gradient; the later ones hit L2). The sums leave
// the target's column out (S_rest), so that neither the loss nor the target's gradient cancels when the target
// dominates (the formulas: stabkernels/losses.py, the torch references).
#include "common.cuh"

namespace stabkernels::cuda {
namespace {

constexpr int kThreads = 256;

// Rows whose target is ignore_index: loss 0 and a zero gradient row. Returns whether the row was ignored
// (uniform across the block).
template <typename T, typename A>
__device__ bool ignored_row(int64_t y, int64_t ignore_index, int64_t row, int64_t V, T* g, A* out1, A* out2) {
  if (y != ignore_index) return false;
  if (threadIdx.x == 0) {
    out1[row] = A(0);
    if (out2) out2[row] = A(0);
  }
  if (g)
    for (int64_t j = threadIdx.x; j < V; j += kThreads) g[j] = from_acc<T>(A(0));
  return true;
}

__device__ __forceinline__ float fexp(float x) { return expf(x); }
__device__ __forceinline__ double fexp(double x) { return exp(x); }
__device__ __forceinline__ float ftanh(float x) { return tanhf(x); }
__device__ __forceinline__ double ftanh(double x) { return tanh(x); }
__device__ __forceinline__ float flog1p(float x) { return log1pf(x); }
__device__ __forceinline__ double flog1p(double x) { return log1p(x); }

// SPEC 4.5's options in the math dtype: softcap (cap = 0: off), label smoothing eps, class weights (null: 1).
template <typename A>
struct Opts {
  A cap, eps;
  const A* w;
  __device__ A capped(A x) const { return cap > A(0) ? cap * ftanh(x / cap) : x; }
  // softcap(x) and its derivative 1 - tanh^2
  __device__ A capped(A x, A& d) const {
    if (!(cap > A(0))) {
      d = A(1);
      return x;
    }
    const A t = ftanh(x / cap);
    d = A(1) - t * t;
    return cap * t;
  }
  __device__ A weight(int64_t j) const { return w ? w[j] : A(1); }
};

template <typename A>
__device__ Opts<A> opts_of(const LossArgs& a) {
  return Opts<A>{static_cast<A>(a.softcap), static_cast<A>(a.label_smoothing), static_cast<const A*>(a.weight)};
}

// On z = softcap(logits) (SPEC 4.3, 4.5): ce = (1 - eps) w_y (lse - z_y) + eps / V sum_j w_j (lse - z_j),
// zl = c w_y lse^2, grad_j = scale (p_j a - eps w_j / V) dz_j with a = (1 - eps) w_y + eps W / V + 2 c w_y lse,
// less b_y = (1 - eps + eps / V) w_y at y (the target's written (s_y (a - b_y) - b_y S_rest) / S).
template <typename T>
__global__ void ce_z_kernel(LossArgs a, double z_coef, typename Acc<T>::type* ce, typename Acc<T>::type* zl) {
  using A = typename Acc<T>::type;
  const int64_t row = blockIdx.x, V = a.cols;
  const int64_t y = a.target[row];
  const T* z = static_cast<const T*>(a.logits) + row * a.stride_logits;
  T* g = a.grad ? static_cast<T*>(a.grad) + row * a.stride_grad : nullptr;
  if (ignored_row(y, a.ignore_index, row, V, g, ce, zl)) return;
  const Opts<A> o = opts_of<A>(a);
  A m = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) m = nan_max(m, to_acc(z[j]));
  m = o.capped(block_max(m));  // tanh is increasing: the maximum's softcap is the softcaps' maximum
  A s = 0, sw = 0, ws = 0;
  const bool smooth = o.eps > A(0);
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const A x = o.capped(to_acc(z[j]));
    if (j != y) s += fexp(x - m);
    if (smooth) {  // sum_j w_j (m - z_j) (no term negative) and W = sum_j w_j
      const A wj = o.weight(j);
      sw += wj * (m - x), ws += wj;
    }
  }
  const A rest = block_sum(s);
  const A sum_w = smooth ? block_sum(sw) : A(0), W = smooth ? block_sum(ws) : A(V);
  A dy;
  const A zy = o.capped(to_acc(z[y]), dy), c = static_cast<A>(z_coef), wy = o.weight(y), eps = o.eps;
  const A sy = zy == m ? A(1) : fexp(zy - m), S = sy + rest;
  const A log_S = zy == m ? log1p(rest) : log(S);  // the target holds the maximum: S = 1 + S_rest
  const A lse = m + log_S;
  if (threadIdx.x == 0) {
    A row_ce = (A(1) - eps) * wy * ((m - zy) + log_S);
    if (smooth) row_ce += eps / A(V) * (sum_w + W * log_S);
    ce[row] = row_ce, zl[row] = c * wy * lse * lse;
  }
  if (!g) return;
  __syncthreads();  // every thread has read z[y] before the row may be overwritten (g may alias z)
  const A scale = *static_cast<const A*>(a.grad_scale);
  const A coef = (A(1) - eps) * wy + eps * W / A(V) + A(2) * c * wy * lse, by = (A(1) - eps + eps / A(V)) * wy;
  const A pa = scale * coef / S, pe = scale * eps / A(V);
  const A gy = scale * ((sy * (coef - by) - by * rest) / S) * dy;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    A d;
    const A x = o.capped(to_acc(z[j]), d);
    g[j] = from_acc<T>(j == y ? gy : (fexp(x - m) * pa - pe * o.weight(j)) * d);
  }
}

template <typename A> __device__ __forceinline__ A stable_s(A x) { return x >= A(0) ? x + A(1) : A(1) / (A(1) - x); }
template <typename A> __device__ __forceinline__ A stable_ds(A x) {
  const A r = A(1) / (A(1) - x);
  return x >= A(0) ? A(1) : r * r;
}
// log s(x) = log1p(x) for x >= 0, -log1p(-x) below
template <typename A> __device__ __forceinline__ A stable_log_s(A x) {
  return x >= A(0) ? flog1p(x) : -flog1p(-x);
}

// StableMax on z = softcap(logits) (SPEC 4.2, 4.5): loss = (1 - eps) w_y (log S - log s_y)
// + eps / V sum_j w_j (log S - log s(z_j)); grad_j = scale (s'(z_j) a / S - eps w_j s'(z_j) / (V s(z_j))) dz_j,
// a = (1 - eps) w_y + eps W / V; at y scale s'(z_y) (s_y (a - b_y) - b_y S_rest) / (S s_y) dz_y.
template <typename T>
__global__ void stablemax_kernel(LossArgs a, typename Acc<T>::type* loss) {
  using A = typename Acc<T>::type;
  const int64_t row = blockIdx.x, V = a.cols;
  const int64_t y = a.target[row];
  const T* z = static_cast<const T*>(a.logits) + row * a.stride_logits;
  T* g = a.grad ? static_cast<T*>(a.grad) + row * a.stride_grad : nullptr;
  if (ignored_row(y, a.ignore_index, row, V, g, loss, static_cast<A*>(nullptr))) return;
  const Opts<A> o = opts_of<A>(a);
  const bool smooth = o.eps > A(0);
  A s = 0, sl = 0, ws = 0;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    const A x = o.capped(to_acc(z[j]));
    if (j != y) s += stable_s(x);
    if (smooth) {
      const A wj = o.weight(j);
      sl += wj * stable_log_s(x), ws += wj;
    }
  }
  const A rest = block_sum(s);
  const A sum_l = smooth ? block_sum(sl) : A(0), W = smooth ? block_sum(ws) : A(V);
  A dy;
  const A zy = o.capped(to_acc(z[y]), dy), sy = stable_s(zy), S = sy + rest, r = rest / sy;
  const A wy = o.weight(y), eps = o.eps;
  if (threadIdx.x == 0) {
    A row_loss = (A(1) - eps) * wy * (isinf(r) ? log(rest) - log(sy) : log1p(r));
    if (smooth) row_loss += eps / A(V) * (W * log(S) - sum_l);
    loss[row] = row_loss;
  }
  if (!g) return;
  __syncthreads();  // z[y] read by all before g (possibly z itself) is written
  const A scale = *static_cast<const A*>(a.grad_scale);
  const A coef = (A(1) - eps) * wy + eps * W / A(V), by = (A(1) - eps + eps / A(V)) * wy;
  const A pa = scale * coef / S, pe = scale * eps / A(V);
  const A gy = scale * stable_ds(zy) * ((sy * (coef - by) - by * rest) / (S * sy)) * dy;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) {
    A d;
    const A x = o.capped(to_acc(z[j]), d), ds = stable_ds(x);
    g[j] = from_acc<T>(j == y ? gy : (ds * pa - pe * o.weight(j) * ds / stable_s(x)) * d);
  }
}

}  // namespace

cudaError_t cross_entropy_z_loss(DType dtype, const LossArgs& a, double z_coef, void* ce, void* zl, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    using A = typename Acc<T>::type;
    ce_z_kernel<T><<<static_cast<unsigned>(a.rows), kThreads, 0, stream>>>(a, z_coef, static_cast<A*>(ce),
                                                                            static_cast<A*>(zl));
    return cudaGetLastError();
  });
}

cudaError_t stablemax_cross_entropy(DType dtype, const LossArgs& a, void* loss, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    using A = typename Acc<T>::type;
    stablemax_kernel<T><<<static_cast<unsigned>(a.rows), kThreads, 0, stream>>>(a, static_cast<A*>(loss));
    return cudaGetLastError();
  });
}

}  // namespace stabkernels::cuda
