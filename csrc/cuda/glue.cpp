// Torch glue for the raw CUDA kernels: device guard, current stream, dtype mapping, output allocation.
// Compiled only when setup.py builds CUDA kernels (STABKERNELS_WITH_CUDA).
//
// No op here copies host data to the device or reads the device on the host: the multi-tensor tables come
// from cached launch plans (launch_plan.h, the one module that uploads), per-step scalars (lr, step, step
// scale, grad scale) are device tensors whose addresses the kernels read, per-tensor results are written by
// the kernels at each tensor's position in the op's list (no host-built index scatters), and stream keys
// are read from the caller's device tensor. So a steady-state step neither waits for the host nor breaks
// CUDA graph capture. Keep it that way: tests/test_build.py refuses host copies and host reads in this file.
#ifdef STABKERNELS_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <map>
#include <tuple>
#include <vector>

#include "kernels.h"
#include "launch_plan.h"
#include "../list_checks.h"

namespace stabkernels::cuda {
namespace {

using Column = std::vector<int64_t>;

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: TORCH_CHECK(false, "stabkernels CUDA kernels take float32/float64/float16/bfloat16, got ", t);
  }
}
DType dtype_of(const at::Tensor& t) { return dtype_of(t.scalar_type()); }
DType acc_dtype(at::ScalarType t) { return acc_of(t) == at::kDouble ? kFloat64 : kFloat32; }

void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// `t` in dtype `dtype`, converted on its own device (a kernel, no host involvement); `t` itself if it has it.
at::Tensor converted(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return t;
  return at::empty_like(t, t.options().dtype(dtype)).copy_(t);
}

// A per-step scalar (lr, step, step scale, grad scale) as a one-element `dtype` tensor on `device` whose
// address a kernel reads. It must already be on the device (the Python wrappers make it there without a
// host copy); a float64 one is used as is.
at::Tensor device_scalar(const at::Tensor& t, const at::Device& device, at::ScalarType dtype, const char* op,
                         const char* name) {
  TORCH_CHECK_VALUE(t.defined() && t.numel() == 1 && t.device() == device, op, ": ", name,
                    " must be a one-element tensor on ", device, " (kept on the device: no host copy), got ",
                    t.defined() ? t.toString() : "an undefined tensor", t.defined() ? " on " : "",
                    t.defined() ? c10::str(t.device()) : "");
  return converted(t, dtype).reshape({1}).contiguous();
}

// Positions in `ts` grouped by storage dtype, in a fixed order: one launch per group.
std::map<at::ScalarType, std::vector<int64_t>> by_dtype(at::TensorList ts) {
  std::map<at::ScalarType, std::vector<int64_t>> groups;
  for (int64_t i = 0; i < static_cast<int64_t>(ts.size()); ++i) groups[ts[i].scalar_type()].push_back(i);
  return groups;
}

