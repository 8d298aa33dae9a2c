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

template <typename T>
__global__ void ce_z_kernel(LossArgs a, double z_coef, typename Acc<T>::type* ce, typename Acc<T>::type* zl) {
  using A = typename Acc<T>::type;
  const int64_t row = blockIdx.x, V = a.cols;
  const int64_t y = a.target[row];
  const T* z = static_cast<const T*>(a.logits) + row * a.stride_logits;
  T* g = a.grad ? static_cast<T*>(a.grad) + row * a.stride_grad : nullptr;
  if (ignored_row(y, a.ignore_index, row, V, g, ce, zl)) return;
  A m = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += kThreads) m = nan_max(m, to_acc(z[j]));
  m = block_max(m);
  A s = 0;
  for (int64_t j = threadIdx.x; j < V; j += kThreads)
    if (j != y) s += fexp(to_acc(z[j]) - m);
  const A rest = block_sum(s);
  const A zy = to_acc(z[y]), c = static_cast<A>(z_coef);
  const A sy = zy == m ? A(1) : fexp(zy - m), S = sy + rest;
  const A log_S = zy == m ? log1p(rest) : log(S);  // the target holds the maximum: S = 1 + S_rest
  const A lse = m + log_S;
  if (threadIdx.x == 0) ce[row] = (m - zy) + log_S, zl[row] = c * lse * lse;
  if (!g) return;
  __syncthreads();  // every thread has read z[y] before the row may be overwritten (g may alias z)
  const A scale = *static_cast<const A*>(a.grad_scale);
  const A coef = scale * (A(1) + A(2) * c * lse) / S, gy = scale * (A(2) * c * lse * sy - rest) / S;
  for (int64_t j = threadIdx.x; j < V; j += kThreads)
    g[j] = from_acc<T>(j == y ? gy : fexp(to_acc(z[j]) - m) * coef);
}

template <typename A> __device__ __forceinline__ A stable_s(A x) { return x >= A(0) ? x + A(1) : A(1) / (A(1) - x); }
template <typename A> __device__ __forceinline__ A stable_ds(A x) {
  const A r = A(1) / (A(1) - x);
  return x >= A(0) ? A(1) : r * r;
}

template <typename T>
__global__ void stablemax_kernel(LossArgs a, typename Acc<T>::type* loss) {
  using A = typename Acc<T>::type;
  const int64_t row = blockIdx.x, V = a.cols;
  const int64_t y = a.target[row];
  const T* z = static_cast<const T*>(a.logits) + row * a.stride_logits;
  T* g = a.grad ? static_cast<T*>(a.grad) + row * a.stride_grad : nullptr;
  if (ignored_row(y, a.ignore_index, row, V, g, loss, static_cast<A*>(nullptr))) return;
  A s = 0;
  for (int64_t j = threadIdx.x; j < V; j += kThreads)
    if (j != y) s += stable_s(to_acc(z[j]));
  const A rest = block_sum(s);
  const A zy = to_acc(z[y]), sy = stable_s(zy), S = sy + rest, r = rest / sy;
  if (threadIdx.x == 0) loss[row] = isinf(r) ? log(rest) - log(sy) : log1p(r);
  if (!g) return;
  __syncthreads();  // z[y] read by all before g (possibly z itself) is written
  const A scale = *static_cast<const A*>(a.grad_scale);
  const A inv = scale / S, gy = -scale * (stable_ds(zy) / sy) * (rest / S);
  for (int64_t j = threadIdx.x; j < V; j += kThreads)
    g[j] = from_acc<T>(j == y ? gy : stable_ds(to_acc(z[j])) * inv);
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
