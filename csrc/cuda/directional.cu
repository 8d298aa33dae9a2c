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

// This block's tensor (group-local) and its thread's (first) Philox counter, for blocks of `per_block`
// counters.
struct StreamBlock {
  int64_t tensor, ctr;
};
__device__ __forceinline__ StreamBlock stream_block(const StreamTables& t, int64_t per_block) {
  const int64_t b = blockIdx.x;
  const int64_t i = owner(t.blk_first, t.num_tensors, b);
  return {i, (b - t.blk_first[i]) * per_block + threadIdx.x};
}

// The reductions over the stream are deterministic: each block (kStreamSumCounters counters, 16 per thread
// in a fixed order) writes its partial, and segmented_sums adds each tensor's partials in a fixed order.
// Cost of the second pass: 8 bytes written and read per 16384 elements (per direction), beside kernels
// that generate 16384 normals (sq_sums) or read 16384 gradient elements (dots, >= 32 KB): < 0.1%.
constexpr int kSumRounds = static_cast<int>(kStreamSumCounters / kStreamCounters);

__global__ void sq_sums_kernel(StreamTables t, double* partials) {
  const auto [i, ctr0] = stream_block(t, kStreamSumCounters);
  const int64_t numel = t.numel[i];
  const uint64_t key = static_cast<uint64_t>(t.keys[t.index[i]]);
  double s = 0;
  for (int r = 0; r < kSumRounds; ++r) {
    const int64_t ctr = ctr0 + r * kStreamCounters;
    if (4 * ctr >= numel) break;
    float n[4];
    normals4(key, static_cast<uint64_t>(ctr), n);
    for (int j = 0; j < 4; ++j)
      if (4 * ctr + j < numel) s = add_rn(s, mul_rn(static_cast<double>(n[j]), static_cast<double>(n[j])));
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

template <typename T>
__global__ void write_kernel(StreamTables t, const double* scales, const int64_t* src, const int64_t* out,
                             double sigma) {
  using A = typename Acc<T>::type;
  const auto [i, ctr] = stream_block(t, kStreamCounters);
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

// Directions k0 .. k0 + kDotsTile - 1 against g: per thread, kSumRounds counters in order, each direction's
// two sums in registers (g is read once per tile of directions, so once for K <= kDotsTile). Partials:
// pg[k * num_blocks + b] and pn[...] (float64).
template <typename T>
__global__ void dots_kernel(StreamTables t, int64_t k0, int64_t K, int64_t T_, const int64_t* grads, double* pg,
                            double* pn) {
  const auto [i, ctr0] = stream_block(t, kStreamSumCounters);
  const int64_t numel = t.numel[i];
  const int64_t col = t.index[i];
  const T* g = reinterpret_cast<const T*>(grads[i]);
  const int kn = static_cast<int>(K - k0 < kDotsTile ? K - k0 : kDotsTile);
  uint64_t keys[kDotsTile];
  double sgn[kDotsTile], snn[kDotsTile];
#pragma unroll
  for (int kk = 0; kk < kDotsTile; ++kk) {
    keys[kk] = kk < kn ? static_cast<uint64_t>(t.keys[(k0 + kk) * T_ + col]) : 0;
    sgn[kk] = 0, snn[kk] = 0;
  }
  for (int r = 0; r < kSumRounds; ++r) {
    const int64_t ctr = ctr0 + r * kStreamCounters;
    if (4 * ctr >= numel) break;
    double gv[4] = {0, 0, 0, 0};
    for (int j = 0; j < 4; ++j)
      if (4 * ctr + j < numel) gv[j] = to_acc(g[4 * ctr + j]);
#pragma unroll
    for (int kk = 0; kk < kDotsTile; ++kk) {
      if (kk >= kn) break;
      float n[4];
      normals4(keys[kk], static_cast<uint64_t>(ctr), n);
      for (int j = 0; j < 4; ++j)
        if (4 * ctr + j < numel)  // no contraction: the sums' rounding as the other backends' (mul, then add)
          sgn[kk] = add_rn(sgn[kk], mul_rn(gv[j], static_cast<double>(n[j]))),
          snn[kk] = add_rn(snn[kk], mul_rn(static_cast<double>(n[j]), static_cast<double>(n[j])));
    }
  }
  const int64_t nb = gridDim.x;
#pragma unroll
  for (int kk = 0; kk < kDotsTile; ++kk) {
    if (kk >= kn) break;  // uniform across the block: block_sum's barriers are safe
    const double a = block_sum(sgn[kk]), b = block_sum(snn[kk]);
    if (threadIdx.x == 0) {
      pg[(k0 + kk) * nb + blockIdx.x] = a;
      pn[(k0 + kk) * nb + blockIdx.x] = b;
    }
  }
}

// (w.g, w.w, g.g) of one chunk as its partials: partials[c * num_chunks + chunk] (summed per tensor in a
// fixed order by segmented_sums).
template <typename T>
__global__ void ortho_sums_kernel(UpdateTables t, double* partials) {
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
  (void)i;
  if (threadIdx.x == 0) {
    const int64_t nb = gridDim.x;
    partials[blockIdx.x] = wg;
    partials[nb + blockIdx.x] = ww;
    partials[2 * nb + blockIdx.x] = gg;
  }
}

// float64: g - c w cancels when g is nearly parallel to w.
template <typename T>
__global__ void ortho_write_kernel(UpdateTables t, const double* coef, const double* scale) {
  using A = double;
  const auto [i, begin, end] = chunk_range(t);
  const T* w = reinterpret_cast<const T*>(t.p[i]);
  T* g = reinterpret_cast<T*>(t.g[i]);  // the table is const, the gradient it points to is not
  const A c = static_cast<A>(coef[t.index[i]]), s = static_cast<A>(scale[t.index[i]]);
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) g[j] = from_acc<T>((static_cast<A>(to_acc(g[j])) - c * static_cast<A>(to_acc(w[j]))) * s);
}

}  // namespace

cudaError_t stream_sq_sums(const StreamTables& t, int64_t num_blocks, double* partials, double* sums,
                           cudaStream_t stream) {
  if (num_blocks > 0) {
    sq_sums_kernel<<<static_cast<unsigned>(num_blocks), kThreads, 0, stream>>>(t, partials);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return segmented_sums(partials, num_blocks, 1, t.blk_first, t.index, t.num_tensors, sums, 0, stream);
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
                             const int64_t* grads, double* partials, double* gn, double* nn, cudaStream_t stream) {
  double* pg = partials;
  double* pn = partials + K * num_blocks;
  if (num_blocks > 0) {
    const unsigned blocks = static_cast<unsigned>(num_blocks);
    for (int64_t k0 = 0; k0 < K; k0 += kDotsTile) {
      const cudaError_t err = dispatch_dtype(dtype, [&](auto tag) {
        using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
        dots_kernel<T><<<blocks, kThreads, 0, stream>>>(t, k0, K, T_, grads, pg, pn);
        return cudaGetLastError();
      });
      if (err != cudaSuccess) return err;
    }
  }
  const cudaError_t err = segmented_sums(pg, num_blocks, K, t.blk_first, t.index, t.num_tensors, gn, T_, stream);
  if (err != cudaSuccess) return err;
  return segmented_sums(pn, num_blocks, K, t.blk_first, t.index, t.num_tensors, nn, T_, stream);
}

cudaError_t orthograd_sums(DType dtype, const UpdateTables& t, int64_t num_chunks, int64_t T_, double* partials,
                           double* sums, cudaStream_t stream) {
  if (num_chunks > 0) {
    const unsigned blocks = static_cast<unsigned>(num_chunks);
    const cudaError_t err = dispatch_dtype(dtype, [&](auto tag) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
      ortho_sums_kernel<T><<<blocks, 256, 0, stream>>>(t, partials);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
  }
  return segmented_sums(partials, num_chunks, 3, t.chunk_first, t.index, t.num_tensors, sums, T_, stream);
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