at::ScalarType grouped_acc(at::TensorList ts) {
  for (const auto& t : ts)
    if (t.scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

int64_t addr(const at::Tensor& t) { return reinterpret_cast<int64_t>(t.const_data_ptr()); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Prefix sums of per-tensor block counts: n + 1 entries (the kernels' owner() search).
Column prefix_sums(const Column& counts) {
  Column first{0};
  for (int64_t c : counts) first.push_back(first.back() + c);
  return first;
}

// Appends `cols` to a plan's columns and returns the index of the first.
size_t append(PlanTables& p, std::vector<Column> cols) {
  const size_t base = p.columns.size();
  for (auto& c : cols) p.columns.push_back(std::move(c));
  return base;
}

// ---- spectral family

at::Tensor power_iteration_cuda(at::TensorList mats, at::TensorList us, at::TensorList vs, int64_t iters,
                                double eps) {
  TORCH_CHECK(us.size() == mats.size() && vs.size() == mats.size(), "power_iteration_: list lengths differ");
  const int64_t T = static_cast<int64_t>(mats.size());
  TORCH_CHECK(T > 0, "power_iteration_: empty list");
  const at::Device device = mats[0].device();
  for (int64_t i = 0; i < T; ++i) {
    const auto& W = mats[i];
    TORCH_CHECK(W.dim() == 2 && W.is_cuda() && W.device() == device, "power_iteration_: mats[", i,
                "] must be a 2-D tensor on ", device);
    const auto acc = acc_of(W.scalar_type());
    TORCH_CHECK(us[i].is_contiguous() && vs[i].is_contiguous() && us[i].scalar_type() == acc &&
                    vs[i].scalar_type() == acc && us[i].device() == device && vs[i].device() == device &&
                    us[i].numel() == W.size(0) && vs[i].numel() == W.size(1),
                "power_iteration_: us/vs[", i, "] must be contiguous ", acc, " vectors matching mats[", i, "]");
  }
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  // Per dtype group: columns w, u, v, rows, cols, s0, s1, x_off, y_off, yp_off, blk_first, index; info per
  // group: dtype, matrices, row blocks, x length, y length, partial y length, rows per block.
  constexpr size_t kCols = 12, kInfo = 7;
  PlanKey key("power_iteration", device);
  key.add_list(mats, false).add_list(us, true).add_list(vs, true);
  const auto plan = launch_plan(key, [&] {
    PlanTables p;
    for (const auto& [dtype, idx] : by_dtype(mats)) {
      // Rows per block: the fewest (most blocks) whose partial y's fit 16M entries or 1/256 of the group's
      // elements, whichever is more; kPowerIterationBlockRows at most.
      int64_t elements = 0;
      for (int64_t i : idx) elements += mats[i].numel();
      int64_t block_rows = kPowerIterationRows;
      const auto partial_len = [&](int64_t r) {
        int64_t total = 0;
        for (int64_t i : idx) total += ceil_div(mats[i].size(0), r) * mats[i].size(1);
        return total;
      };
      while (block_rows < kPowerIterationBlockRows &&
             partial_len(block_rows) > std::max<int64_t>(int64_t{1} << 24, elements / kPowerIterationBlockRows))
        block_rows *= 2;
      Column w, u, v, rows, cols, s0, s1, x_off, y_off, yp_off, blocks, index;
      int64_t xs = 0, ys = 0, yps = 0;
      for (int64_t i : idx) {
        const auto& W = mats[i];
        const int64_t nb = ceil_div(W.size(0), block_rows);
        w.push_back(addr(W)), u.push_back(addr(us[i])), v.push_back(addr(vs[i]));
        rows.push_back(W.size(0)), cols.push_back(W.size(1)), s0.push_back(W.stride(0)), s1.push_back(W.stride(1));
        x_off.push_back(xs), y_off.push_back(ys), yp_off.push_back(yps), index.push_back(i), blocks.push_back(nb);
        xs += W.size(0), ys += W.size(1), yps += nb * W.size(1);
      }
      Column first = prefix_sums(blocks);
      p.info.insert(p.info.end(),
                    {static_cast<int64_t>(dtype), static_cast<int64_t>(idx.size()), first.back(), xs, ys, yps,
                     block_rows});
      append(p, {w, u, v, rows, cols, s0, s1, x_off, y_off, yp_off, first, index});
    }
    return p;
  });
  at::Tensor sigma = at::zeros({T}, mats[0].options().dtype(at::kDouble));
  const auto& info = plan->info();
  for (size_t g = 0; g * kInfo < info.size(); ++g) {
    const auto dtype = static_cast<at::ScalarType>(info[g * kInfo]);
    const int64_t n = info[g * kInfo + 1], blocks = info[g * kInfo + 2];
    const auto acc = acc_of(dtype);
    const auto c = [&](size_t k) { return plan->column(g * kCols + k); };
    at::Tensor active = at::ones({n}, mats[0].options().dtype(at::kInt));
    PowerIterationTables t{c(0), c(1), c(2), c(3), c(4), c(5), c(6), c(7), c(8), c(9), c(10), c(11), n,
                           info[g * kInfo + 6], active.mutable_data_ptr<int32_t>()};
    at::Tensor x_buf = at::empty({info[g * kInfo + 3]}, mats[0].options().dtype(acc));
    at::Tensor y_buf = at::empty({info[g * kInfo + 4]}, mats[0].options().dtype(acc));
    at::Tensor y_part = at::empty({info[g * kInfo + 5]}, mats[0].options().dtype(acc));
    for (int64_t it = 0; it < iters; ++it) {
      check(power_iteration_pass(dtype_of(dtype), t, blocks, x_buf.mutable_data_ptr(), y_part.mutable_data_ptr(),
                                 y_buf.mutable_data_ptr(), stream),
            "power_iteration_");
      check(power_iteration_finish(acc_dtype(dtype), t, x_buf.const_data_ptr(), y_buf.const_data_ptr(),
                                   sigma.mutable_data_ptr<double>(), eps, stream),
            "power_iteration_");
    }
  }
  return converted(sigma, grouped_acc(mats));
}

at::Tensor sq_norms_cuda(at::TensorList tensors) {
  const int64_t T = static_cast<int64_t>(tensors.size());
  TORCH_CHECK(T > 0, "sq_norms: empty list");
  const at::Device device = tensors[0].device();
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int64_t kChunk = 1 << 16;
  std::vector<at::Tensor> flat;  // non-contiguous tensors are copied on the device (and miss the cache)
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device() == device, "sq_norms: every tensor must be on ", device);
    flat.push_back(t.contiguous());
  }
  // Per dtype group: columns ptrs, numels, chunk_first, index; info per group: dtype, tensors, chunks.
  constexpr size_t kCols = 4, kInfo = 3;
  PlanKey key("sq_norms", device);
  key.add_list(flat, true);
  const auto plan = launch_plan(key, [&] {
    PlanTables p;
    for (const auto& [dtype, idx] : by_dtype(flat)) {
      Column ptrs, numels, chunks, index;
      for (int64_t i : idx) {
        ptrs.push_back(addr(flat[i])), numels.push_back(flat[i].numel()), index.push_back(i);
        chunks.push_back(ceil_div(flat[i].numel(), kChunk));
      }
      Column first = prefix_sums(chunks);
      p.info.insert(p.info.end(), {static_cast<int64_t>(dtype), static_cast<int64_t>(idx.size()), first.back()});
      append(p, {ptrs, numels, first, index});
    }
    return p;
  });
  at::Tensor out = at::empty({T}, tensors[0].options().dtype(at::kDouble));  // every entry written
  const auto& info = plan->info();
  for (size_t g = 0; g * kInfo < info.size(); ++g) {
    const auto c = [&](size_t k) { return plan->column(g * kCols + k); };
    at::Tensor partials = at::empty({info[g * kInfo + 2]}, out.options());
    check(sq_norms(dtype_of(static_cast<at::ScalarType>(info[g * kInfo])), c(0), c(1), c(2), c(3),
                   info[g * kInfo + 1], info[g * kInfo + 2], kChunk, partials.mutable_data_ptr<double>(),
                   out.mutable_data_ptr<double>(), stream),
          "sq_norms");
  }
  return converted(out, grouped_acc(tensors));
}

// ---- fused optimizer updates

// The plan of a grouped update over `lists` in UpdateTables order (p, g, m, v, vm, u; an empty list gives
// zero addresses): per dtype group of lists[0], columns p, g, m, v, vm, u, numel, chunk_first, index; info
// per group: dtype, tensors, chunks. Keyed on every list's addresses, dtypes and numels (the lists were
// checked contiguous by check_update_lists), so any change of storage or shape builds a new plan.
struct UpdateGroup {
  at::ScalarType dtype;
  UpdateTables t;
  int64_t chunks;
};
struct UpdatePlan {
  std::shared_ptr<const LaunchPlan> plan;  // held until the launches are queued (the tables' memory)
  std::vector<UpdateGroup> groups;
};

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

at::Tensor adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList updates,
                          const at::Tensor& step_scale, const at::Tensor& lr, const at::Tensor& step, double beta1,
                          double beta2, double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                          bool apply, bool eps_raw) {
  check_update_lists("adam_step_", params,
                     {{"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
                      {"max_exp_avg_sqs", max_exp_avg_sqs, false, amsgrad}, {"updates", updates, true, false}},
                     at::kCUDA);
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  // step is not checked (>= 1) here: that would read the device. The kernels compute the bias corrections.
  const at::Tensor scale_d = device_scalar(step_scale, device, at::kDouble, "adam_step_", "step_scale");
  const at::Tensor lr_d = device_scalar(lr, device, at::kDouble, "adam_step_", "lr");
  const at::Tensor step_d = device_scalar(step, device, at::kDouble, "adam_step_", "step");
  at::Tensor sums = at::empty({static_cast<int64_t>(params.size())}, params[0].options().dtype(at::kDouble));
  const at::TensorList vm = amsgrad ? max_exp_avg_sqs : at::TensorList();
  const UpdatePlan plan = update_plan({params, grads, exp_avgs, exp_avg_sqs, vm, updates});
  for (const auto& g : plan.groups) {
    at::Tensor partials = at::empty({g.chunks}, sums.options());
    check(adam_step(dtype_of(g.dtype), g.t, g.chunks, AdamHyper{beta1, beta2, eps, weight_decay},
                    lr_d.const_data_ptr<double>(), step_d.const_data_ptr<double>(), scale_d.const_data_ptr<double>(),
                    partials.mutable_data_ptr<double>(), sums.mutable_data_ptr<double>(),
                    AdamFlags{decoupled, amsgrad, maximize, apply, !updates.empty(), eps_raw}, stream),
          "adam_step_");
  }
  return converted(sums, grouped_acc(params));
}

at::Tensor sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList updates,
                         const at::Tensor& step_scale, const at::Tensor& lr, double momentum, double dampening,
                         double weight_decay, bool nesterov, bool maximize, bool first, bool apply) {
  check_update_lists("sgd_step_", params,
                     {{"grads", grads}, {"momentum_buffers", bufs, false, momentum != 0},
                      {"updates", updates, true, false}},
                     at::kCUDA);
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor scale_d = device_scalar(step_scale, device, at::kDouble, "sgd_step_", "step_scale");
  const at::Tensor lr_d = device_scalar(lr, device, at::kDouble, "sgd_step_", "lr");
  at::Tensor sums = at::empty({static_cast<int64_t>(params.size())}, params[0].options().dtype(at::kDouble));
  const at::TensorList b = momentum != 0 ? bufs : at::TensorList();
  const UpdatePlan plan = update_plan({params, grads, b, {}, {}, updates});
  for (const auto& g : plan.groups) {
    at::Tensor partials = at::empty({g.chunks}, sums.options());
    check(sgd_step(dtype_of(g.dtype), g.t, g.chunks, SgdHyper{momentum, dampening, weight_decay},
                   lr_d.const_data_ptr<double>(), scale_d.const_data_ptr<double>(), partials.mutable_data_ptr<double>(),
                   sums.mutable_data_ptr<double>(),
                   SgdFlags{momentum != 0, nesterov, maximize, first, apply, !updates.empty()}, stream),
          "sgd_step_");
  }
  return converted(sums, grouped_acc(params));
}

void apply_update_cuda(at::TensorList params, at::TensorList updates, const at::Tensor& lr, double weight_decay) {
  check_update_lists("apply_update_", params, {{"updates", updates, true}}, at::kCUDA);
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor lr_d = device_scalar(lr, device, at::kDouble, "apply_update_", "lr");
  const UpdatePlan plan = update_plan({params, {}, {}, {}, {}, updates});
  for (const auto& g : plan.groups)
    check(apply_update(dtype_of(g.dtype), g.t, g.chunks, lr_d.const_data_ptr<double>(), weight_decay, stream),
          "apply_update_");
}

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

// ---- fused losses

LossArgs loss_args(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& grad, const at::Tensor& scale,
                   int64_t ignore_index) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.stride(1) == 1,
              "fused loss: logits must be a CUDA (N, V) tensor with contiguous rows");
  TORCH_CHECK(target.is_cuda() && target.scalar_type() == at::kLong && target.numel() == logits.size(0),
              "fused loss: target must be an int64 CUDA tensor of N elements");
  TORCH_CHECK(grad.numel() == 0 || (grad.sizes() == logits.sizes() && grad.stride(1) == 1 &&
                                    grad.scalar_type() == logits.scalar_type()),
              "fused loss: grad must be empty or shaped like logits");
  return LossArgs{logits.const_data_ptr(), logits.size(0), logits.size(1), logits.stride(0),
                  target.contiguous().const_data_ptr<int64_t>(), grad.numel() ? grad.mutable_data_ptr() : nullptr,
                  grad.numel() ? grad.stride(0) : 0, scale.const_data_ptr(), ignore_index};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_z_loss_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                             at::Tensor grad, const at::Tensor& grad_scale,
                                                             double z_coef, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto acc = acc_of(logits.scalar_type());
  const at::Tensor scale = device_scalar(grad_scale, logits.device(), acc, "fused loss", "grad_scale");
  const at::Tensor tgt = target.contiguous();
  at::Tensor ce = at::empty({logits.size(0)}, logits.options().dtype(acc)), zl = at::empty_like(ce);
  check(cross_entropy_z_loss(dtype_of(logits), loss_args(logits, tgt, grad, scale, ignore_index), z_coef,
                             ce.mutable_data_ptr(), zl.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "cross_entropy_z_loss");
  return {ce, zl};
}

