// Shared by the CUDA glue files (csrc/cuda/glue_<family>.cpp): torch glue for the raw CUDA kernels of
// kernels.h: device guard, current stream, dtype mapping, output allocation. Each glue file wraps one family's
// kernels as torch ops and registers them for the CUDA key in its own TORCH_LIBRARY_IMPL(stabkernels_C, CUDA, m)
// block; the schemas are csrc/stabkernels.cpp's. Compiled only when setup.py builds CUDA kernels
// (STABKERNELS_WITH_CUDA).
//
// No op copies host data to the device or reads the device on the host: the multi-tensor tables come from
// cached launch plans (launch_plan.h, the one module that uploads), per-step scalars (lr, step, step scale,
// grad scale) are device tensors whose addresses the kernels read, per-tensor results are written by the
// kernels at each tensor's position in the op's list (no host-built index scatters), and stream keys are read
// from the caller's device tensor. So a steady-state step neither waits for the host nor breaks CUDA graph
// capture. Keep it that way: tests/test_build.py and tests/test_cuda_glue_static.py refuse host copies and host
// reads in these files.
#pragma once
#ifdef STABKERNELS_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <map>
#include <memory>
#include <vector>

#include "kernels.h"
#include "launch_plan.h"
#include "../list_checks.h"

namespace stabkernels::cuda {

using Column = std::vector<int64_t>;

inline DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: TORCH_CHECK(false, "stabkernels CUDA kernels take float32/float64/float16/bfloat16, got ", t);
  }
}
inline DType dtype_of(const at::Tensor& t) { return dtype_of(t.scalar_type()); }
inline DType acc_dtype(at::ScalarType t) { return acc_of(t) == at::kDouble ? kFloat64 : kFloat32; }

inline void check(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// `t` in dtype `dtype`, converted on its own device (a kernel, no host involvement); `t` itself if it has it.
inline at::Tensor converted(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return t;
  return at::empty_like(t, t.options().dtype(dtype)).copy_(t);
}

// A per-step scalar (lr, step, step scale, grad scale) as a one-element `dtype` tensor on `device` whose
// address a kernel reads. It must already be on the device (the Python wrappers make it there without a
// host copy); a float64 one is used as is.
inline at::Tensor device_scalar(const at::Tensor& t, const at::Device& device, at::ScalarType dtype,
                                const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined() && t.numel() == 1 && t.device() == device, op, ": ", name,
                    " must be a one-element tensor on ", device, " (kept on the device: no host copy), got ",
                    t.defined() ? t.toString() : "an undefined tensor", t.defined() ? " on " : "",
                    t.defined() ? c10::str(t.device()) : "");
  return converted(t, dtype).reshape({1}).contiguous();
}

// Positions in `ts` grouped by storage dtype, in a fixed order: one launch per group.
inline std::map<at::ScalarType, std::vector<int64_t>> by_dtype(at::TensorList ts) {
  std::map<at::ScalarType, std::vector<int64_t>> groups;
  for (int64_t i = 0; i < static_cast<int64_t>(ts.size()); ++i) groups[ts[i].scalar_type()].push_back(i);
  return groups;
}

inline at::ScalarType grouped_acc(at::TensorList ts) {
  for (const auto& t : ts)
    if (t.scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

inline int64_t addr(const at::Tensor& t) { return reinterpret_cast<int64_t>(t.const_data_ptr()); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Prefix sums of per-tensor block counts: n + 1 entries (the kernels' owner() search).
inline Column prefix_sums(const Column& counts) {
  Column first{0};
  for (int64_t c : counts) first.push_back(first.back() + c);
  return first;
}

// Appends `cols` to a plan's columns and returns the index of the first.
inline size_t append(PlanTables& p, std::vector<Column> cols) {
  const size_t base = p.columns.size();
  for (auto& c : cols) p.columns.push_back(std::move(c));
  return base;
}

// `ts` contiguous, every tensor checked to be on `device` ("<op>: every <what> must be on <device>"): a
// non-contiguous tensor is copied on the device (a kernel, no host involvement) and, being new storage each
// call, misses the launch-plan cache.
inline std::vector<at::Tensor> contiguous_on(at::TensorList ts, const at::Device& device, const char* op,
                                             const char* what) {
  std::vector<at::Tensor> flat;
  flat.reserve(ts.size());
  for (const auto& t : ts) {
    TORCH_CHECK(t.device() == device, op, ": every ", what, " must be on ", device);
    flat.push_back(t.contiguous());
  }
  return flat;
}

// ---- the grouped elementwise plan of the fused updates (glue_update.cpp), which orthograd_ also walks

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

UpdatePlan update_plan(const std::array<at::TensorList, 6>& lists);

}  // namespace stabkernels::cuda
#endif  // STABKERNELS_WITH_CUDA
