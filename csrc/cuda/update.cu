// Fused optimizer updates on CUDA: one launch per storage dtype over every parameter, in chunks of
// kUpdateChunk elements. The per-step scalars (lr, step scale, Adam's step number) are read from device
// memory and Adam's bias corrections computed here from the step number, so a step makes no host round trip
// and a captured CUDA graph replays the right corrections; the other hyper-parameters are kernel arguments.
// Arithmetic as in csrc/cpu/update.cpp (torch.optim's order of operations; constants rounded from double
// to the math type once, step_lr = lr * scale and 1 - lr * wd formed in double as there).
// The optional skip flag (SPEC 7.1) is read by every block from device memory; a skipped step's blocks
// write zero partials and return, uniformly (before any barrier). Update clipping's statistic (SPEC 7.2) is
// a second row of partials.
#include "common.cuh"

namespace stabkernels::cuda {
namespace {

constexpr int kThreads = 256;

// The smallest normal number of the math type (numeric_limits<A>::min()).
template <typename A> __device__ __forceinline__ A smallest_normal();
template <> __device__ __forceinline__ float smallest_normal<float>() { return 1.17549435082228750797e-38f; }
template <> __device__ __forceinline__ double smallest_normal<double>() { return 2.22507385850720138309e-308; }

// The common end of an element: store u, move p by step_lr * u, accumulate u^2.
template <typename T, typename A>
__device__ __forceinline__ void finish_element(int64_t j, A u, A pj, A step_lr, bool write_u, bool apply, A* u_out,
                                               T* p, A& acc) {
  if (write_u) u_out[j] = u;
  if (apply) p[j] = from_acc<T>(pj - step_lr * u);
  acc += u * u;
}

// The common end of a chunk: the block's sum of u^2 as the chunk's partial. segmented_sums (reduce.cu) then
// adds each tensor's partials in a fixed order: the same bits on every run, where float atomics added
// them in whatever order the blocks finished. Cost of that second pass: 8 bytes written and read per
// kUpdateChunk (16384) elements, against at least 12 bytes per element the step itself moves (fp16
// SGD without momentum: p, g read, p written; Adam fp32: 28): under 0.01% of the bytes, plus one launch.
template <typename A>
__device__ __forceinline__ void finish_chunk(A acc, double* partials) {
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = static_cast<double>(acc);
}

// Whether this step is skipped (SPEC 7.1): the same value for every thread of every block.
__device__ __forceinline__ bool skipped(const double* skip) { return skip != nullptr && *skip != 0.0; }

template <typename T>
__global__ void adam_kernel(UpdateTables t, AdamHyper h, const double* lr_p, const double* step_p,
                            const double* scale_p, const double* skip_p, double* partials, AdamFlags f,
                            const double* clip_sums) {
  using A = typename Acc<T>::type;
  if (skipped(skip_p)) {
    if (threadIdx.x == 0) {
      partials[blockIdx.x] = 0;
      if (f.clip) partials[gridDim.x + blockIdx.x] = 0;
    }
    return;
  }
  const auto [i, begin, end] = chunk_range(t);
  // The bias corrections, from the device step counter, in double as the CPU kernel computes them.
  double lr_d = f.lr_per_tensor ? lr_p[t.index[i]] : *lr_p;
  const double step_d = *step_p;
  if (clip_sums != nullptr) {  // update.clip_lrs' arithmetic, per block (one load and a square root)
    const double s = f.clip_round_float ? static_cast<double>(static_cast<float>(clip_sums[t.index[i]]))
                                        : clip_sums[t.index[i]];
    const double rms = sqrt(s / static_cast<double>(t.numel[i]));  // IEEE in double
    lr_d = lr_d / (rms > 1.0 || rms != rms ? rms : 1.0);           // max(1, rms), NaN kept (torch's clamp_min)
  }
  const double bc1_d = 1.0 - pow(h.beta1, step_d), bc2_d = 1.0 - pow(h.beta2, step_d), bc2s_d = sqrt(bc2_d);
  const A b1 = static_cast<A>(h.beta1), b2 = static_cast<A>(h.beta2), wd = static_cast<A>(h.weight_decay);
  const A eps = static_cast<A>(f.eps_raw ? h.eps / bc2s_d : h.eps);
  const A bc1 = static_cast<A>(bc1_d), bc2s = static_cast<A>(bc2s_d);
  // update clipping: 1 / bc2 formed in double, rounded once; eps^2 of the eps given
  // (at least the smallest normal number: a tiny eps, 1e-25, squares to 0 in float32, and 0 / 0 would be NaN)
  const A inv_bc2 = static_cast<A>(1.0 / bc2_d), eps2_raw = static_cast<A>(h.eps * h.eps);
  const A eps2 = eps2_raw > smallest_normal<A>() ? eps2_raw : smallest_normal<A>();
  const A step_lr = static_cast<A>(lr_d * *scale_p), decay = static_cast<A>(1.0 - lr_d * h.weight_decay);
  const bool apply = f.apply && !f.only;
  // p is read only when the step needs it: applied, or Adam's L2 decay on g
  const bool read_p = apply || (!f.decoupled && h.weight_decay != 0);
  T* p = reinterpret_cast<T*>(t.p[i]);
  const T* g = reinterpret_cast<const T*>(t.g[i]);
  T* m = reinterpret_cast<T*>(t.m[i]);
  T* v = reinterpret_cast<T*>(t.v[i]);
  T* vm = reinterpret_cast<T*>(t.vm[i]);
  A* u_out = reinterpret_cast<A*>(t.u[i]);
  A acc = 0, acc_clip = 0;
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    A pj = 0, gj = to_acc(g[j]), vj = to_acc(v[j]);
    if (f.maximize) gj = -gj;
    if (read_p) {
      pj = to_acc(p[j]);
      if (apply && f.decoupled) pj = pj * decay;
      if (!f.decoupled) gj = gj + pj * wd;
    }
    vj = vj * b2 + gj * (A(1) - b2) * gj;
    A vh = vj;
    if (f.amsgrad) {
      vh = max(to_acc(vm[j]), vj);
      if (!f.only) vm[j] = from_acc<T>(vh);
    }
    if (f.clip) {
      const A vc = vh * inv_bc2;
      acc_clip += gj * gj / (vc > eps2 || vc != vc ? vc : eps2);  // max(v_hat, eps^2), NaN kept
    }
    if (f.only) continue;
    A mj = to_acc(m[j]);
    mj = mj + (gj - mj) * (A(1) - b1);
    const A u = (mj / bc1) / (sqrt(vh) / bc2s + eps);
    m[j] = from_acc<T>(mj);
    v[j] = from_acc<T>(vj);
    finish_element(j, u, pj, step_lr, f.write_u, apply, u_out, p, acc);
  }
  finish_chunk(acc, partials);
  if (f.clip) finish_chunk(acc_clip, partials + gridDim.x);
}

template <typename T>
__global__ void sgd_kernel(UpdateTables t, SgdHyper h, const double* lr_p, const double* scale_p,
                           const double* skip_p, double* partials, SgdFlags f) {
  using A = typename Acc<T>::type;
  if (skipped(skip_p)) {
    if (threadIdx.x == 0) partials[blockIdx.x] = 0;
    return;
  }
  const auto [i, begin, end] = chunk_range(t);
  const A mu = static_cast<A>(h.momentum), wd = static_cast<A>(h.weight_decay);
  const A one_minus_damp = static_cast<A>(1.0 - h.dampening);
  const A step_lr = static_cast<A>(*lr_p * *scale_p);
  T* p = reinterpret_cast<T*>(t.p[i]);
  const T* g = reinterpret_cast<const T*>(t.g[i]);
  T* b = reinterpret_cast<T*>(t.m[i]);
  A* u_out = reinterpret_cast<A*>(t.u[i]);
  A acc = 0;
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) {
    const A pj = to_acc(p[j]);
    A gj = to_acc(g[j]);
    if (f.maximize) gj = -gj;
    gj = gj + pj * wd;
    A u = gj;
    if (f.momentum) {
      const A bj = f.first ? gj : to_acc(b[j]) * mu + gj * one_minus_damp;
      b[j] = from_acc<T>(bj);
      u = f.nesterov ? gj + bj * mu : bj;
    }
    finish_element(j, u, pj, step_lr, f.write_u, f.apply, u_out, p, acc);
  }
  finish_chunk(acc, partials);
}