at::Tensor stablemax_cross_entropy_cuda(const at::Tensor& logits, const at::Tensor& target, at::Tensor grad,
                                        const at::Tensor& grad_scale, int64_t ignore_index) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto acc = acc_of(logits.scalar_type());
  const at::Tensor scale = device_scalar(grad_scale, logits.device(), acc, "fused loss", "grad_scale");
  const at::Tensor tgt = target.contiguous();
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(acc));
  check(stablemax_cross_entropy(dtype_of(logits), loss_args(logits, tgt, grad, scale, ignore_index),
                                loss.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "stablemax_cross_entropy");
  return loss;
}

// ---- directional family

// The caller's key tensor, on the device: (T,) or (K, T) int64, row-major (a non-contiguous one is made
// contiguous on the device). T is the length of the op's list.
at::Tensor device_keys(const at::Tensor& keys, const at::Device& device, int64_t T, const char* op) {
  TORCH_CHECK_VALUE(keys.scalar_type() == at::kLong && keys.device() == device && (keys.dim() == 1 || keys.dim() == 2) &&
                        keys.size(-1) == T && keys.numel() > 0,
                    op, ": keys must be an int64 (", T, ",) or (K, ", T, ") tensor on ", device,
                    " (computed on the device: no host copy), got ", keys.toString(), " of shape ", keys.sizes(),
                    " on ", keys.device());
  return keys.contiguous();
}

