// qk_max_logits on CPU (SPEC 8.1): per (batch, query head) the largest scale * q_i . k_j over j (<= i when
// causal), without the (T x Tk) scores. Work items are (batch, head, query block); each thread computes
// QB x KB score tiles with a single-threaded GEMM (at::mm_out inside at::parallel_for runs on the calling
// thread, so a tile stays in L2) and folds each at once into one running maximum; causal items stop at the
// diagonal and fold only each row's visible prefix. Items write partial maxima, merged per head at the end.

#include "common.h"

namespace stabkernels::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t kQueryBlock = 128;  // a 128 x 256 fp32 tile is 128 KB: in L2
constexpr int64_t kKeyBlock = 256;

// NaN-propagating maximum of n contiguous values, starting from m.
template <typename A>
A max_prefix(const A* row, int64_t n, A m) {
  using V = Vectorized<A>;
  constexpr int64_t L = V::size();
  V vm(m);
  int64_t j = 0;
  for (; j + L <= n; j += L) vm = at::vec::maximum(vm, V::loadu(row + j));
  A out = lane_max(vm);
  for (; j < n; ++j) out = nan_max(out, row[j]);
  return out;
}

at::Tensor qk_max_logits_cpu(const at::Tensor& q_in, const at::Tensor& k_in, double scale, bool causal) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && k_in.size(0) == q_in.size(0) && k_in.size(3) == q_in.size(3),
              "qk_max_logits: expected q (B, H, T, D) and k (B, Hk, Tk, D)");
  const int64_t B = q_in.size(0), H = q_in.size(1), T = q_in.size(2), Hk = k_in.size(1), Tk = k_in.size(2);
  TORCH_CHECK(Hk > 0 && H % Hk == 0, "qk_max_logits: H must be a multiple of Hk");
  TORCH_CHECK(!causal || Tk == T, "qk_max_logits: causal needs Tk == T");
  const auto acc = acc_dtype(q_in.scalar_type());
  at::Tensor out = at::empty({B, H}, q_in.options().dtype(acc));
  if (out.numel() == 0) return out;
  if (T == 0 || Tk == 0) return out.fill_(-std::numeric_limits<double>::infinity());
  // float16/bfloat16 (and non-contiguous) inputs are widened once: O(B H T D), small next to the scores.
  const at::Tensor q = q_in.to(acc).contiguous(), k = k_in.to(acc).contiguous();
  const int64_t q_blocks = (T + kQueryBlock - 1) / kQueryBlock, group = H / Hk;
  at::Tensor part = at::empty({B * H, q_blocks}, q.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "qk_max_logits_cpu", [&] {
    using A = scalar_t;
    A* pp = part.mutable_data_ptr<A>();
    at::parallel_for(0, B * H * q_blocks, 1, [&](int64_t i0, int64_t i1) {
      at::Tensor tile = at::empty({kQueryBlock, kKeyBlock}, q.options());
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t bh = item / q_blocks, qb = item % q_blocks, b = bh / H, h = bh % H;
        const int64_t r0 = qb * kQueryBlock, rows = std::min(kQueryBlock, T - r0);
        const at::Tensor q_rows = q[b][h].narrow(0, r0, rows), k_head = k[b][h / group];
        const int64_t keys = causal ? r0 + rows : Tk;  // the last query row sees keys [0, r0 + rows)
        A m = -std::numeric_limits<A>::infinity();
        for (int64_t c0 = 0; c0 < keys; c0 += kKeyBlock) {
          const int64_t cols = std::min(kKeyBlock, keys - c0);
          at::Tensor t = tile.narrow(0, 0, rows).narrow(1, 0, cols);
          if (cols != kKeyBlock) t = at::empty({rows, cols}, q.options());  // keep tiles contiguous
          at::mm_out(t, q_rows, k_head.narrow(0, c0, cols).t());
          const A* tp = t.const_data_ptr<A>();
          for (int64_t r = 0; r < rows; ++r) {
            // causal: row r (query r0 + r) sees keys j <= r0 + r, i.e. the first r0 + r + 1 - c0 of the tile
            const int64_t n = causal ? std::min(cols, r0 + r + 1 - c0) : cols;
            if (n > 0) m = max_prefix(tp + r * cols, n, m);
          }
        }
        // the scale after the maximum: rounding is monotonic, so max(scale * s) == scale * max(s) for scale > 0
        pp[item] = m * static_cast<A>(scale);
      }
    });
    A* o = out.mutable_data_ptr<A>();
    for (int64_t bh = 0; bh < B * H; ++bh) {
      A m = pp[bh * q_blocks];
      for (int64_t qb = 1; qb < q_blocks; ++qb) m = nan_max(m, pp[bh * q_blocks + qb]);
      o[bh] = m;
    }
  });
  return out;
}

}  // namespace

void fill_attention(CpuKernels& k) {
  k.qk_max_logits = &qk_max_logits_cpu;
}

}  // namespace stabkernels::cpu