template <typename T>
__global__ void apply_kernel(UpdateTables t, const double* lr_p, bool lr_per_tensor, const double* scale_p,
                             const double* skip_p, double weight_decay) {
  using A = typename Acc<T>::type;
  if (skipped(skip_p)) return;
  const auto [i, begin, end] = chunk_range(t);
  const double lr_d = lr_per_tensor ? lr_p[t.index[i]] : *lr_p;
  const A step_lr = static_cast<A>(scale_p != nullptr ? lr_d * *scale_p : lr_d);
  const A decay = static_cast<A>(1.0 - lr_d * weight_decay);
  T* p = reinterpret_cast<T*>(t.p[i]);
  const A* u = reinterpret_cast<const A*>(t.u[i]);
  for (int64_t j = begin + threadIdx.x; j < end; j += kThreads)
    p[j] = from_acc<T>(to_acc(p[j]) * decay - step_lr * u[j]);
}

}  // namespace

#define STABKERNELS_LAUNCH_TYPED(dtype, ...)                                  \
  dispatch_dtype(dtype, [&](auto tag) {                                       \
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;      \
    using A = typename Acc<T>::type;                                          \
    (void)sizeof(A);                                                          \
    __VA_ARGS__;                                                              \
    return cudaGetLastError();                                                \
  })

