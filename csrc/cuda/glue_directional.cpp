// CUDA glue of the directional family (SPEC 3.3, 4): random_directions, perturb, directional_dots (the
// direction stream of csrc/philox.h, keys from the caller's device tensor) and orthograd_ (helpers: glue.h).
#ifdef STABKERNELS_WITH_CUDA
#include <torch/library.h>

#include "glue.h"
#include "../orthograd.h"
#include "../philox.h"

namespace stabkernels::cuda {
namespace {

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

// The stream's unit-norm scales from float64 sums of squares (step 4: stream_unit_scale of csrc/philox.h,
// elementwise on the device), rounded to float32, then widened to float64 for the math.
at::Tensor unit_scales(const at::Tensor& sq_sums) {
  return converted(converted(1.0 / (sq_sums.sqrt() + kStreamUnitEps), at::kFloat), at::kDouble);
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
  const at::Tensor scales = unit_scales(sums);
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
  const std::vector<at::Tensor> flat = contiguous_on(grads, device, "directional_dots", "gradient");
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
  const at::Tensor scales = unit_scales(nn);
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
  const auto k = orthograd::coefficients(wg, ww, gg);
  const at::Tensor coef = k.coef.contiguous(), scale = k.scale.contiguous();
  for (const auto& g : plan.groups)
    check(orthograd_write(dtype_of(g.dtype), g.t, g.chunks, coef.const_data_ptr<double>(),
                          scale.const_data_ptr<double>(), stream),
          "orthograd_");
}

}  // namespace

TORCH_LIBRARY_IMPL(stabkernels_C, CUDA, m) {
  m.impl("random_directions", &random_directions_cuda);
  m.impl("perturb", &perturb_cuda);
  m.impl("directional_dots", &directional_dots_cuda);
  m.impl("orthograd_", &orthograd_cuda);
}

}  // namespace stabkernels::cuda
#endif  // STABKERNELS_WITH_CUDA
