// CUDA glue of the logit-spread family (SPEC 2): row_spread and tangent_spread_linear (helpers: glue.h).
#ifdef STABKERNELS_WITH_CUDA
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "glue.h"

namespace stabkernels::cuda {
namespace {

// cuBLAS (fp32 unless torch.backends.cuda.matmul.allow_tf32 is set) on vocabulary chunks, each folded into running extremes by
// row_minmax_fold: peak extra memory is one (N, kVocabChunk) tile instead of the (N, V) tangent.
at::Tensor tangent_spread_linear_cuda(const at::Tensor& h_in, const at::Tensor& h_dot_in, const at::Tensor& w_in,
                                      const std::optional<at::Tensor>& w_dot_in,
                                      const std::optional<at::Tensor>& b_dot_in) {
  constexpr int64_t kVocabChunk = 1024;
  TORCH_CHECK(h_in.dim() == 2 && h_dot_in.sizes() == h_in.sizes() && w_in.dim() == 2 && w_in.size(1) == h_in.size(1),
              "tangent_spread_linear: expected h, h_dot (N, d) and weight (V, d)");
  const c10::cuda::CUDAGuard guard(h_in.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto acc = acc_of(h_in.scalar_type());
  const at::Tensor h = converted(h_in, acc), hd = converted(h_dot_in, acc), w = converted(w_in, acc);
  const bool has_wd = w_dot_in.has_value() && w_dot_in->defined();
  const bool has_bd = b_dot_in.has_value() && b_dot_in->defined();
  const at::Tensor wd = has_wd ? converted(*w_dot_in, acc) : at::Tensor();
  const at::Tensor bd = has_bd ? converted(*b_dot_in, acc).contiguous() : at::Tensor();
  const int64_t N = h.size(0), V = w.size(0);
  at::Tensor hi = at::full({N}, -INFINITY, h.options()), lo = at::full({N}, INFINITY, h.options());
  at::Tensor tile = at::empty({N, std::min(kVocabChunk, V)}, h.options());
  for (int64_t v0 = 0; v0 < V; v0 += kVocabChunk) {
    const int64_t cols = std::min(kVocabChunk, V - v0);
    at::Tensor t = tile.narrow(1, 0, cols);
    at::mm_out(t, hd, w.narrow(0, v0, cols).t());
    if (has_wd) t.addmm_(h, wd.narrow(0, v0, cols).t());
    check(row_minmax_fold(acc == at::kDouble ? kFloat64 : kFloat32, t.const_data_ptr(), N, cols, t.stride(0),
                          has_bd ? static_cast<const char*>(bd.const_data_ptr()) + v0 * bd.element_size() : nullptr,
                          hi.mutable_data_ptr(), lo.mutable_data_ptr(), stream),
          "tangent_spread_linear");
  }
  return hi - lo;
}

at::Tensor row_spread_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "row_spread: expected an (N, C>0) tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_of(x.scalar_type());
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(acc));
  check(row_spread(x.const_data_ptr(), dtype_of(x), x.size(0), x.size(1), x.stride(0), x.stride(1),
                   out.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "row_spread");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(stabkernels_C, CUDA, m) {
  m.impl("row_spread", &row_spread_cuda);
  m.impl("tangent_spread_linear", &tangent_spread_linear_cuda);
}

}  // namespace stabkernels::cuda
#endif  // STABKERNELS_WITH_CUDA
