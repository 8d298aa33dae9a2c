// Directional family on CUDA: the Philox stream and float32 Box-Muller of csrc/philox.h, one thread per
// Philox counter (four elements). Every rounding of the stream and of the written directions is an explicit
// round-to-nearest operation (rn_* of philox.h, __dmul_rn/__dadd_rn here), so nvcc cannot contract them into
// FMAs: the CPU backends' bits exactly (checked on the PTX: no fma.rn.f32 in these kernels).
#include "../philox.h"
#include "common.cuh"

namespace stabkernels::cuda {
namespace {

constexpr int kThreads = static_cast<int>(kStreamCounters);

__device__ __forceinline__ void normals4(uint64_t key, uint64_t ctr, float n[4]) { stream_normals4(key, ctr, n); }

// The math-type operations of the write kernel, rounded separately as the CPU kernels round them.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// This block's tensor (group-local) and its thread's Philox counter.
struct StreamBlock {
  int64_t tensor, ctr;
};
__device__ __forceinline__ StreamBlock stream_block(const StreamTables& t) {
  const int64_t b = blockIdx.x;
  const int64_t i = owner(t.blk_first, t.num_tensors, b);
  return {i, (b - t.blk_first[i]) * kStreamCounters + threadIdx.x};
}

__global__ void sq_sums_kernel(StreamTables t, double* sums) {
  const auto [i, ctr] = stream_block(t);
  const int64_t numel = t.numel[i];
  double s = 0;
  if (4 * ctr < numel) {
    float n[4];
    normals4(static_cast<uint64_t>(t.keys[t.index[i]]), static_cast<uint64_t>(ctr), n);
    for (int j = 0; j < 4; ++j)
      if (4 * ctr + j < numel) s += static_cast<double>(n[j]) * n[j];
  }
  s = block_sum(s);
  if (threadIdx.x == 0) atomicAdd(sums + t.index[i], s);
}

template <typename T>
__global__ void write_kernel(StreamTables t, const double* scales, const int64_t* src, const int64_t* out,
                             double sigma) {
  using A = typename Acc<T>::type;
  const auto [i, ctr] = stream_block(t);
  const int64_t numel = t.numel[i];
  if (4 * ctr >= numel) return;
  float n[4];
  normals4(static_cast<uint64_t>(t.keys[t.index[i]]), static_cast<uint64_t>(ctr), n);
  const A s = static_cast<A>(scales[t.index[i]]), sg = static_cast<A>(sigma);
  T* o = reinterpret_cast<T*>(out[i]);
  const T* th = src ? reinterpret_cast<const T*>(src[i]) : nullptr;
  for (int j = 0; j < 4; ++j) {
    const int64_t e = 4 * ctr + j;
    if (e >= numel) break;
    A d = mul_rn(static_cast<A>(n[j]), s);
    if (th) d = add_rn(static_cast<A>(to_acc(th[e])), mul_rn(sg, d));
    o[e] = from_acc<T>(d);
  }
}

template <typename T>
__global__ void dots_kernel(StreamTables t, int64_t K, int64_t T_, const int64_t* grads, double* gn, double* nn) {
  const auto [i, ctr] = stream_block(t);
  const int64_t numel = t.numel[i];
  const int64_t col = t.index[i];
  const T* g = reinterpret_cast<const T*>(grads[i]);
  double gv[4] = {0, 0, 0, 0};
  const bool live = 4 * ctr < numel;
  if (live)
    for (int j = 0; j < 4; ++j)
      if (4 * ctr + j < numel) gv[j] = to_acc(g[4 * ctr + j]);
  for (int64_t k = 0; k < K; ++k) {  // g is read once; the K directions are generated against it
    double sgn = 0, snn = 0;
    if (live) {
      float n[4];
      normals4(static_cast<uint64_t>(t.keys[k * T_ + col]), static_cast<uint64_t>(ctr), n);
      for (int j = 0; j < 4; ++j)
        if (4 * ctr + j < numel) sgn += gv[j] * n[j], snn += static_cast<double>(n[j]) * n[j];
    }
    sgn = block_sum(sgn);
    snn = block_sum(snn);
    if (threadIdx.x == 0) {
      atomicAdd(gn + k * T_ + col, sgn);
      atomicAdd(nn + k * T_ + col, snn);
    }
  }
}

template <typename T>
__global__ void ortho_sums_kernel(UpdateTables t, double* sums) {
  const auto [i, begin, end] = chunk_range(t);
  const T* w = reinterpret_cast<const T*>(t.p[i]);
  const T* g = reinterpret_cast<const T*>(t.g[i]);
  double wg = 0, ww = 0, gg = 0;
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const double a = to_acc(w[j]), b = to_acc(g[j]);
    wg += a * b, ww += a * a, gg += b * b;
  }
  wg = block_sum(wg);
  ww = block_sum(ww);
  gg = block_sum(gg);
  if (threadIdx.x == 0) {
    atomicAdd(sums + 3 * i, wg);
    atomicAdd(sums + 3 * i + 1, ww);
    atomicAdd(sums + 3 * i + 2, gg);
  }
}

// float64: g - c w cancels when g is nearly parallel to w.
template <typename T>
__global__ void ortho_write_kernel(UpdateTables t, const double* coef, const double* scale) {
  using A = double;
  const auto [i, begin, end] = chunk_range(t);
  const T* w = reinterpret_cast<const T*>(t.p[i]);
  T* g = reinterpret_cast<T*>(t.g[i]);  // the table is const, the gradient it points to is not
  const A c = static_cast<A>(coef[i]), s = static_cast<A>(scale[i]);
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) g[j] = from_acc<T>((static_cast<A>(to_acc(g[j])) - c * static_cast<A>(to_acc(w[j]))) * s);
}

}  // namespace

cudaError_t stream_sq_sums(const StreamTables& t, int64_t num_blocks, double* sums, cudaStream_t stream) {
  if (num_blocks == 0) return cudaSuccess;
  sq_sums_kernel<<<static_cast<unsigned>(num_blocks), kThreads, 0, stream>>>(t, sums);
  return cudaGetLastError();
}

cudaError_t stream_write(DType dtype, DType acc, const StreamTables& t, int64_t num_blocks, const double* scales,
                         const int64_t* src, const int64_t* out, double sigma, cudaStream_t stream) {
  (void)acc;
  if (num_blocks == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(num_blocks);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    write_kernel<T><<<blocks, kThreads, 0, stream>>>(t, scales, src, out, sigma);
    return cudaGetLastError();
  });
}

cudaError_t directional_dots(DType dtype, const StreamTables& t, int64_t num_blocks, int64_t K, int64_t T_,
                             const int64_t* grads, double* gn, double* nn, cudaStream_t stream) {
  if (num_blocks == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(num_blocks);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    dots_kernel<T><<<blocks, kThreads, 0, stream>>>(t, K, T_, grads, gn, nn);
    return cudaGetLastError();
  });
}

cudaError_t orthograd_sums(DType dtype, const UpdateTables& t, int64_t num_chunks, double* sums, cudaStream_t stream) {
  if (num_chunks == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(num_chunks);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    ortho_sums_kernel<T><<<blocks, 256, 0, stream>>>(t, sums);
    return cudaGetLastError();
  });
}

cudaError_t orthograd_write(DType dtype, const UpdateTables& t, int64_t num_chunks, const double* coef,
                            const double* scale, cudaStream_t stream) {
  if (num_chunks == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(num_chunks);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    ortho_write_kernel<T><<<blocks, 256, 0, stream>>>(t, coef, scale);
    return cudaGetLastError();
  });
}

}  // namespace stabkernels::cuda
