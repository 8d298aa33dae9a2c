// tangent_spread_linear on CPU (SPEC 2.3, fused output head): per-row spread of
//   z' = h' W^T + h W'^T + b'   (N x V)
// without materialising z'. Work items are (row block, vocabulary range) pairs; each thread computes
// RB x VB tiles with a single-threaded GEMM (MKL inside at::parallel_for runs on the calling thread), so a
// tile stays in L2, and folds it at once into running max/min per row (the epilogue). Partial extremes of
// the vocabulary ranges are merged at the end.

#include "common.h"

namespace stabkernels::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t kRowBlock = 256;  // a 256 x 512 fp32 tile is 512 KB: in L2, and large enough for MKL to run near peak
constexpr int64_t kVocabBlock = 512;

// hi/lo[r] <- max/min over the tile's row r (+ bias), NaN-propagating.
template <typename A>
void fold_tile(const A* tile, int64_t rows, int64_t cols, const A* bias, A* hi, A* lo) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  for (int64_t r = 0; r < rows; ++r) {
    const A* row = tile + r * cols;
    V vh(hi[r]), vl(lo[r]);
    int64_t j = 0;
    for (; j + L <= cols; j += L) {
      V x = V::loadu(row + j);
      if (bias) x = x + V::loadu(bias + j);
      vh = at::vec::maximum(vh, x);
      vl = at::vec::minimum(vl, x);
    }
    A h = lane_max(vh), l = lane_min(vl);
    for (; j < cols; ++j) {
      const A x = row[j] + (bias ? bias[j] : A(0));
      h = nan_max(h, x);
      l = nan_min(l, x);
    }
    hi[r] = h;
    lo[r] = l;
  }
}

at::Tensor tangent_spread_linear_cpu(const at::Tensor& h_in, const at::Tensor& h_dot_in, const at::Tensor& w_in,
                                     const std::optional<at::Tensor>& w_dot_in,
                                     const std::optional<at::Tensor>& b_dot_in) {
  TORCH_CHECK(h_in.dim() == 2 && h_dot_in.sizes() == h_in.sizes() && w_in.dim() == 2 && w_in.size(1) == h_in.size(1),
              "tangent_spread_linear: expected h, h_dot (N, d) and weight (V, d)");
  const auto acc = acc_dtype(h_in.scalar_type());
  // fp16/bf16 inputs are widened once (N x d and V x d, small next to N x V); GEMMs then run in fp32.
  const at::Tensor h = h_in.to(acc).contiguous(), hd = h_dot_in.to(acc).contiguous(), w = w_in.to(acc).contiguous();
  const bool has_wd = w_dot_in.has_value() && w_dot_in->defined();
  const bool has_bd = b_dot_in.has_value() && b_dot_in->defined();
  const at::Tensor wd = has_wd ? w_dot_in->to(acc).contiguous() : at::Tensor();
  const at::Tensor bd = has_bd ? b_dot_in->to(acc).contiguous() : at::Tensor();
  if (has_wd) TORCH_CHECK(wd.sizes() == w.sizes(), "tangent_spread_linear: weight_dot must match weight");
  if (has_bd) TORCH_CHECK(bd.dim() == 1 && bd.size(0) == w.size(0), "tangent_spread_linear: bias_dot must be (V,)");
  const int64_t N = h.size(0), V = w.size(0);
  at::Tensor out = at::empty({N}, h.options());
  if (N == 0) return out;
  const int64_t row_blocks = (N + kRowBlock - 1) / kRowBlock;
  // Enough vocabulary ranges to give every thread work when there are few row blocks.
  const int64_t threads = at::get_num_threads();
  const int64_t v_ranges = std::max<int64_t>(1, std::min<int64_t>((threads + row_blocks - 1) / row_blocks,
                                                                  (V + kVocabBlock - 1) / kVocabBlock));
  const int64_t v_span = ((V + v_ranges - 1) / v_ranges + kVocabBlock - 1) / kVocabBlock * kVocabBlock;
  at::Tensor hi = at::empty({v_ranges, N}, h.options()), lo = at::empty({v_ranges, N}, h.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "tangent_spread_linear_cpu", [&] {
    using A = scalar_t;
    hi.fill_(-std::numeric_limits<A>::infinity());
    lo.fill_(std::numeric_limits<A>::infinity());
    at::parallel_for(0, row_blocks * v_ranges, 1, [&](int64_t b0, int64_t b1) {
      at::Tensor tile = at::empty({kRowBlock, kVocabBlock}, h.options());
      for (int64_t item = b0; item < b1; ++item) {
        const int64_t rb = item / v_ranges, vr = item % v_ranges;
        const int64_t r0 = rb * kRowBlock, rows = std::min(kRowBlock, N - r0);
        A* hi_p = hi.mutable_data_ptr<A>() + vr * N + r0;
        A* lo_p = lo.mutable_data_ptr<A>() + vr * N + r0;
        const at::Tensor hd_rows = hd.narrow(0, r0, rows), h_rows = h.narrow(0, r0, rows);
        for (int64_t v0 = vr * v_span; v0 < std::min(V, (vr + 1) * v_span); v0 += kVocabBlock) {
          const int64_t cols = std::min(kVocabBlock, V - v0);
          at::Tensor t = tile.narrow(0, 0, rows).narrow(1, 0, cols);
          if (cols != kVocabBlock) t = at::empty({rows, cols}, h.options());  // keep tiles contiguous
          at::mm_out(t, hd_rows, w.narrow(0, v0, cols).t());
          if (has_wd) t.addmm_(h_rows, wd.narrow(0, v0, cols).t());
          const at::Tensor tc = t.is_contiguous() ? t : t.contiguous();
          fold_tile<A>(tc.const_data_ptr<A>(), rows, cols, has_bd ? bd.const_data_ptr<A>() + v0 : nullptr, hi_p, lo_p);
        }
      }
    });
    A* o = out.mutable_data_ptr<A>();
    const A* hp = hi.const_data_ptr<A>();
    const A* lp = lo.const_data_ptr<A>();
    for (int64_t r = 0; r < N; ++r) {
      A h_ = hp[r], l_ = lp[r];
      for (int64_t vr = 1; vr < v_ranges; ++vr) h_ = nan_max(h_, hp[vr * N + r]), l_ = nan_min(l_, lp[vr * N + r]);
      o[r] = h_ - l_;
    }
  });
  return out;
}

}  // namespace

void fill_tangent_spread(CpuKernels& k) {
  k.tangent_spread_linear = &tangent_spread_linear_cpu;
}

}  // namespace stabkernels::cpu
