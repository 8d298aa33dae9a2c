// The fixed-order second pass of the grouped reductions (deterministic sums; see segmented_sums in
// kernels.h). The first passes write one float64 partial per block instead of adding it to the tensor's
// total with a float atomic, whose order (and so whose rounding) changes from run to run.
#include "common.cuh"

namespace stabkernels::cuda {
namespace {

constexpr int kThreads = 256;

// Block (i, k): the partials of tensor i's blocks in row k, summed by a fixed assignment of partials to
// threads (strided, in order) and block_sum's fixed tree: the same bits on every run for a given launch.
__global__ void segmented_sums_kernel(const double* partials, int64_t num_blocks, const int64_t* first,
                                      const int64_t* index, double* out, int64_t out_stride) {
  const int64_t i = blockIdx.x, k = blockIdx.y;
  const double* row = partials + k * num_blocks;
  double s = 0;
  for (int64_t b = first[i] + threadIdx.x; b < first[i + 1]; b += kThreads) s += row[b];
  s = block_sum(s);
  if (threadIdx.x == 0) out[k * out_stride + index[i]] = s;
}

}  // namespace

cudaError_t segmented_sums(const double* partials, int64_t num_blocks, int64_t K, const int64_t* first,
                           const int64_t* index, int64_t num_tensors, double* out, int64_t out_stride,
                           cudaStream_t stream) {
  if (num_tensors == 0 || K == 0) return cudaSuccess;
  segmented_sums_kernel<<<dim3(static_cast<unsigned>(num_tensors), static_cast<unsigned>(K)), kThreads, 0, stream>>>(
      partials, num_blocks, first, index, out, out_stride);
  return cudaGetLastError();
}

}  // namespace stabkernels::cuda
