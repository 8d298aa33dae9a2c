// CUDA glue of the spectral family (SPEC 1.1): power_iteration_ and sq_norms (helpers and rules: glue.h).
#ifdef STABKERNELS_WITH_CUDA
#include <torch/library.h>

#include <algorithm>

#include "glue.h"

namespace stabkernels::cuda {
namespace {

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
  const std::vector<at::Tensor> flat = contiguous_on(tensors, device, "sq_norms", "tensor");
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

}  // namespace

TORCH_LIBRARY_IMPL(stabkernels_C, CUDA, m) {
  m.impl("power_iteration_", &power_iteration_cuda);
  m.impl("sq_norms", &sq_norms_cuda);
}

}  // namespace stabkernels::cuda
#endif  // STABKERNELS_WITH_CUDA
