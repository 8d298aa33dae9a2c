// Epilogue of tangent_spread_linear on CUDA: the glue computes the tangent logits one vocabulary chunk at a
// time with cuBLAS and this kernel folds each chunk into running per-row extremes, so only an
// (N, chunk) tile ever exists.
#include "common.cuh"

namespace stabkernels::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;

template <typename A>
__global__ void fold_kernel(const A* __restrict__ tile, int64_t rows, int64_t cols, int64_t ld,
                            const A* __restrict__ bias, A* hi, A* lo) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= rows) return;
  A h = hi[r], l = lo[r];
  for (int64_t j = lane; j < cols; j += 32) {
    const A x = tile[r * ld + j] + (bias ? bias[j] : A(0));
    h = nan_max(h, x);
    l = nan_min(l, x);
  }
  for (int off = 16; off > 0; off >>= 1) {
    h = nan_max(h, __shfl_xor_sync(0xffffffffu, h, off));
    l = nan_min(l, __shfl_xor_sync(0xffffffffu, l, off));
  }
  if (lane == 0) hi[r] = h, lo[r] = l;
}

}  // namespace

cudaError_t row_minmax_fold(DType acc, const void* tile, int64_t rows, int64_t cols, int64_t ld, const void* bias,
                            void* hi, void* lo, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  if (acc == kFloat64) {
    fold_kernel<double><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
        static_cast<const double*>(tile), rows, cols, ld, static_cast<const double*>(bias), static_cast<double*>(hi),
        static_cast<double*>(lo));
  } else {
    fold_kernel<float><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
        static_cast<const float*>(tile), rows, cols, ld, static_cast<const float*>(bias), static_cast<float*>(hi),
        static_cast<float*>(lo));
  }
  return cudaGetLastError();
}

}  // namespace stabkernels::cuda
