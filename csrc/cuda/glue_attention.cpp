// CUDA glue of the attention family (SPEC 8): qk_max_logits (helpers: glue.h).
#ifdef STABKERNELS_WITH_CUDA
#include <torch/library.h>

#include <cmath>

#include "glue.h"

namespace stabkernels::cuda {
namespace {

// One partial maximum per (head, 32-row query tile) from the kernel, then a device amax per head: no host
// read, no atomics, the same bits every run.
at::Tensor qk_max_logits_cuda(const at::Tensor& q, const at::Tensor& k, double scale, bool causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "qk_max_logits: expected q (B, H, T, D) and k (B, Hk, Tk, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.device() == k.device(),
              "qk_max_logits: q and k must share one dtype and device");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), Hk = k.size(1), Tk = k.size(2), D = q.size(3);
  TORCH_CHECK(Hk > 0 && H % Hk == 0, "qk_max_logits: H must be a multiple of Hk");
  TORCH_CHECK(!causal || Tk == T, "qk_max_logits: causal needs Tk == T");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc = acc_of(q.scalar_type());
  if (B * H == 0 || T == 0 || Tk == 0) return at::full({B, H}, -INFINITY, q.options().dtype(acc));
  const int64_t tiles = ceil_div(T, 32);
  TORCH_CHECK(tiles <= 65535, "qk_max_logits: T must be at most 65535 * 32 on CUDA, got ", T);
  at::Tensor part = at::empty({B * H, tiles}, q.options().dtype(acc));
  const int64_t qs[4] = {q.stride(0), q.stride(1), q.stride(2), q.stride(3)};
  const int64_t ks[4] = {k.stride(0), k.stride(1), k.stride(2), k.stride(3)};
  check(qk_max_logits(q.const_data_ptr(), k.const_data_ptr(), dtype_of(q), B, H, T, Hk, Tk, D, qs, ks, scale, causal,
                      part.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "qk_max_logits");
  return part.amax(1).view({B, H});
}

}  // namespace

TORCH_LIBRARY_IMPL(stabkernels_C, CUDA, m) {
  m.impl("qk_max_logits", &qk_max_logits_cuda);
}

}  // namespace stabkernels::cuda
#endif  // STABKERNELS_WITH_CUDA
