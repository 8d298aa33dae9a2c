// Spectral family on CUDA: grouped power iteration and grouped sums of squares, one launch per pass over
// every matrix (tensor) of a storage dtype, walking pointer/shape tables.
#include "common.cuh"

namespace stabkernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = static_cast<int>(kPowerIterationRows);

// One block = t.block_rows rows of one matrix, in tiles of kRows rows. Per tile, warps compute
// the rows' dot products with v (lanes stride along the row, coalesced); then every thread sweeps its
// columns, adding W[r, j] x[r] over the tile's rows (the rows come back from L2, not DRAM) to the block's
// partial y row, which only that thread touches (same columns in every tile). A second kernel
// (reduce_y_kernel) sums the row blocks' partial y's per column in a fixed order: deterministic, where
// float atomics on y added the blocks' partials in whatever order they finished.
// Cost: the partial rows are n acc-type entries per block_rows rows of W, written once and read once: with
// 256 rows (large models: glue_spectral.cpp picks fewer rows per block, for parallelism, only while the scratch
// stays small) 8 bytes per 256 elements (fp32 acc) against the 2-4 bytes per element the pass reads from
// DRAM (plus its L2 re-read): 0.8% (fp32 W) to 1.6% (bf16 W) more bytes; scratch 1/256 of the weights'
// elements (about 100 MB for a 7B model at fp32 acc, transient).
template <typename T>
__global__ void pass_kernel(PowerIterationTables t, typename Acc<T>::type* x_buf, typename Acc<T>::type* y_part) {
  using A = typename Acc<T>::type;
  __shared__ A xs[kRows];
  const int64_t i = owner(t.blk_first, t.num_mats, blockIdx.x);
  if (t.active[i] == 0) return;  // uniform across the block
  const int64_t b = blockIdx.x - t.blk_first[i];
  const int64_t m = t.rows[i], n = t.cols[i], s0 = t.s0[i], s1 = t.s1[i];
  const int64_t r_begin = b * t.block_rows;
  const int64_t r_end = r_begin + t.block_rows < m ? r_begin + t.block_rows : m;
  const T* w = reinterpret_cast<const T*>(t.w[i]);
  const A* v = reinterpret_cast<const A*>(t.v[i]);
  A* yp = y_part + t.yp_off[i] + b * n;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kRows) {
    for (int r = warp; r < kRows; r += kThreads / 32) {
      const int64_t row = r0 + r;
      A d = 0;
      if (row < r_end)
        for (int64_t j = lane; j < n; j += 32) d += to_acc(w[row * s0 + j * s1]) * v[j];
      for (int off = 16; off > 0; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
      if (lane == 0) {
        xs[r] = row < r_end ? d : A(0);
        if (row < r_end) x_buf[t.x_off[i] + row] = d;
      }
    }
    __syncthreads();
    const int rows_here = static_cast<int>(r_end - r0 < kRows ? r_end - r0 : kRows);
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      A acc = r0 == r_begin ? A(0) : yp[j];
      for (int r = 0; r < rows_here; ++r) acc += to_acc(w[(r0 + r) * s0 + j * s1]) * xs[r];
      yp[j] = acc;
    }
    __syncthreads();  // xs is rewritten by the next tile
  }
}

// y[j] = the sum of matrix i's row blocks' partial y's at column j, in row-block order (one block per
// matrix, threads striding over columns: coalesced reads of each partial row).
template <typename A>
__global__ void reduce_y_kernel(PowerIterationTables t, const A* y_part, A* y_buf) {
  const int64_t i = blockIdx.x;
  if (t.active[i] == 0) return;
  const int64_t n = t.cols[i], blocks = t.blk_first[i + 1] - t.blk_first[i];
  const A* yp = y_part + t.yp_off[i];
  A* y = y_buf + t.y_off[i];
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    A s = 0;
    for (int64_t b = 0; b < blocks; ++b) s += yp[b * n + j];
    y[j] = s;
  }
}

