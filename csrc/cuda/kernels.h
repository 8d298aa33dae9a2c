// Raw CUDA launchers: plain pointers, sizes, strides and a stream, no torch headers, so each .cu file
// compiles in about a second (torch headers cost minutes in nvcc). glue_<family>.cpp wrap them as torch ops.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace stabkernels::cuda {

// Storage dtypes the kernels accept; the math is fp32 (fp64 for kFloat64).
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// out[i] = max_j x[i, j] - min_j x[i, j]; out is float (double for kFloat64); NaN propagates.
cudaError_t row_spread(const void* x, DType dtype, int64_t rows, int64_t cols, int64_t stride_row,
                       int64_t stride_col, void* out, cudaStream_t stream);

// hi[r] = max(hi[r], max_j tile[r, j] + bias[j]) and lo likewise (NaN-propagating), for a (rows, cols)
// tile with leading dimension ld; bias may be null. `acc` is kFloat32 or kFloat64 (tile, bias, hi, lo).
cudaError_t row_minmax_fold(DType acc, const void* tile, int64_t rows, int64_t cols, int64_t ld, const void* bias,
                            void* hi, void* lo, cudaStream_t stream);

// Deterministic reductions: the grouped kernels write one float64 partial per block (row k of a (K, num_blocks)
// scratch; no float atomics, whose order changes the rounding from run to run), then this fixed-order pass
// writes out[k * out_stride + index[i]] = the sum of row k's partials b in [first[i], first[i + 1]) for
// tensors i < num_tensors (first: prefix sums of the tensors' block counts, as the launch's own column).
cudaError_t segmented_sums(const double* partials, int64_t num_blocks, int64_t K, const int64_t* first,
                           const int64_t* index, int64_t num_tensors, double* out, int64_t out_stride,
                           cudaStream_t stream);

// Tables for one launch over many tensors of one storage dtype: device arrays, one entry per tensor of the
// group (plus one for the *_first columns). Pointers travel as int64 addresses so that one int64 tensor built
// on the host holds every table; the glue gets them from a cached launch plan (launch_plan.h), built once per
// list of tensors, so every column here is O(number of tensors): a block finds its tensor by a binary search
// of a prefix-sum column (owner() in common.cuh), never from a per-block column.
// `index` columns hold each tensor's position in the op's whole list (its dtype group is a subset): kernels
// write their per-tensor results there, so no scatter follows on the host side.
struct PowerIterationTables {
  const int64_t* w;      // matrix data
  const int64_t* u;      // u vectors (acc type), updated
  const int64_t* v;      // v vectors (acc type), read by the pass, updated by finish
  const int64_t* rows;   // m
  const int64_t* cols;   // n
  const int64_t* s0;     // row stride
  const int64_t* s1;     // column stride
  const int64_t* x_off;  // offset of the matrix's x (m entries) in x_buf
  const int64_t* y_off;  // offset of the matrix's y (n entries) in y_buf
  const int64_t* yp_off;     // offset of the matrix's partial y's (one row of n per row block) in y_part
  const int64_t* blk_first;  // num_mats + 1: the matrix's first row block (prefix sums of ceil(m / block_rows))
  const int64_t* index;      // position of the matrix in the op's list (sigma is written there)
  int64_t num_mats;
  int64_t block_rows;        // rows per block: a multiple of kPowerIterationRows (kPowerIterationBlockRows at most)
  int32_t* active;           // 0 once a matrix turned out zero or non-finite (per call, group-local)
};

// Rows per tile within a block of the power-iteration pass, and the most rows per block (the host picks
// block_rows per launch: the fewest rows, for parallelism, whose partial y's stay within a scratch budget;
// it builds blk_first and yp_off with that step).
constexpr int64_t kPowerIterationRows = 32;
constexpr int64_t kPowerIterationBlockRows = 256;

// One pass over every matrix: x = W v into x_buf; y = W^T x into y_buf, deterministically: each row block
// writes its partial y (n entries) into y_part (acc type, sum over matrices of row blocks * n entries), and
// a fixed-order second kernel sums them per column.
cudaError_t power_iteration_pass(DType dtype, const PowerIterationTables& t, int64_t num_blocks, void* x_buf,
                                 void* y_part, void* y_buf, cudaStream_t stream);
// Per matrix: sigma = |y| / |x|, u = x / |x|, v = y / |y| (zero: sigma 0; non-finite: NaN; both deactivate).
// `acc` is kFloat32 or kFloat64 (the buffers' and vectors' type); sigma (float64, one per tensor of the op's
// list) gets the acc-type value at index[i].
cudaError_t power_iteration_finish(DType acc, const PowerIterationTables& t, const void* x_buf, const void* y_buf,
                                   double* sigma, double eps, cudaStream_t stream);