// Number of stream blocks of a tensor: kStreamCounters Philox counters of four elements each (the write
// kernel), or kStreamSumCounters (the reductions).
int64_t stream_blocks(int64_t numel) { return ceil_div(numel, 4 * kStreamCounters); }
int64_t stream_sum_blocks(int64_t numel) { return ceil_div(numel, 4 * kStreamSumCounters); }

// out[i] = d_i (srcs empty) or srcs[i] + sigma d_i, d_i the unit-norm direction of stream keys[index i]:
// one sum-of-squares launch over every tensor, then one write launch per output dtype. Plan: columns numel,
// index, blk_first (reduction blocks) over every tensor; then per output dtype group numel, index,
// blk_first (write blocks), src, out. Info: total reduction blocks, then per group dtype, tensors, blocks.
void stream_write_all(at::TensorList ts, const at::Tensor& keys_in, at::TensorList outs, at::TensorList srcs,
                      double sigma, const at::Device& device, cudaStream_t stream, const char* op) {
  const int64_t T = static_cast<int64_t>(ts.size());
  for (int64_t i = 0; i < T; ++i)
    TORCH_CHECK(outs[i].device() == device && outs[i].is_contiguous() && outs[i].numel() == ts[i].numel() &&
                    (srcs.empty() || (srcs[i].device() == device && srcs[i].is_contiguous())),
                op, ": out[", i, "] (and params[", i, "]) must be contiguous tensors on ", device,
                " with the numel of params[", i, "]");
  const at::Tensor keys = device_keys(keys_in, device, T, op);
  constexpr size_t kCols = 5, kInfo = 3;
  PlanKey key("stream_write", device);
  for (const auto& t : ts) key.add(t.numel());
  key.add_list(outs, true).add_list(srcs, true);
  const auto plan = launch_plan(key, [&] {
    PlanTables p;
    Column numel, index, blocks;
    for (int64_t i = 0; i < T; ++i)
      numel.push_back(ts[i].numel()), index.push_back(i), blocks.push_back(stream_sum_blocks(ts[i].numel()));
    Column first = prefix_sums(blocks);
    p.info.push_back(first.back());
    append(p, {numel, index, first});
    for (const auto& [dtype, idx] : by_dtype(outs)) {
      Column gnumel, gindex, gblocks, src, out;
      for (int64_t i : idx) {
        gnumel.push_back(ts[i].numel()), gindex.push_back(i), gblocks.push_back(stream_blocks(ts[i].numel()));
        src.push_back(srcs.empty() ? 0 : addr(srcs[i])), out.push_back(addr(outs[i]));
      }
      Column gfirst = prefix_sums(gblocks);
      p.info.insert(p.info.end(), {static_cast<int64_t>(dtype), static_cast<int64_t>(idx.size()), gfirst.back()});
      append(p, {gnumel, gindex, gfirst, src, out});
    }
    return p;
  });
  const auto& info = plan->info();
  const int64_t* kp = keys.const_data_ptr<int64_t>();  // row 0: one key per tensor
  // The stream's unit-norm scales per tensor, rounded to float32 (then widened to float64 for the math).
  at::Tensor sums = at::empty({T}, at::TensorOptions().device(device).dtype(at::kDouble));
  at::Tensor partials = at::empty({info[0]}, sums.options());
  check(stream_sq_sums(StreamTables{kp, plan->column(0), plan->column(1), plan->column(2), T}, info[0],
                       partials.mutable_data_ptr<double>(), sums.mutable_data_ptr<double>(), stream),
        "stream_sq_sums");
  const at::Tensor scales = converted(converted(1.0 / (sums.sqrt() + 1e-12), at::kFloat), at::kDouble);
  for (size_t g = 0; 1 + g * kInfo < info.size(); ++g) {
    const auto c = [&](size_t k) { return plan->column(3 + g * kCols + k); };
    const auto dtype = static_cast<at::ScalarType>(info[1 + g * kInfo]);
    check(stream_write(dtype_of(dtype), acc_dtype(dtype), StreamTables{kp, c(0), c(1), c(2), info[2 + g * kInfo]},
                       info[3 + g * kInfo], scales.const_data_ptr<double>(), srcs.empty() ? nullptr : c(3), c(4),
                       sigma, stream),
          "stream_write");
  }
}