cudaError_t adam_step(DType dtype, const UpdateTables& t, int64_t num_chunks, AdamHyper hyper, const double* lr,
                      const double* step, const double* scale, const double* skip, double* partials, double* sums,
                      int64_t sums_stride, AdamFlags flags, cudaStream_t stream, const double* clip_sums) {
  if (num_chunks > 0) {
    const unsigned blocks = static_cast<unsigned>(num_chunks);
    const cudaError_t err = STABKERNELS_LAUNCH_TYPED(
        dtype, adam_kernel<T><<<blocks, kThreads, 0, stream>>>(t, hyper, lr, step, scale, skip, partials, flags,
                                                               clip_sums));
    if (err != cudaSuccess) return err;
  }
  return segmented_sums(partials, num_chunks, flags.clip ? 2 : 1, t.chunk_first, t.index, t.num_tensors, sums,
                        sums_stride, stream);
}

cudaError_t sgd_step(DType dtype, const UpdateTables& t, int64_t num_chunks, SgdHyper hyper, const double* lr,
                     const double* scale, const double* skip, double* partials, double* sums, SgdFlags flags,
                     cudaStream_t stream) {
  if (num_chunks > 0) {
    const unsigned blocks = static_cast<unsigned>(num_chunks);
    const cudaError_t err = STABKERNELS_LAUNCH_TYPED(
        dtype, sgd_kernel<T><<<blocks, kThreads, 0, stream>>>(t, hyper, lr, scale, skip, partials, flags));
    if (err != cudaSuccess) return err;
  }
  return segmented_sums(partials, num_chunks, 1, t.chunk_first, t.index, t.num_tensors, sums, 0, stream);
}

cudaError_t apply_update(DType dtype, const UpdateTables& t, int64_t num_chunks, const double* lr,
                         bool lr_per_tensor, const double* scale, const double* skip, double weight_decay,
                         cudaStream_t stream) {
  if (num_chunks == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(num_chunks);
  return STABKERNELS_LAUNCH_TYPED(
      dtype, apply_kernel<T><<<blocks, kThreads, 0, stream>>>(t, lr, lr_per_tensor, scale, skip, weight_decay));
}

}  // namespace stabkernels::cuda
