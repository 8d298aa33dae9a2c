// CUDA glue of the fused optimizer updates (SPEC 7): adam_step_, sgd_step_, apply_update_, and the grouped
// update plan (declared in glue.h) that orthograd_ walks too.
#ifdef STABKERNELS_WITH_CUDA
#include <torch/library.h>

#include "glue.h"

namespace stabkernels::cuda {

UpdatePlan update_plan(const std::array<at::TensorList, 6>& lists) {
  constexpr size_t kCols = 9, kInfo = 3;
  const at::TensorList params = lists[0];
  PlanKey key("update", params[0].device());
  for (const auto& l : lists) key.add_list(l, true);
  const auto plan = launch_plan(key, [&] {
    PlanTables p;
    for (const auto& [dtype, idx] : by_dtype(params)) {
      std::vector<Column> cols(6);
      Column numel, chunks, index;
      for (int64_t i : idx) {
        for (size_t l = 0; l < 6; ++l) cols[l].push_back(lists[l].empty() ? 0 : addr(lists[l][i]));
        numel.push_back(params[i].numel()), index.push_back(i);
        chunks.push_back(ceil_div(params[i].numel(), kUpdateChunk));
      }
      Column first = prefix_sums(chunks);
      p.info.insert(p.info.end(), {static_cast<int64_t>(dtype), static_cast<int64_t>(idx.size()), first.back()});
      cols.push_back(numel), cols.push_back(first), cols.push_back(index);
      append(p, std::move(cols));
    }
    return p;
  });
  UpdatePlan out{plan, {}};
  const auto& info = plan->info();
  for (size_t g = 0; g * kInfo < info.size(); ++g) {
    const auto c = [&](size_t k) { return plan->column(g * kCols + k); };
    out.groups.push_back({static_cast<at::ScalarType>(info[g * kInfo]),
                          UpdateTables{c(0), c(1), c(2), c(3), c(4), c(5), c(6), c(7), c(8), info[g * kInfo + 1]},
                          info[g * kInfo + 2]});
  }
  return out;
}

namespace {

// The optional skip flag (SPEC 7.1) as a float64 device scalar whose address the kernels read; null when absent.
at::Tensor skip_flag(const std::optional<at::Tensor>& skip, const at::Device& device, const char* op) {
  return skip.has_value() ? device_scalar(*skip, device, at::kDouble, op, "skip") : at::Tensor();
}
const double* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<double>() : nullptr; }

// A learning rate as the kernels read it: one float64 number, or one per tensor ((T,), update clipping) read
// at the tensor's list position; on the device (no host copy).
at::Tensor device_lrs(const at::Tensor& lr, at::TensorList params, const at::Device& device, const char* op) {
  const int64_t n = static_cast<int64_t>(params.size());
  if (!lr.defined() || lr.numel() == 1) return device_scalar(lr, device, at::kDouble, op, "lr");
  TORCH_CHECK_VALUE(lr.dim() == 1 && lr.numel() == n && lr.device() == device, op,
                    ": lr must hold one number or one per tensor (", n, ") on ", device, ", got shape ", lr.sizes(),
                    " on ", lr.device());
  return converted(lr, at::kDouble).contiguous();
}

at::Tensor adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList updates,
                          const at::Tensor& step_scale, const at::Tensor& lr, const at::Tensor& step, double beta1,
                          double beta2, double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                          bool apply, bool eps_raw, const std::optional<at::Tensor>& skip, int64_t clip_stats) {
  check_update_lists("adam_step_", params,
                     {{"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
                      {"max_exp_avg_sqs", max_exp_avg_sqs, false, amsgrad}, {"updates", updates, true, false}},
                     at::kCUDA);
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  // step is not checked (>= 1) here: that would read the device. The kernels compute the bias corrections.
  const at::Tensor scale_d = device_scalar(step_scale, device, at::kDouble, "adam_step_", "step_scale");
  TORCH_CHECK_VALUE(clip_stats >= 0 && clip_stats <= 3, "adam_step_: clip_stats must be 0, 1, 2 or 3, got ",
                    clip_stats);
  const at::Tensor lr_d = device_lrs(lr, params, device, "adam_step_");
  const at::Tensor step_d = device_scalar(step, device, at::kDouble, "adam_step_", "step");
  const at::Tensor skip_d = skip_flag(skip, device, "adam_step_");
  const int64_t n = static_cast<int64_t>(params.size()), rows = clip_stats ? 2 : 1;
  at::Tensor sums = clip_stats ? at::empty({rows, n}, params[0].options().dtype(at::kDouble))
                               : at::empty({n}, params[0].options().dtype(at::kDouble));
  const at::TensorList vm = amsgrad ? max_exp_avg_sqs : at::TensorList();
  const UpdatePlan plan = update_plan({params, grads, exp_avgs, exp_avg_sqs, vm, updates});
  const at::ScalarType out_dtype = grouped_acc(params);
  // clip_stats 3 (update clipping's whole step, SPEC 7.2): per dtype group the "only" pass (row 1 of `sums`, row 0
  // zeros), then the step without the statistic, its blocks forming lr_i / max(1, RMS_i) from row 1 themselves
  // (update.clip_lrs' arithmetic) and its sums of u^2 going to row 0: two launches and their fixed-order
  // reductions, no op between them
  const auto pass = [&](const UpdateGroup& g, bool only, bool clip, const double* clip_sums) {
    at::Tensor partials = at::empty({(clip ? 2 : 1) * g.chunks}, sums.options());
    AdamFlags flags{decoupled, amsgrad, maximize, apply, !updates.empty() && !only, eps_raw, clip, only,
                    lr.numel() != 1, out_dtype == at::kFloat};
    check(adam_step(dtype_of(g.dtype), g.t, g.chunks, AdamHyper{beta1, beta2, eps, weight_decay},
                    lr_d.const_data_ptr<double>(), step_d.const_data_ptr<double>(), scale_d.const_data_ptr<double>(),
                    ptr_or_null(skip_d), partials.mutable_data_ptr<double>(), sums.mutable_data_ptr<double>(), n,
                    flags, stream, clip_sums),
          "adam_step_");
  };
  for (const auto& g : plan.groups) {
    if (clip_stats == 3) {
      pass(g, true, true, nullptr);
      pass(g, false, false, sums.const_data_ptr<double>() + n);
    } else {
      pass(g, clip_stats == 2, clip_stats != 0, nullptr);
    }
  }
  return converted(sums, out_dtype);
}

at::Tensor sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList updates,
                         const at::Tensor& step_scale, const at::Tensor& lr, double momentum, double dampening,
                         double weight_decay, bool nesterov, bool maximize, bool first, bool apply,
                         const std::optional<at::Tensor>& skip) {
  check_update_lists("sgd_step_", params,
                     {{"grads", grads}, {"momentum_buffers", bufs, false, momentum != 0},
                      {"updates", updates, true, false}},
                     at::kCUDA);
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor scale_d = device_scalar(step_scale, device, at::kDouble, "sgd_step_", "step_scale");
  const at::Tensor lr_d = device_scalar(lr, device, at::kDouble, "sgd_step_", "lr");
  const at::Tensor skip_d = skip_flag(skip, device, "sgd_step_");
  at::Tensor sums = at::empty({static_cast<int64_t>(params.size())}, params[0].options().dtype(at::kDouble));
  const at::TensorList b = momentum != 0 ? bufs : at::TensorList();
  const UpdatePlan plan = update_plan({params, grads, b, {}, {}, updates});
  for (const auto& g : plan.groups) {
    at::Tensor partials = at::empty({g.chunks}, sums.options());
    check(sgd_step(dtype_of(g.dtype), g.t, g.chunks, SgdHyper{momentum, dampening, weight_decay},
                   lr_d.const_data_ptr<double>(), scale_d.const_data_ptr<double>(), ptr_or_null(skip_d),
                   partials.mutable_data_ptr<double>(), sums.mutable_data_ptr<double>(),
                   SgdFlags{momentum != 0, nesterov, maximize, first, apply, !updates.empty()}, stream),
          "sgd_step_");
  }
  return converted(sums, grouped_acc(params));
}