std::vector<at::Tensor> random_directions_cuda(at::TensorList like, const at::Tensor& keys) {
  TORCH_CHECK(!like.empty(), "random_directions: empty list");
  const c10::cuda::CUDAGuard guard(like[0].device());
  std::vector<at::Tensor> outs;
  for (const auto& t : like) outs.push_back(at::empty(t.sizes(), t.options().dtype(acc_of(t.scalar_type()))));
  stream_write_all(like, keys, outs, {}, 0.0, like[0].device(), c10::cuda::getCurrentCUDAStream(),
                   "random_directions");
  return outs;
}

void perturb_cuda(at::TensorList params, const at::Tensor& keys, double sigma, at::TensorList out) {
  TORCH_CHECK(!params.empty() && out.size() == params.size(), "perturb: one output per parameter");
  const c10::cuda::CUDAGuard guard(params[0].device());
  stream_write_all(params, keys, out, params, sigma, params[0].device(), c10::cuda::getCurrentCUDAStream(),
                   "perturb");
}

at::Tensor directional_dots_cuda(at::TensorList grads, const at::Tensor& keys_in) {
  TORCH_CHECK(!grads.empty(), "directional_dots: empty list");
  const at::Device device = grads[0].device();
  const c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t T = static_cast<int64_t>(grads.size());
  const at::Tensor keys = device_keys(keys_in, device, T, "directional_dots");
  const int64_t K = keys.dim() == 2 ? keys.size(0) : 1;
  std::vector<at::Tensor> flat;
  for (const auto& g : grads) {
    TORCH_CHECK(g.device() == device, "directional_dots: every gradient must be on ", device);
    flat.push_back(g.contiguous());
  }
  // Per dtype group: columns numel, index, blk_first, g; info per group: dtype, tensors, blocks.
  constexpr size_t kCols = 4, kInfo = 3;
  PlanKey key("directional_dots", device);
  key.add_list(flat, true);
  const auto plan = launch_plan(key, [&] {
    PlanTables p;
    for (const auto& [dtype, idx] : by_dtype(flat)) {
      Column numel, index, blocks, g;
      for (int64_t i : idx) {
        numel.push_back(flat[i].numel()), index.push_back(i), blocks.push_back(stream_sum_blocks(flat[i].numel()));
        g.push_back(addr(flat[i]));
      }
      Column first = prefix_sums(blocks);
      p.info.insert(p.info.end(), {static_cast<int64_t>(dtype), static_cast<int64_t>(idx.size()), first.back()});
      append(p, {numel, index, first, g});
    }
    return p;
  });
  // every entry of gn and nn is written (each group its tensors' columns)
  at::Tensor gn = at::empty({K, T}, grads[0].options().dtype(at::kDouble)), nn = at::empty_like(gn);
  const auto& info = plan->info();
  for (size_t g = 0; g * kInfo < info.size(); ++g) {
    const auto c = [&](size_t k) { return plan->column(g * kCols + k); };
    at::Tensor partials = at::empty({2 * K * info[g * kInfo + 2]}, gn.options());
    check(directional_dots(dtype_of(static_cast<at::ScalarType>(info[g * kInfo])),
                           StreamTables{keys.const_data_ptr<int64_t>(), c(0), c(1), c(2), info[g * kInfo + 1]},
                           info[g * kInfo + 2], K, T, c(3), partials.mutable_data_ptr<double>(),
                           gn.mutable_data_ptr<double>(), nn.mutable_data_ptr<double>(), stream),
          "directional_dots");
  }
  const at::Tensor scales = converted(converted(1.0 / (nn.sqrt() + 1e-12), at::kFloat), at::kDouble);
  return converted((gn * scales).sum(1), grouped_acc(grads));
}

