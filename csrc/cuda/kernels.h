// Raw CUDA launchers: plain pointers, sizes, strides and a stream, no torch headers, so each .cu file
// compiles in about a second (torch headers cost minutes in nvcc). glue.cpp wraps them as torch ops.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace stabkernels::cuda {

// Storage dtypes the kernels accept; the math is fp32 (fp64 for kFloat64).
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// out[i] = max_j x[i, j] - min_j x[i, j]; out is float (double for kFloat64); NaN propagates.
cudaError_t row_spread(const void* x, DType dtype, int64_t rows, int64_t cols, int64_t stride_row,
                       int64_t stride_col, void* out, cudaStream_t stream);

}  // namespace stabkernels::cuda
