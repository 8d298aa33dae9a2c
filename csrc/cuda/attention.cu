// qk_max_logits on CUDA (SPEC 8.1): one block per (batch * head, query tile). The block stages a 32-row query
// tile and 32-row key tiles in shared memory, 64 head dimensions at a time (at most 32 KB in fp64 whatever
// D is), each of its 256 threads owns 4 scores of the 32 x 32 tile and keeps one running NaN-propagating
// maximum over every key tile (up to the diagonal when causal); a block maximum then writes one partial per
// block. No atomics: the glue takes the maximum over a head's partials. The (T x Tk) scores never exist.
#include "common.cuh"

namespace stabkernels::cuda {
namespace {

constexpr int kTile = 32;        // query rows and key rows per tile
constexpr int kDimChunk = 64;    // head dimensions staged per pass
constexpr int kThreads = 256;    // 32 x 32 scores / 4 per thread
constexpr int kColsPerThread = kTile * kTile / kThreads;

template <typename T>
__global__ void qk_max_logits_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                     typename Acc<T>::type* __restrict__ part, int64_t H, int64_t T_, int64_t Tk,
                                     int64_t D, int64_t group, int64_t sqb, int64_t sqh, int64_t sqt, int64_t sqd,
                                     int64_t skb, int64_t skh, int64_t skt, int64_t skd, double scale, bool causal) {
  using A = typename Acc<T>::type;
  __shared__ A qs[kTile][kDimChunk + 1];  // +1: the threads of a warp read 8 different key rows at one d
  __shared__ A ks[kTile][kDimChunk + 1];
  const int64_t bh = blockIdx.x, mb = blockIdx.y, b = bh / H, h = bh % H, hk = h / group;
  const T* qh = q + b * sqb + h * sqh;
  const T* kh = k + b * skb + hk * skh;
  const int64_t r0 = mb * kTile;
  const int r = threadIdx.x / (kThreads / kTile);        // this thread's query row in the tile
  const int c_first = threadIdx.x % (kThreads / kTile);  // its columns: c_first + 8 u
  const int64_t key_end = causal ? (r0 + kTile < Tk ? r0 + kTile : Tk) : Tk;
  A best = -INFINITY;
  for (int64_t c0 = 0; c0 < key_end; c0 += kTile) {
    A dot[kColsPerThread];
#pragma unroll
    for (int u = 0; u < kColsPerThread; ++u) dot[u] = A(0);
    for (int64_t d0 = 0; d0 < D; d0 += kDimChunk) {
      __syncthreads();  // the previous chunk's reads are done
      for (int e = threadIdx.x; e < kTile * kDimChunk; e += kThreads) {
        const int row = e / kDimChunk, d = e % kDimChunk;
        const bool d_ok = d0 + d < D;
        qs[row][d] = (d_ok && r0 + row < T_) ? to_acc(qh[(r0 + row) * sqt + (d0 + d) * sqd]) : A(0);
        ks[row][d] = (d_ok && c0 + row < Tk) ? to_acc(kh[(c0 + row) * skt + (d0 + d) * skd]) : A(0);
      }
      __syncthreads();
      const int dn = static_cast<int>(D - d0 < kDimChunk ? D - d0 : kDimChunk);
      for (int d = 0; d < dn; ++d) {
        const A a = qs[r][d];
#pragma unroll
        for (int u = 0; u < kColsPerThread; ++u) dot[u] = fma(a, ks[c_first + 8 * u][d], dot[u]);
      }
    }
    const int64_t i = r0 + r;
#pragma unroll
    for (int u = 0; u < kColsPerThread; ++u) {
      const int64_t j = c0 + c_first + 8 * u;
      if (i < T_ && j < Tk && (!causal || j <= i)) best = nan_max(best, dot[u]);
    }
  }
  best = block_max(best);
  // the scale after the maximum: rounding is monotonic, so max(scale * s) == scale * max(s) for scale > 0
  if (threadIdx.x == 0) part[bh * gridDim.y + mb] = best * static_cast<A>(scale);
}

}  // namespace

cudaError_t qk_max_logits(const void* q, const void* k, DType dtype, int64_t B, int64_t H, int64_t T, int64_t Hk,
                          int64_t Tk, int64_t D, const int64_t* q_strides, const int64_t* k_strides, double scale,
                          bool causal, void* partials, cudaStream_t stream) {
  if (B * H == 0 || T == 0 || Tk == 0) return cudaSuccess;
  // (batch * head) on x (up to 2^31 - 1 blocks), query tiles on y (up to 65535: T up to 2M)
  const dim3 grid(static_cast<unsigned>(B * H), static_cast<unsigned>((T + kTile - 1) / kTile));
  return dispatch_dtype(dtype, [&](auto tag) {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    using A = typename Acc<S>::type;
    qk_max_logits_kernel<S><<<grid, kThreads, 0, stream>>>(
        static_cast<const S*>(q), static_cast<const S*>(k), static_cast<A*>(partials), H, T, Tk, D, H / Hk,
        q_strides[0], q_strides[1], q_strides[2], q_strides[3], k_strides[0], k_strides[1], k_strides[2],
        k_strides[3], scale, causal);
    return cudaGetLastError();
  });
}

}  // namespace stabkernels::cuda