void orthograd_cuda(at::TensorList params, at::TensorList grads) {
  check_update_lists("orthograd_", params, {{"grads", grads}}, at::kCUDA);
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const UpdatePlan plan = update_plan({params, grads, {}, {}, {}, {}});
  const int64_t T = static_cast<int64_t>(params.size());
  // (w.g, w.w, g.g) per tensor, rows of a (3, T) tensor: every entry written (each group its columns)
  at::Tensor sums = at::empty({3, T}, params[0].options().dtype(at::kDouble));
  for (const auto& g : plan.groups) {
    at::Tensor partials = at::empty({3 * g.chunks}, sums.options());
    check(orthograd_sums(dtype_of(g.dtype), g.t, g.chunks, T, partials.mutable_data_ptr<double>(),
                         sums.mutable_data_ptr<double>(), stream),
          "orthograd_");
  }
  const at::Tensor wg = sums.select(0, 0), ww = sums.select(0, 1), gg = sums.select(0, 2);
  const at::Tensor coef = (wg / (ww + 1e-30)).contiguous();
  const at::Tensor perp2 = (gg - 2 * coef * wg + coef * coef * ww).clamp_min(0);
  const at::Tensor scale = (gg.sqrt() / (perp2.sqrt() + 1e-30)).contiguous();
  for (const auto& g : plan.groups)
    check(orthograd_write(dtype_of(g.dtype), g.t, g.chunks, coef.const_data_ptr<double>(),
                          scale.const_data_ptr<double>(), stream),
          "orthograd_");
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
  m.impl("power_iteration_", &power_iteration_cuda);
  m.impl("sq_norms", &sq_norms_cuda);
  m.impl("adam_step_", &adam_step_cuda);
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("apply_update_", &apply_update_cuda);
  m.impl("random_directions", &random_directions_cuda);
  m.impl("perturb", &perturb_cuda);
  m.impl("directional_dots", &directional_dots_cuda);
  m.impl("orthograd_", &orthograd_cuda);
  m.impl("cross_entropy_z_loss", &cross_entropy_z_loss_cuda);
  m.impl("stablemax_cross_entropy", &stablemax_cross_entropy_cuda);
}

}  // namespace stabkernels::cuda
#endif  // STABKERNELS_WITH_CUDA