// Sum of squares per tensor (contiguous), in chunks of `chunk` elements (chunk_first: prefix sums of the
// tensors' chunk counts, num_tensors + 1 entries); out (float64, one per tensor of the op's list) gets the
// sum at index[i] from a fixed-order pass over one partial per chunk (partials: num_chunks of scratch).
cudaError_t sq_norms(DType dtype, const int64_t* ptrs, const int64_t* numels, const int64_t* chunk_first,
                     const int64_t* index, int64_t num_tensors, int64_t num_chunks, int64_t chunk, double* partials,
                     double* out, cudaStream_t stream);

// Fused optimizer updates: tables of per-tensor addresses (0 where a list is absent) and element chunks.
struct UpdateTables {
  const int64_t* p;
  const int64_t* g;
  const int64_t* m;   // Adam: exp_avg;  SGD: momentum buffer
  const int64_t* v;   // Adam: exp_avg_sq
  const int64_t* vm;  // Adam: max_exp_avg_sq (amsgrad)
  const int64_t* u;   // unit proposals (acc type), or 0
  const int64_t* numel;
  const int64_t* chunk_first;  // num_tensors + 1: prefix sums of ceil(numel / kUpdateChunk)
  const int64_t* index;        // position of the tensor in the op's list
  int64_t num_tensors;
};
constexpr int64_t kUpdateChunk = 1 << 14;

struct AdamFlags {
  bool decoupled, amsgrad, maximize, apply, write_u, eps_raw;
  bool clip;           // update clipping's statistic too (SPEC 7.2)
  bool only;           // with clip: the statistic alone, from g and v (max v; p for coupled decay), no write
  bool lr_per_tensor;  // lr[index[i]] (one per tensor) rather than *lr
  // update clipping's learning rate (SPEC 7.2, clip_stats "clipped"): lr_i / max(1, sqrt(s_i / numel_i)), s_i =
  // clip_sums[index[i]] (an "only" pass's second row, float64), rounded to float first with clip_round_float
  // (the dtype update.clip_lrs would have been given); clip_sums null: not clipped
  bool clip_round_float;
};
struct SgdFlags {
  bool momentum, nesterov, maximize, first, apply, write_u;
};
// Hyper-parameters that change rarely travel by value (kernel arguments), never in the cached tables.
struct AdamHyper {
  double beta1, beta2, eps, weight_decay;
};
struct SgdHyper {
  double momentum, dampening, weight_decay;
};

// Per-step scalars are read from device memory (0-d float64 tensors on the params' device), so a step
// makes no host round trip and can be captured in a CUDA graph:
//   lr (Adam: one, or one per tensor with flags.lr_per_tensor), scale (the step scale) and, for Adam, step
//   (the step number after this step, >= 1): the kernel
//   computes bc1 = 1 - beta1^step and sqrt(bc2) = sqrt(1 - beta2^step) in double (eps_raw: eps / sqrt(bc2));
//   skip (SPEC 7.1; may be null): where *skip != 0 every block writes zero partials and returns before
//   touching the tensors (no multiplication by 0: a NaN gradient cannot leak in).
// sums (float64): sum of u^2 per tensor of the op's list, written at index[i] by a fixed-order second pass
// over one partial per chunk (partials: num_chunks float64 of scratch); with flags.clip (SPEC 7.2) also
// sum(g^2 / max(v_hat / bc2, eps^2)) per tensor at sums_stride + index[i] (partials: 2 * num_chunks).
cudaError_t adam_step(DType dtype, const UpdateTables& t, int64_t num_chunks, AdamHyper hyper, const double* lr,
                      const double* step, const double* scale, const double* skip, double* partials, double* sums,
                      int64_t sums_stride, AdamFlags flags, cudaStream_t stream, const double* clip_sums = nullptr);
cudaError_t sgd_step(DType dtype, const UpdateTables& t, int64_t num_chunks, SgdHyper hyper, const double* lr,
                     const double* scale, const double* skip, double* partials, double* sums, SgdFlags flags,
                     cudaStream_t stream);
// p <- p * (1 - lr_i * weight_decay) - lr_i * scale * u, lr_i = lr[index[i]] (lr_per_tensor) or *lr; scale
// and skip may be null (1; never skipped).
cudaError_t apply_update(DType dtype, const UpdateTables& t, int64_t num_chunks, const double* lr,
                         bool lr_per_tensor, const double* scale, const double* skip, double weight_decay,
                         cudaStream_t stream);

