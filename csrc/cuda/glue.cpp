// Torch glue for the raw CUDA kernels: device guard, current stream, dtype mapping, output allocation.
// Compiled only when setup.py builds CUDA kernels (STABKERNELS_WITH_CUDA).
#ifdef STABKERNELS_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <map>
#include <tuple>
#include <vector>

#include "kernels.h"
#include "../list_checks.h"

namespace stabkernels::cuda {
namespace {

using Column = std::vector<int64_t>;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: TORCH_CHECK(false, "stabkernels CUDA kernels take float32/float64/float16/bfloat16, got ", t.scalar_type());
  }
}

void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// Copies int64 columns (pointer/shape tables) to the device in one transfer; column c starts at
// data + offsets[c]. The returned tensor owns the memory and must outlive the launches that read it.
at::Tensor device_table(const std::vector<Column>& columns, const at::Device& device,
                        std::vector<const int64_t*>& starts) {
  int64_t total = 0;
  for (const auto& c : columns) total += static_cast<int64_t>(c.size());
  at::Tensor host = at::empty({std::max<int64_t>(total, 1)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* p = host.mutable_data_ptr<int64_t>();
  std::vector<int64_t> offsets;
  for (const auto& c : columns) {
    offsets.push_back(p - host.mutable_data_ptr<int64_t>());
    p = std::copy(c.begin(), c.end(), p);
  }
  at::Tensor dev = host.to(device, /*non_blocking=*/true);
  starts.clear();
  for (int64_t off : offsets) starts.push_back(dev.const_data_ptr<int64_t>() + off);
  return dev;
}

// Indices of `ts` grouped by storage dtype, in order: one launch per group.
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

at::Tensor power_iteration_cuda(at::TensorList mats, at::TensorList us, at::TensorList vs, int64_t iters,
                                double eps) {
  TORCH_CHECK(us.size() == mats.size() && vs.size() == mats.size(), "power_iteration_: list lengths differ");
  const int64_t T = static_cast<int64_t>(mats.size());
  TORCH_CHECK(T > 0, "power_iteration_: empty list");
  const c10::cuda::CUDAGuard guard(mats[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor sigma = at::zeros({T}, mats[0].options().dtype(grouped_acc(mats)));
  for (const auto& [dtype, idx] : by_dtype(mats)) {
    const auto acc = acc_of(dtype);
    Column w, u, v, rows, cols, s0, s1, x_off, y_off, blk_mat, blk_row;
    int64_t xs = 0, ys = 0;
    for (int64_t j = 0; j < static_cast<int64_t>(idx.size()); ++j) {
      const auto& W = mats[idx[j]];
      TORCH_CHECK(W.dim() == 2 && W.is_cuda() && W.device() == mats[0].device(), "power_iteration_: mats[", idx[j],
                  "] must be a 2-D tensor on ", mats[0].device());
      const auto& U = us[idx[j]];
      const auto& V = vs[idx[j]];
      TORCH_CHECK(U.is_contiguous() && V.is_contiguous() && U.scalar_type() == acc && V.scalar_type() == acc &&
                      U.numel() == W.size(0) && V.numel() == W.size(1),
                  "power_iteration_: us/vs[", idx[j], "] must be contiguous ", acc, " vectors matching mats[",
                  idx[j], "]");
      w.push_back(addr(W)), u.push_back(addr(U)), v.push_back(addr(V));
      rows.push_back(W.size(0)), cols.push_back(W.size(1)), s0.push_back(W.stride(0)), s1.push_back(W.stride(1));
      x_off.push_back(xs), y_off.push_back(ys);
      xs += W.size(0), ys += W.size(1);
      for (int64_t r = 0; r < W.size(0); r += kPowerIterationRows) blk_mat.push_back(j), blk_row.push_back(r);
    }
    std::vector<const int64_t*> c;
    at::Tensor table = device_table({w, u, v, rows, cols, s0, s1, x_off, y_off, blk_mat, blk_row}, mats[0].device(), c);
    at::Tensor active = at::ones({static_cast<int64_t>(idx.size())}, mats[0].options().dtype(at::kInt));
    PowerIterationTables t{c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10],
                           active.mutable_data_ptr<int32_t>()};
    at::Tensor x_buf = at::empty({xs}, mats[0].options().dtype(acc));
    at::Tensor y_buf = at::empty({ys}, mats[0].options().dtype(acc));
    at::Tensor sig = at::zeros({static_cast<int64_t>(idx.size())}, mats[0].options().dtype(acc));
    for (int64_t it = 0; it < iters; ++it) {
      y_buf.zero_();
      check(power_iteration_pass(dtype_of(mats[idx[0]]), t, static_cast<int64_t>(blk_mat.size()),
                                 x_buf.mutable_data_ptr(), y_buf.mutable_data_ptr(), stream),
            "power_iteration_");
      check(power_iteration_finish(acc == at::kDouble ? kFloat64 : kFloat32, t, static_cast<int64_t>(idx.size()),
                                   x_buf.const_data_ptr(), y_buf.const_data_ptr(), sig.mutable_data_ptr(), eps,
                                   stream),
            "power_iteration_");
    }
    sigma.index_copy_(0, at::tensor(idx, at::kLong).to(sigma.device()), sig.to(sigma.scalar_type()));
  }
  return sigma;
}

at::Tensor sq_norms_cuda(at::TensorList tensors) {
  const int64_t T = static_cast<int64_t>(tensors.size());
  TORCH_CHECK(T > 0, "sq_norms: empty list");
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  constexpr int64_t kChunk = 1 << 16;
  at::Tensor out = at::zeros({T}, tensors[0].options().dtype(grouped_acc(tensors)));
  for (const auto& [dtype, idx] : by_dtype(tensors)) {
    std::vector<at::Tensor> flat;
    Column ptrs, numels, chunk_tensor, chunk_start;
    for (int64_t j = 0; j < static_cast<int64_t>(idx.size()); ++j) {
      flat.push_back(tensors[idx[j]].contiguous());
      ptrs.push_back(addr(flat.back())), numels.push_back(flat.back().numel());
      for (int64_t s = 0; s < flat.back().numel(); s += kChunk) chunk_tensor.push_back(j), chunk_start.push_back(s);
    }
    std::vector<const int64_t*> c;
    at::Tensor table = device_table({ptrs, numels, chunk_tensor, chunk_start}, tensors[0].device(), c);
    at::Tensor part = at::zeros({static_cast<int64_t>(idx.size())}, tensors[0].options().dtype(acc_of(dtype)));
    check(sq_norms(dtype_of(flat[0]), c[0], c[1], c[2], c[3], static_cast<int64_t>(chunk_tensor.size()), kChunk,
                   part.mutable_data_ptr(), stream),
          "sq_norms");
    out.index_copy_(0, at::tensor(idx, at::kLong).to(out.device()), part.to(out.scalar_type()));
  }
  return out;
}

// Doubles travel in the int64 tables bit for bit.
Column double_bits(std::initializer_list<double> values) {
  Column out;
  for (double d : values) {
    int64_t bits;
    std::memcpy(&bits, &d, sizeof bits);
    out.push_back(bits);
  }
  return out;
}

// Tables of one dtype group of a fused update; `lists` in UpdateTables order (p, g, m, v, vm, u), an empty
// list giving zero addresses. The trailing column holds `consts` as double bits.
struct UpdateLaunch {
  at::Tensor table;
  UpdateTables t;
  int64_t chunks;
  const double* consts;
};

UpdateLaunch update_launch(const std::vector<int64_t>& idx, std::vector<at::TensorList> lists, const Column& consts,
                           const at::Device& device) {
  std::vector<Column> cols(6);
  Column numel, chunk_tensor, chunk_start;
  for (int64_t j = 0; j < static_cast<int64_t>(idx.size()); ++j) {
    for (size_t l = 0; l < 6; ++l)
      cols[l].push_back(l < lists.size() && !lists[l].empty() ? addr(lists[l][idx[j]]) : 0);
    const int64_t n = lists[0][idx[j]].numel();
    numel.push_back(n);
    for (int64_t s = 0; s < n; s += kUpdateChunk) chunk_tensor.push_back(j), chunk_start.push_back(s);
  }
  cols.push_back(numel), cols.push_back(chunk_tensor), cols.push_back(chunk_start), cols.push_back(consts);
  std::vector<const int64_t*> c;
  UpdateLaunch out;
  out.table = device_table(cols, device, c);
  out.t = UpdateTables{c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8]};
  out.chunks = static_cast<int64_t>(chunk_tensor.size());
  out.consts = reinterpret_cast<const double*>(c[9]);
  return out;
}

at::Tensor adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList updates,
                          const at::Tensor& step_scale, double lr, double beta1, double beta2, double eps,
                          double weight_decay, int64_t step, bool decoupled, bool amsgrad, bool maximize,
                          bool apply) {
  check_update_lists("adam_step_", params,
                     {{"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
                      {"max_exp_avg_sqs", max_exp_avg_sqs, false, amsgrad}, {"updates", updates, true, false}},
                     at::kCUDA);
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const double bc1 = 1 - std::pow(beta1, static_cast<double>(step));
  const double bc2s = std::sqrt(1 - std::pow(beta2, static_cast<double>(step)));
  const Column consts = double_bits({lr, beta1, beta2, eps, weight_decay, bc1, bc2s});
  at::Tensor scale = step_scale.to(params[0].device(), at::kDouble).reshape({1});
  at::Tensor out = at::zeros({static_cast<int64_t>(params.size())}, params[0].options().dtype(grouped_acc(params)));
  for (const auto& [dtype, idx] : by_dtype(params)) {
    auto l = update_launch(idx, {params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, updates}, consts,
                           params[0].device());
    at::Tensor sums = at::zeros({static_cast<int64_t>(idx.size())}, params[0].options().dtype(acc_of(dtype)));
    check(adam_step(dtype_of(params[idx[0]]), l.t, l.chunks, l.consts, scale.const_data_ptr<double>(),
                    sums.mutable_data_ptr(), AdamFlags{decoupled, amsgrad, maximize, apply, !updates.empty()}, stream),
          "adam_step_");
    out.index_copy_(0, at::tensor(idx, at::kLong).to(out.device()), sums.to(out.scalar_type()));
  }
  return out;
}

at::Tensor sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList updates,
                         const at::Tensor& step_scale, double lr, double momentum, double dampening,
                         double weight_decay, bool nesterov, bool maximize, bool first, bool apply) {
  check_update_lists("sgd_step_", params,
                     {{"grads", grads}, {"momentum_buffers", bufs, false, momentum != 0},
                      {"updates", updates, true, false}},
                     at::kCUDA);
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const Column consts = double_bits({lr, momentum, dampening, weight_decay});
  at::Tensor scale = step_scale.to(params[0].device(), at::kDouble).reshape({1});
  at::Tensor out = at::zeros({static_cast<int64_t>(params.size())}, params[0].options().dtype(grouped_acc(params)));
  for (const auto& [dtype, idx] : by_dtype(params)) {
    auto l = update_launch(idx, {params, grads, bufs, {}, {}, updates}, consts, params[0].device());
    at::Tensor sums = at::zeros({static_cast<int64_t>(idx.size())}, params[0].options().dtype(acc_of(dtype)));
    check(sgd_step(dtype_of(params[idx[0]]), l.t, l.chunks, l.consts, scale.const_data_ptr<double>(),
                   sums.mutable_data_ptr(),
                   SgdFlags{momentum != 0, nesterov, maximize, first, apply, !updates.empty()}, stream),
          "sgd_step_");
    out.index_copy_(0, at::tensor(idx, at::kLong).to(out.device()), sums.to(out.scalar_type()));
  }
  return out;
}

void apply_update_cuda(at::TensorList params, at::TensorList updates, const at::Tensor& lr, double weight_decay) {
  check_update_lists("apply_update_", params, {{"updates", updates, true}}, at::kCUDA);
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor scale = lr.to(params[0].device(), at::kDouble).reshape({1});
  for (const auto& [dtype, idx] : by_dtype(params)) {
    auto l = update_launch(idx, {params, {}, {}, {}, {}, updates}, {}, params[0].device());
    check(apply_update(dtype_of(params[idx[0]]), l.t, l.chunks, scale.const_data_ptr<double>(), weight_decay,
                       stream),
          "apply_update_");
  }
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
  const at::Tensor h = h_in.to(acc), hd = h_dot_in.to(acc), w = w_in.to(acc);
  const bool has_wd = w_dot_in.has_value() && w_dot_in->defined();
  const bool has_bd = b_dot_in.has_value() && b_dot_in->defined();
  const at::Tensor wd = has_wd ? w_dot_in->to(acc) : at::Tensor();
  const at::Tensor bd = has_bd ? b_dot_in->to(acc).contiguous() : at::Tensor();
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
  const at::Tensor scale = grad_scale.to(logits.device(), acc).reshape({1}).contiguous();
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
  const at::Tensor scale = grad_scale.to(logits.device(), acc).reshape({1}).contiguous();
  const at::Tensor tgt = target.contiguous();
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(acc));
  check(stablemax_cross_entropy(dtype_of(logits), loss_args(logits, tgt, grad, scale, ignore_index),
                                loss.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "stablemax_cross_entropy");
  return loss;
}

// ---- directional family

// Tables for the stream kernels over tensors idx of `ts`: keys (row `key_row` of a (K, T) CPU key tensor,
// or all K rows when key_row < 0), numel, blocks of kStreamCounters counters; plus `extra` address columns.
struct StreamLaunch {
  at::Tensor table;
  StreamTables t;
  int64_t blocks;
  std::vector<const int64_t*> extra;
};

StreamLaunch stream_launch(const std::vector<int64_t>& idx, at::TensorList ts, const at::Tensor& keys, int64_t key_row,
                           std::vector<Column> extra, const at::Device& device) {
  const at::Tensor k2 = (keys.dim() == 1 ? keys.unsqueeze(0) : keys).contiguous();  // owns the data read below
  const int64_t T = k2.size(1);
  const int64_t* kp = k2.const_data_ptr<int64_t>();
  Column key_col, numel, blk_tensor, blk_ctr;
  for (int64_t r = (key_row < 0 ? 0 : key_row); r < (key_row < 0 ? k2.size(0) : key_row + 1); ++r)
    for (int64_t i : idx) key_col.push_back(kp[r * T + i]);
  for (int64_t j = 0; j < static_cast<int64_t>(idx.size()); ++j) {
    const int64_t n = ts[idx[j]].numel();
    numel.push_back(n);
    for (int64_t c = 0; 4 * c < n; c += kStreamCounters) blk_tensor.push_back(j), blk_ctr.push_back(c);
  }
  std::vector<Column> cols = {key_col, numel, blk_tensor, blk_ctr};
  for (auto& e : extra) cols.push_back(std::move(e));
  StreamLaunch l;
  std::vector<const int64_t*> c;
  l.table = device_table(cols, device, c);
  l.t = StreamTables{c[0], c[1], c[2], c[3]};
  l.blocks = static_cast<int64_t>(blk_tensor.size());
  l.extra.assign(c.begin() + 4, c.end());
  return l;
}

std::vector<int64_t> all_indices(at::TensorList ts) {
  std::vector<int64_t> idx(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) idx[i] = static_cast<int64_t>(i);
  return idx;
}

// The stream's unit-norm scales per tensor, rounded to float32 (then widened to float64 for the math).
at::Tensor stream_scales(at::TensorList ts, const at::Tensor& keys, const at::Device& device, cudaStream_t stream) {
  auto l = stream_launch(all_indices(ts), ts, keys, 0, {}, device);
  at::Tensor sums = at::zeros({static_cast<int64_t>(ts.size())}, at::TensorOptions().device(device).dtype(at::kDouble));
  check(stream_sq_sums(l.t, l.blocks, sums.mutable_data_ptr<double>(), stream), "stream_sq_sums");
  return (1.0 / (sums.sqrt() + 1e-12)).to(at::kFloat).to(at::kDouble);
}

// out[i] = d_i (src empty) or src[i] + sigma d_i, one launch per output dtype.
void stream_write_all(at::TensorList ts, const at::Tensor& keys, at::TensorList outs, at::TensorList srcs,
                      double sigma, const at::Device& device, cudaStream_t stream) {
  const at::Tensor scales = stream_scales(ts, keys, device, stream);
  for (const auto& [dtype, idx] : by_dtype(outs)) {
    Column src_col, out_col;
    for (int64_t i : idx) {
      out_col.push_back(addr(outs[i]));
      src_col.push_back(srcs.empty() ? 0 : addr(srcs[i]));
    }
    auto l = stream_launch(idx, ts, keys, 0, {src_col, out_col}, device);
    const auto acc = acc_of(dtype);
    at::Tensor sub = scales.index_select(0, at::tensor(idx, at::kLong).to(device)).to(acc);
    check(stream_write(dtype_of(outs[idx[0]]), acc == at::kDouble ? kFloat64 : kFloat32, l.t, l.blocks,
                       sub.const_data_ptr(), srcs.empty() ? nullptr : l.extra[0], l.extra[1], sigma, stream),
          "stream_write");
  }
}

std::vector<at::Tensor> random_directions_cuda(at::TensorList like, const at::Tensor& keys) {
  TORCH_CHECK(!like.empty(), "random_directions: empty list");
  const c10::cuda::CUDAGuard guard(like[0].device());
  std::vector<at::Tensor> outs;
  for (const auto& t : like) outs.push_back(at::empty(t.sizes(), t.options().dtype(acc_of(t.scalar_type()))));
  stream_write_all(like, keys.cpu(), outs, {}, 0.0, like[0].device(), c10::cuda::getCurrentCUDAStream());
  return outs;
}

void perturb_cuda(at::TensorList params, const at::Tensor& keys, double sigma, at::TensorList out) {
  TORCH_CHECK(!params.empty() && out.size() == params.size(), "perturb: one output per parameter");
  const c10::cuda::CUDAGuard guard(params[0].device());
  stream_write_all(params, keys.cpu(), out, params, sigma, params[0].device(), c10::cuda::getCurrentCUDAStream());
}

at::Tensor directional_dots_cuda(at::TensorList grads, const at::Tensor& keys_in) {
  TORCH_CHECK(!grads.empty(), "directional_dots: empty list");
  const c10::cuda::CUDAGuard guard(grads[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor keys = keys_in.cpu();
  const int64_t K = keys.size(0);
  std::vector<at::Tensor> flat;
  for (const auto& g : grads) flat.push_back(g.contiguous());
  at::Tensor total = at::zeros({K}, grads[0].options().dtype(at::kDouble));
  for (const auto& [dtype, idx] : by_dtype(grads)) {
    Column g_col;
    for (int64_t i : idx) g_col.push_back(addr(flat[i]));
    auto l = stream_launch(idx, flat, keys, -1, {g_col}, grads[0].device());
    const int64_t Tsub = static_cast<int64_t>(idx.size());
    at::Tensor gn = at::zeros({K, Tsub}, total.options()), nn = at::zeros({K, Tsub}, total.options());
    check(directional_dots(dtype_of(grads[idx[0]]), l.t, l.blocks, K, Tsub, l.extra[0], gn.mutable_data_ptr<double>(),
                           nn.mutable_data_ptr<double>(), stream),
          "directional_dots");
    total += (gn * (1.0 / (nn.sqrt() + 1e-12)).to(at::kFloat).to(at::kDouble)).sum(1);
  }
  return total.to(grouped_acc(grads));
}

void orthograd_cuda(at::TensorList params, at::TensorList grads) {
  check_update_lists("orthograd_", params, {{"grads", grads}}, at::kCUDA);
  const c10::cuda::CUDAGuard guard(params[0].device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (const auto& [dtype, idx] : by_dtype(params)) {
    auto l = update_launch(idx, {params, grads}, {}, params[0].device());
    at::Tensor sums = at::zeros({static_cast<int64_t>(idx.size()), 3}, params[0].options().dtype(at::kDouble));
    check(orthograd_sums(dtype_of(params[idx[0]]), l.t, l.chunks, sums.mutable_data_ptr<double>(), stream),
          "orthograd_");
    const at::Tensor wg = sums.select(1, 0), ww = sums.select(1, 1), gg = sums.select(1, 2);
    const at::Tensor coef = (wg / (ww + 1e-30)).contiguous();
    const at::Tensor perp2 = (gg - 2 * coef * wg + coef * coef * ww).clamp_min(0);
    const at::Tensor scale = (gg.sqrt() / (perp2.sqrt() + 1e-30)).contiguous();
    check(orthograd_write(dtype_of(params[idx[0]]), l.t, l.chunks, coef.const_data_ptr<double>(),
                          scale.const_data_ptr<double>(), stream),
          "orthograd_");
  }
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
