// The compiled extension stabkernels._C: one place that declares every compiled op's schema.
// Implementations register per dispatch key: csrc/cpu/*.cpp (CPU) and csrc/cuda/glue_<family>.cpp (CUDA).
// The public, backend-selecting ops live in Python under torch.ops.stabkernels.*; these are the raw
// kernels they call, under torch.ops.stabkernels_C.*.
#include <Python.h>
#include <torch/library.h>

#include "cpu/dispatch.h"
#ifdef STABKERNELS_WITH_CUDA
#include "cuda/launch_plan.h"
#endif

namespace {

// _C.cpu_isa() -> (level in use, best level this CPU supports), e.g. ("AVX2", "AVX512") when forced.
PyObject* cpu_isa(PyObject*, PyObject*) {
  using namespace stabkernels::cpu;
  return Py_BuildValue("(ss)", isa_name(active_isa()), isa_name(best_supported_isa()));
}

// _C.cuda_plan_cache_stats() -> (hits, misses, entries) of the CUDA launch-plan cache (csrc/cuda/launch_plan.h),
// or None in a build without CUDA kernels: a test sees a steady-state step hit and a changed list miss.
PyObject* cuda_plan_cache_stats(PyObject*, PyObject*) {
#ifdef STABKERNELS_WITH_CUDA
  const auto s = stabkernels::cuda::plan_cache_stats();
  return Py_BuildValue("(LLL)", static_cast<long long>(s.hits), static_cast<long long>(s.misses),
                       static_cast<long long>(s.entries));
#else
  Py_RETURN_NONE;
#endif
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "(ISA level of the CPU kernels in use, best level this CPU supports)"},
    {"cuda_plan_cache_stats", cuda_plan_cache_stats, METH_NOARGS,
     "(hits, misses, entries) of the CUDA launch-plan cache, or None without CUDA kernels"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// Importing stabkernels._C runs the static registrations of the ops below and of their kernels.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(stabkernels_C, m) {
  // spread (SPEC 2): per-row max - min of an (N, C) tensor, any strides; fp32 result (fp64 for fp64).
  m.def("row_spread(Tensor x) -> Tensor");
  // Per-row spread of z' = h_dot W^T + h W_dot^T + b_dot (an output head's tangent logits), without
  // materialising the (N, V) tangent; fp32 result (fp64 for fp64 inputs).
  m.def("tangent_spread_linear(Tensor h, Tensor h_dot, Tensor weight, Tensor? weight_dot, Tensor? bias_dot) -> Tensor");
  // spectral (SPEC 1.1): grouped power iteration over 2-D matrices; updates the unit vectors us/vs in place
  // and returns sigma_1 per matrix (float64 if any matrix is float64, else float32).
  m.def("power_iteration_(Tensor[] mats, Tensor(a!)[] us, Tensor(b!)[] vs, int iters, float eps) -> Tensor");
  // Sum of squares of each tensor of a list (float64 if any is float64, else float32).
  m.def("sq_norms(Tensor[] tensors) -> Tensor");
  // Fused optimizer updates (SPEC 2.4, 3.1). Each advances the moments once, optionally writes the unit
  // proposal u (the step at lr = 1) into `updates` (math dtype), optionally applies
  // p <- p - lr * step_scale * u, and returns sum(u^2) per tensor. step_scale, lr and step (the step number
  // after this step, >= 1) are 0-d float64 tensors on the params' device, read by the kernels (on CUDA from
  // device memory: no host round trip, capturable), so Adam's bias corrections bc1 = 1 - beta1^step and
  // sqrt(bc2) = sqrt(1 - beta2^step) are computed by the kernels, in double. eps_raw: eps is added to
  // sqrt(v) before the bias correction, i.e. the eps used is eps / sqrt(bc2) (S-Adam's eps_mode="authors").
  // skip (SPEC 7.1): an optional 0-d float64 tensor on the params' device, read by the kernels (on CUDA in
  // device memory); nonzero: nothing is written and the sums are 0 (step is then not checked). clip_stats
  // (SPEC 7.2, Adam): 1 returns (2, T), the second row sum(g^2 / max(v_hat, eps^2)) per tensor; 2 the same
  // from a pass that writes nothing (row 0 zero); 3 (CPU only: Python runs it as 2, clip_lrs and 0 elsewhere)
  // the whole update-clipped step, returning what 1 returns. Adam's lr: one float64 number (0-d) or one per
  // tensor ((T,)).
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] updates, Tensor step_scale, Tensor lr, Tensor step, "
      "float beta1, float beta2, float eps, float weight_decay, bool decoupled, bool amsgrad, bool maximize, "
      "bool apply, bool eps_raw, Tensor? skip, int clip_stats) -> Tensor");
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] updates, "
      "Tensor step_scale, Tensor lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize, bool first, bool apply, Tensor? skip) -> Tensor");
  // directional (SPEC 3.3, 4): keys are the per-tensor 64-bit stream keys (int64 bit patterns, see
  // csrc/philox.h and stabkernels/_stream.py).
  m.def("random_directions(Tensor[] tensors, Tensor keys) -> Tensor[]");
  m.def("perturb(Tensor[] params, Tensor keys, float sigma, Tensor(a!)[] out) -> ()");
  m.def("directional_dots(Tensor[] grads, Tensor keys) -> Tensor");
  m.def("orthograd_(Tensor[] params, Tensor(a!)[] grads) -> ()");
  // the float32 normals of elements [offsets[i], offsets[i] + out[i].numel()) of stream i into out[i]
  // (a DTensor shard's slice); returns their sums of squares (float64). CPU only (Triton serves CUDA).
  m.def("shard_normals(Tensor(a!)[] out, Tensor keys, int[] offsets) -> Tensor");
  // losses (SPEC 4): per-row losses (float32; 0 for ignored rows) and, when grad is non-empty, the row
  // gradients scaled by grad_scale written into grad (which may alias logits). SPEC 4.5's options: class_weight
  // (V,) in the math dtype or None, label_smoothing in [0, 1], softcap (0: off).
  m.def("cross_entropy_z_loss(Tensor logits, Tensor target, Tensor(a!) grad, Tensor grad_scale, float z_coef, "
        "int ignore_index, Tensor? class_weight, float label_smoothing, float softcap) -> (Tensor, Tensor)");
  m.def("stablemax_cross_entropy(Tensor logits, Tensor target, Tensor(a!) grad, Tensor grad_scale, "
        "int ignore_index, Tensor? class_weight, float label_smoothing, float softcap) -> Tensor");
  // p <- p * (1 - lr_i * weight_decay) - lr_i * step_scale * u, lr one float64 number (0-d) or one per tensor
  // ((T,), update clipping), step_scale optional (1), both kept on the device; nothing where skip is nonzero.
  m.def("apply_update_(Tensor(a!)[] params, Tensor[] updates, Tensor lr, float weight_decay, Tensor? step_scale, "
        "Tensor? skip) -> ()");
  // SkipStep's rule (SPEC 7.1): this step's loss (and gradient norm) against the mean and unbiased std of the
  // previous min(count, W) values of its row of history (2, W) float64; returns keep (0-d bool): the check is
  // on once count + 1 >= warmup, and a value more than sigma_factor stds from the mean (or NaN/inf) fails it.
  // Writes the values into column count % W and adds 1 - keep to skipped (0-d int64). No host read on CUDA.
  m.def("skip_rule_(Tensor(a!) history, Tensor(b!) skipped, Tensor loss, Tensor? grad_norm, int count, "
        "int warmup, float sigma_factor) -> Tensor");
  // The optimizers' step counters (one-element float32/float64 tensors) advanced by 1, or by 0 where skip is
  // nonzero (SPEC 7.1): CPU only, one call for what torch's _foreach_add_ does as one add_ per tensor on CPU.
  m.def("advance_steps_(Tensor(a!)[] steps, Tensor? skip) -> ()");
  // attention (SPEC 8.1): per (batch, query head) the max of scale * q_i . k_j over keys j (<= i if causal), q
  // (B, H, T, D), k (B, Hk, Tk, D), H % Hk == 0 (query head h reads key head h / (H / Hk)); (B, H) in fp32
  // (fp64 for fp64), -inf without keys, NaN propagates; the (T x Tk) scores are never built.
  m.def("qk_max_logits(Tensor q, Tensor k, float scale, bool causal) -> Tensor");
}
