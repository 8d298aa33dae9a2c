// Device helpers shared by the raw CUDA kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "kernels.h"

namespace stabkernels::cuda {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}
// float64 math stored as a half type: one correct rounding (torch builds every .cu with
// __CUDA_NO_HALF_CONVERSIONS__, so no implicit double -> __half / __nv_bfloat16 conversion exists).
template <> __device__ __forceinline__ __half from_acc<__half, double>(double v) { return __double2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, double>(double v) {
  return __double2bfloat16(v);
}

// NaN-propagating max/min (fmaxf/fminf drop NaN; torch.amax keeps it).
template <typename A> __device__ __forceinline__ A nan_max(A a, A b) { return (a != a || a > b) ? a : b; }
template <typename A> __device__ __forceinline__ A nan_min(A a, A b) { return (a != a || a < b) ? a : b; }

// Sum over a block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_sums[32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  A total = lane < warps ? warp_sums[lane] : A(0);
  for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(0xffffffffu, total, off);
  return total;
}

// Block-wide NaN-propagating maximum; every thread gets the result.
template <typename A>
__device__ A block_max(A v) {
  __shared__ A warp_max[32];
  for (int off = 16; off > 0; off >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) warp_max[warp] = v;
  __syncthreads();
  A total = lane < warps ? warp_max[lane] : A(-INFINITY);
  for (int off = 16; off > 0; off >>= 1) total = nan_max(total, __shfl_xor_sync(0xffffffffu, total, off));
  return total;
}

// The tensor that owns block b of a grouped launch: the last i in [0, n) with first[i] <= b, where first
// (n + 1 entries, non-decreasing, first[0] = 0) holds the prefix sums of the tensors' block counts. Empty
// tensors own no block (first[i] == first[i + 1]) and are skipped. O(log n) reads of a column of n + 1
// entries that every block reads (cache-resident), instead of a per-block column of the launch's size.
__device__ __forceinline__ int64_t owner(const int64_t* first, int64_t n, int64_t b) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (first[mid] <= b) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// This block's chunk of a grouped launch over UpdateTables: tensor (group-local) and element range.
struct ChunkRange {
  int64_t tensor, begin, end;
};
__device__ __forceinline__ ChunkRange chunk_range(const UpdateTables& t) {
  const int64_t b = blockIdx.x;
  const int64_t i = owner(t.chunk_first, t.num_tensors, b);
  const int64_t begin = (b - t.chunk_first[i]) * kUpdateChunk;
  return {i, begin, begin + kUpdateChunk < t.numel[i] ? begin + kUpdateChunk : t.numel[i]};
}

// Calls f with a typed null pointer selecting the storage type for `dtype`.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(static_cast<const float*>(nullptr));
    case kFloat64: return f(static_cast<const double*>(nullptr));
    case kFloat16: return f(static_cast<const __half*>(nullptr));
    case kBFloat16: return f(static_cast<const __nv_bfloat16*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

}  // namespace stabkernels::cuda