void apply_update_cuda(at::TensorList params, at::TensorList updates, const at::Tensor& lr, double weight_decay,
                       const std::optional<at::Tensor>& step_scale, const std::optional<at::Tensor>& skip) {
  check_update_lists("apply_update_", params, {{"updates", updates, true}}, at::kCUDA);
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool per_tensor = lr.defined() && lr.numel() != 1;
  const at::Tensor lr_d = device_lrs(lr, params, device, "apply_update_");
  const at::Tensor scale_d = step_scale.has_value()
                                 ? device_scalar(*step_scale, device, at::kDouble, "apply_update_", "step_scale")
                                 : at::Tensor();
  const at::Tensor skip_d = skip_flag(skip, device, "apply_update_");
  const UpdatePlan plan = update_plan({params, {}, {}, {}, {}, updates});
  for (const auto& g : plan.groups)
    check(apply_update(dtype_of(g.dtype), g.t, g.chunks, lr_d.const_data_ptr<double>(), per_tensor,
                       ptr_or_null(scale_d), ptr_or_null(skip_d), weight_decay, stream),
          "apply_update_");
}

}  // namespace

TORCH_LIBRARY_IMPL(stabkernels_C, CUDA, m) {
  m.impl("adam_step_", &adam_step_cuda);
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("apply_update_", &apply_update_cuda);
}

}  // namespace stabkernels::cuda
#endif  // STABKERNELS_WITH_CUDA