template <typename A>
__global__ void finish_kernel(PowerIterationTables t, const A* x_buf, const A* y_buf, double* sigma, double eps) {
  const int64_t i = blockIdx.x;
  if (t.active[i] == 0) return;
  const int64_t m = t.rows[i], n = t.cols[i];
  const A* x = x_buf + t.x_off[i];
  const A* y = y_buf + t.y_off[i];
  A sx = 0, sy = 0;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) sx += x[j] * x[j];
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) sy += y[j] * y[j];
  const A nx = sqrt(block_sum(sx)), ny = sqrt(block_sum(sy));
  const bool finite = isfinite(nx) && isfinite(ny);
  if (!finite || nx <= eps || ny <= 0) {
    if (threadIdx.x == 0) {
      sigma[t.index[i]] = finite ? 0.0 : static_cast<double>(NAN);  // vectors stay as they were
      t.active[i] = 0;
    }
    return;
  }
  A* u = reinterpret_cast<A*>(t.u[i]);
  A* v = reinterpret_cast<A*>(t.v[i]);
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) u[j] = x[j] / nx;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) v[j] = y[j] / ny;
  if (threadIdx.x == 0) sigma[t.index[i]] = static_cast<double>(ny / nx);  // the acc-type quotient
}

// One partial per chunk (summed per tensor in a fixed order by segmented_sums: deterministic; the second
// pass moves 8 bytes per 65536-element chunk, against at least 2 bytes per element read here: 0.006%).
template <typename T>
__global__ void sq_norms_kernel(const int64_t* ptrs, const int64_t* numels, const int64_t* chunk_first,
                                int64_t num_tensors, int64_t chunk, double* partials) {
  using A = typename Acc<T>::type;
  const int64_t i = owner(chunk_first, num_tensors, blockIdx.x);
  const int64_t begin = (blockIdx.x - chunk_first[i]) * chunk;
  const int64_t end = begin + chunk < numels[i] ? begin + chunk : numels[i];
  const T* p = reinterpret_cast<const T*>(ptrs[i]);
  A s = 0;
  for (int64_t j = begin + threadIdx.x; j < end; j += blockDim.x) {
    const A a = to_acc(p[j]);
    s += a * a;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = static_cast<double>(s);
}

}  // namespace

cudaError_t power_iteration_pass(DType dtype, const PowerIterationTables& t, int64_t num_blocks, void* x_buf,
                                 void* y_part, void* y_buf, cudaStream_t stream) {
  if (t.num_mats == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
    using A = typename Acc<T>::type;
    if (num_blocks > 0) {
      pass_kernel<T><<<static_cast<unsigned>(num_blocks), kThreads, 0, stream>>>(t, static_cast<A*>(x_buf),
                                                                                  static_cast<A*>(y_part));
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    reduce_y_kernel<A><<<static_cast<unsigned>(t.num_mats), kThreads, 0, stream>>>(
        t, static_cast<const A*>(y_part), static_cast<A*>(y_buf));
    return cudaGetLastError();
  });
}

cudaError_t power_iteration_finish(DType acc, const PowerIterationTables& t, const void* x_buf, const void* y_buf,
                                   double* sigma, double eps, cudaStream_t stream) {
  if (t.num_mats == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(t.num_mats);
  if (acc == kFloat64) {
    finish_kernel<double><<<blocks, kThreads, 0, stream>>>(t, static_cast<const double*>(x_buf),
                                                           static_cast<const double*>(y_buf), sigma, eps);
  } else {
    finish_kernel<float><<<blocks, kThreads, 0, stream>>>(t, static_cast<const float*>(x_buf),
                                                          static_cast<const float*>(y_buf), sigma, eps);
  }
  return cudaGetLastError();
}

cudaError_t sq_norms(DType dtype, const int64_t* ptrs, const int64_t* numels, const int64_t* chunk_first,
                     const int64_t* index, int64_t num_tensors, int64_t num_chunks, int64_t chunk, double* partials,
                     double* out, cudaStream_t stream) {
  if (num_chunks > 0) {
    const cudaError_t err = dispatch_dtype(dtype, [&](auto tag) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
      sq_norms_kernel<T><<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(
          ptrs, numels, chunk_first, num_tensors, chunk, partials);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
  }
  return segmented_sums(partials, num_chunks, 1, chunk_first, index, num_tensors, out, 0, stream);
}

}  // namespace stabkernels::cuda
