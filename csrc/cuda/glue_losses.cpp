// CUDA glue of the fused losses (SPEC 4.2-4.5): cross_entropy_z_loss and stablemax_cross_entropy (helpers:
// glue.h).
#ifdef STABKERNELS_WITH_CUDA
#include <torch/library.h>

#include <tuple>

#include "glue.h"

namespace stabkernels::cuda {
namespace {

LossArgs loss_args(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& grad, const at::Tensor& scale,
                   int64_t ignore_index, const std::optional<at::Tensor>& weight, double label_smoothing,
                   double softcap) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.stride(1) == 1,
              "fused loss: logits must be a CUDA (N, V) tensor with contiguous rows");
  TORCH_CHECK(target.is_cuda() && target.scalar_type() == at::kLong && target.numel() == logits.size(0),
              "fused loss: target must be an int64 CUDA tensor of N elements");
  TORCH_CHECK(grad.numel() == 0 || (grad.sizes() == logits.sizes() && grad.stride(1) == 1 &&
                                    grad.scalar_type() == logits.scalar_type()),
              "fused loss: grad must be empty or shaped like logits");
  TORCH_CHECK(!weight || (weight->device() == logits.device() && weight->dim() == 1 && weight->size(0) == logits.size(1) &&
                          weight->is_contiguous() && weight->scalar_type() == acc_of(logits.scalar_type())),
              "fused loss: class_weight must be a contiguous (V,) tensor on the logits' device, in the math dtype");
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1, "fused loss: label_smoothing must be in [0, 1]");
  TORCH_CHECK(softcap >= 0, "fused loss: softcap must be >= 0 (0: off)");
  return LossArgs{logits.const_data_ptr(), logits.size(0), logits.size(1), logits.stride(0),
                  target.contiguous().const_data_ptr<int64_t>(), grad.numel() ? grad.mutable_data_ptr() : nullptr,
                  grad.numel() ? grad.stride(0) : 0, scale.const_data_ptr(), ignore_index,
                  weight ? weight->const_data_ptr() : nullptr, label_smoothing, softcap};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_z_loss_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                             at::Tensor grad, const at::Tensor& grad_scale,
                                                             double z_coef, int64_t ignore_index,
                                                             const std::optional<at::Tensor>& class_weight,
                                                             double label_smoothing, double softcap) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto acc = acc_of(logits.scalar_type());
  const at::Tensor scale = device_scalar(grad_scale, logits.device(), acc, "fused loss", "grad_scale");
  const at::Tensor tgt = target.contiguous();
  at::Tensor ce = at::empty({logits.size(0)}, logits.options().dtype(acc)), zl = at::empty_like(ce);
  const LossArgs args = loss_args(logits, tgt, grad, scale, ignore_index, class_weight, label_smoothing, softcap);
  check(cross_entropy_z_loss(dtype_of(logits), args, z_coef, ce.mutable_data_ptr(), zl.mutable_data_ptr(),
                             c10::cuda::getCurrentCUDAStream()),
        "cross_entropy_z_loss");
  return {ce, zl};
}

at::Tensor stablemax_cross_entropy_cuda(const at::Tensor& logits, const at::Tensor& target, at::Tensor grad,
                                        const at::Tensor& grad_scale, int64_t ignore_index,
                                        const std::optional<at::Tensor>& class_weight, double label_smoothing,
                                        double softcap) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto acc = acc_of(logits.scalar_type());
  const at::Tensor scale = device_scalar(grad_scale, logits.device(), acc, "fused loss", "grad_scale");
  const at::Tensor tgt = target.contiguous();
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(acc));
  const LossArgs args = loss_args(logits, tgt, grad, scale, ignore_index, class_weight, label_smoothing, softcap);
  check(stablemax_cross_entropy(dtype_of(logits), args, loss.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "stablemax_cross_entropy");
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(stabkernels_C, CUDA, m) {
  m.impl("cross_entropy_z_loss", &cross_entropy_z_loss_cuda);
  m.impl("stablemax_cross_entropy", &stablemax_cross_entropy_cuda);
}

}  // namespace stabkernels::cuda
#endif  // STABKERNELS_WITH_CUDA
