// The table of CPU kernels one ISA level provides (csrc/cpu/isa/): plain function pointers, so that only
// the baseline code in csrc/cpu/dispatch.cpp touches torch's registration machinery.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace stabkernels::cpu {

using at::Tensor;
using at::TensorList;

// X(op name) for every op with a CPU kernel; the schema of each is in csrc/stabkernels.cpp.
#define STABKERNELS_CPU_OPS(X)                                                                             \
  X(row_spread) X(tangent_spread_linear) X(power_iteration_) X(sq_norms) X(adam_step_) X(sgd_step_)       \
  X(apply_update_) X(skip_rule_) X(advance_steps_) X(random_directions) X(perturb) X(directional_dots)    \
  X(orthograd_) X(shard_normals) X(cross_entropy_z_loss) X(stablemax_cross_entropy)                      \
  X(qk_max_logits)

struct CpuKernels {
  Tensor (*row_spread)(const Tensor& x) = nullptr;
  Tensor (*tangent_spread_linear)(const Tensor& h, const Tensor& h_dot, const Tensor& weight,
                                  const std::optional<Tensor>& weight_dot,
                                  const std::optional<Tensor>& bias_dot) = nullptr;
  Tensor (*power_iteration_)(TensorList mats, TensorList us, TensorList vs, int64_t iters, double eps) = nullptr;
  Tensor (*sq_norms)(TensorList tensors) = nullptr;
  Tensor (*adam_step_)(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                       TensorList max_exp_avg_sqs, TensorList updates, const Tensor& step_scale, const Tensor& lr,
                       const Tensor& step, double beta1, double beta2, double eps, double weight_decay,
                       bool decoupled, bool amsgrad, bool maximize, bool apply, bool eps_raw,
                       const std::optional<Tensor>& skip, int64_t clip_stats) = nullptr;
  Tensor (*sgd_step_)(TensorList params, TensorList grads, TensorList bufs, TensorList updates,
                      const Tensor& step_scale, const Tensor& lr, double momentum, double dampening, double weight_decay,
                      bool nesterov, bool maximize, bool first, bool apply, const std::optional<Tensor>& skip) = nullptr;
  void (*apply_update_)(TensorList params, TensorList updates, const Tensor& lr, double weight_decay,
                        const std::optional<Tensor>& step_scale, const std::optional<Tensor>& skip) = nullptr;
  Tensor (*skip_rule_)(const Tensor& history, const Tensor& skipped, const Tensor& loss,
                       const std::optional<Tensor>& grad_norm, int64_t count, int64_t warmup,
                       double sigma_factor) = nullptr;
  void (*advance_steps_)(TensorList steps, const std::optional<Tensor>& skip) = nullptr;
  std::vector<Tensor> (*random_directions)(TensorList like, const Tensor& keys) = nullptr;
  void (*perturb)(TensorList params, const Tensor& keys, double sigma, TensorList out) = nullptr;
  Tensor (*directional_dots)(TensorList grads, const Tensor& keys) = nullptr;
  void (*orthograd_)(TensorList params, TensorList grads) = nullptr;
  Tensor (*shard_normals)(TensorList out, const Tensor& keys, at::IntArrayRef offsets) = nullptr;
  std::tuple<Tensor, Tensor> (*cross_entropy_z_loss)(const Tensor& logits, const Tensor& target, Tensor grad,
                                                     const Tensor& grad_scale, double z_coef,
                                                     int64_t ignore_index, const std::optional<Tensor>& class_weight,
                                                     double label_smoothing, double softcap) = nullptr;
  Tensor (*stablemax_cross_entropy)(const Tensor& logits, const Tensor& target, Tensor grad,
                                    const Tensor& grad_scale, int64_t ignore_index,
                                    const std::optional<Tensor>& class_weight, double label_smoothing,
                                    double softcap) = nullptr;
  // attention (SPEC 8)
  Tensor (*qk_max_logits)(const Tensor& q, const Tensor& k, double scale, bool causal) = nullptr;
};

}  // namespace stabkernels::cpu

// Each level's table, built on first call (by that level's code: call it only on a CPU that has the level).
extern "C" {
const stabkernels::cpu::CpuKernels* stabkernels_cpu_kernels_DEFAULT();
const stabkernels::cpu::CpuKernels* stabkernels_cpu_kernels_AVX2();
const stabkernels::cpu::CpuKernels* stabkernels_cpu_kernels_AVX512();
}
