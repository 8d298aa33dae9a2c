// row_spread on CUDA: one warp per row, lanes stride along the row (coalesced for contiguous rows),
// running NaN-propagating max/min in registers, a shuffle reduction at the end. One read of x.
#include "common.cuh"

namespace stabkernels::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename T>
__global__ void row_spread_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, int64_t s0,
                                  int64_t s1, typename Acc<T>::type* __restrict__ out) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* p = x + row * s0;
  A hi = -INFINITY, lo = INFINITY;
  for (int64_t j = lane; j < cols; j += 32) {
    A v = to_acc(p[j * s1]);
    hi = nan_max(hi, v);
    lo = nan_min(lo, v);
  }
  for (int off = 16; off > 0; off >>= 1) {
    hi = nan_max(hi, __shfl_xor_sync(0xffffffffu, hi, off));
    lo = nan_min(lo, __shfl_xor_sync(0xffffffffu, lo, off));
  }
  if (lane == 0) out[row] = hi - lo;
}

}  // namespace

cudaError_t row_spread(const void* x, DType dtype, int64_t rows, int64_t cols, int64_t s0, int64_t s1,
                       void* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    using A = typename Acc<T>::type;
    row_spread_kernel<T><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
        static_cast<const T*>(x), rows, cols, s0, s1, static_cast<A*>(out));
    return cudaGetLastError();
  });
}

}  // namespace stabkernels::cuda