// Fused losses, one block per row. grad may be null (no gradient) or alias logits; grad_scale points to
// one acc-type value; per-row outputs (acc type) are written for every row (0 for ignored ones). SPEC 4.5's
// options: weight (V acc-type class weights) or null, label_smoothing in [0, 1], softcap (0: off).
struct LossArgs {
  const void* logits;
  int64_t rows, cols, stride_logits;
  const int64_t* target;
  void* grad;
  int64_t stride_grad;
  const void* grad_scale;
  int64_t ignore_index;
  const void* weight;
  double label_smoothing, softcap;
};
cudaError_t cross_entropy_z_loss(DType dtype, const LossArgs& a, double z_coef, void* ce, void* zl, cudaStream_t stream);
cudaError_t stablemax_cross_entropy(DType dtype, const LossArgs& a, void* loss, cudaStream_t stream);

// Directional family. Tables (cached): per tensor numel, position in the op's list (index) and data
// addresses; blk_first: prefix sums of the tensors' counts of blocks of kStreamCounters Philox counters.
// keys: the caller's int64 key tensor ON THE DEVICE (never in a table: it changes every call), row-major
// (K, T) with T the length of the op's whole list (K = 1 for a (T,) key vector); tensor i of a launch uses
// keys[k * T + index[i]].
constexpr int64_t kStreamCounters = 256;
// The reductions over the stream (stream_sq_sums, directional_dots) take kStreamSumCounters counters per
// block (16 per thread): one partial per 16384 elements (per direction) keeps their scratch small. Their
// blk_first columns count blocks of this size.
constexpr int64_t kStreamSumCounters = kStreamCounters * 16;
// directional_dots keeps this many directions' sums per thread in registers (K > this: g is re-read).
constexpr int64_t kDotsTile = 8;
struct StreamTables {
  const int64_t* keys;
  const int64_t* numel;
  const int64_t* index;
  const int64_t* blk_first;
  int64_t num_tensors;
};
// sums[index[t]] = sum of n^2 over tensor t's stream (float64; blocks of kStreamSumCounters; partials:
// num_blocks of scratch; deterministic).
cudaError_t stream_sq_sums(const StreamTables& t, int64_t num_blocks, double* partials, double* sums,
                           cudaStream_t stream);
// out[t] = n * scale (src null) or src[t] + sigma * (n * scale), scale = scales[index[t]] (float64 holding a
// float32 value), math in `acc`, stored as `dtype`.
cudaError_t stream_write(DType dtype, DType acc, const StreamTables& t, int64_t num_blocks, const double* scales,
                         const int64_t* src, const int64_t* out, double sigma, cudaStream_t stream);
// gn[k, index[t]] = g_t . n_{t,k}; nn[k, index[t]] = n_{t,k} . n_{t,k} (float64, (K, T) row-major; blocks
// of kStreamSumCounters; partials: 2 * K * num_blocks of scratch; deterministic).
cudaError_t directional_dots(DType dtype, const StreamTables& t, int64_t num_blocks, int64_t K, int64_t T,
                             const int64_t* grads, double* partials, double* gn, double* nn, cudaStream_t stream);
// OrthoGrad: sums[c * T + index[t]] = (w.g, w.w, g.g)[c] ((3, T), deterministic; partials: 3 * num_chunks
// of scratch); then g <- (g - coef[index[t]] w) * scale[index[t]].
cudaError_t orthograd_sums(DType dtype, const UpdateTables& t, int64_t num_chunks, int64_t T, double* partials,
                           double* sums, cudaStream_t stream);
cudaError_t orthograd_write(DType dtype, const UpdateTables& t, int64_t num_chunks, const double* coef,
                            const double* scale, cudaStream_t stream);

// ---- attention (SPEC 8.1)

// partials[bh, m] = scale * the max of q_i . k_j over query tile m (32 rows) of (batch, head) bh = b * H + h and
// its keys j (<= i if causal), key head h / (H / Hk); ceil(T / 32) partials per head, float (double for
// kFloat64), NaN-propagating. q (B, H, T, D) and k (B, Hk, Tk, D) with any strides (4 each, in elements).
cudaError_t qk_max_logits(const void* q, const void* k, DType dtype, int64_t B, int64_t H, int64_t T, int64_t Hk,
                          int64_t Tk, int64_t D, const int64_t* q_strides, const int64_t* k_strides, double scale,
                          bool causal, void* partials, cudaStream_t stream);

}  // namespace stabkernels::cuda
