// Launch plans: the int64 tables (addresses, sizes, strides, prefix sums) that the grouped CUDA kernels walk,
// built on the host once per list of tensors, uploaded once and kept on the device for as long as the list's
// storage and shapes stay the same.
//
// This module is the ONLY place of the CUDA glue that copies host data to the device (tests/test_build.py
// checks the other glue files for host-to-device copies and host reads). A steady-state step looks its plan
// up by a key built in O(number of tensors) (data addresses, numels or shapes and strides, dtypes, device,
// table kind) and launches with the cached device table: no copy, no host wait, nothing that grows with the
// number of elements, and nothing a CUDA graph capture would refuse. A key that differs in anything the
// table is made of is a miss: the plan is rebuilt (a pinned buffer and one non_blocking copy on the current
// stream), never silently reused. Per-step scalars (lr, step, step scale) and hyper-parameters are never
// part of a plan: they travel as device tensors or kernel arguments.
#pragma once
#ifdef STABKERNELS_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace stabkernels::cuda {

// The identity of a plan: every host value its tables are made of, collected word by word.
class PlanKey {
 public:
  PlanKey(const char* kind, const at::Device& device);
  PlanKey& add(int64_t word);
  // address, dtype, dim, sizes and strides (an undefined tensor: one marker word)
  PlanKey& add_tensor(const at::Tensor& t);
  // address, dtype and numel only: for contiguous tensors walked linearly (the update kernels)
  PlanKey& add_flat(const at::Tensor& t);
  PlanKey& add_list(at::TensorList ts, bool flat);

  const std::vector<int64_t>& words() const { return words_; }
  uint64_t hash() const { return hash_; }
  bool operator==(const PlanKey& o) const { return hash_ == o.hash_ && words_ == o.words_; }

 private:
  std::vector<int64_t> words_;
  uint64_t hash_;
};

// What a plan is built from: int64 columns (uploaded, one after another, into one device tensor) and
// host-side integers the glue needs to launch (group counts, block counts; never uploaded).
struct PlanTables {
  std::vector<std::vector<int64_t>> columns;
  std::vector<int64_t> info;
};

class LaunchPlan {
 public:
  // Uploads `tables` on `stream` (the current stream of the plan's device).
  LaunchPlan(PlanTables tables, const at::Device& device, const c10::cuda::CUDAStream& stream);
  ~LaunchPlan();
  LaunchPlan(const LaunchPlan&) = delete;
  LaunchPlan& operator=(const LaunchPlan&) = delete;
  // Makes the plan safe to read from `stream` when it is not the stream that uploaded it: `stream` waits
  // (on the device, no host wait) for the upload, and the caching allocator is told that `stream` uses the
  // table, so that its memory is not reused before that stream's launches ran. Skipped while `stream` is
  // capturing a CUDA graph (a plan used in a graph should be built before the capture, by a warm-up step
  // on the capturing stream, as torch.cuda.graphs recommends).
  void use_on(const c10::cuda::CUDAStream& stream) const;
  // device address of column c (valid while the plan is alive: hold the shared_ptr across the launches)
  const int64_t* column(size_t c) const { return starts_[c]; }
  size_t num_columns() const { return starts_.size(); }
  const std::vector<int64_t>& info() const { return info_; }

 private:
  at::Tensor host_;    // pinned; kept so that a copy captured in a CUDA graph still reads valid memory
  at::Tensor device_;  // int64, every column
  c10::cuda::CUDAStream stream_;      // the stream that uploaded the table
  cudaEvent_t ready_ = nullptr;       // recorded on stream_ after the upload (null if built while capturing)
  std::vector<const int64_t*> starts_;
  std::vector<int64_t> info_;
};

// The cached plan of `key`, or the plan `build()` describes (uploaded and cached: a small LRU of
// kPlanCacheSize entries, shared by every op and device; thread-safe), ready to be read by launches on the
// current stream of the key's device.
std::shared_ptr<const LaunchPlan> launch_plan(const PlanKey& key, const std::function<PlanTables()>& build);

constexpr size_t kPlanCacheSize = 16;

struct PlanCacheStats {
  int64_t hits, misses, entries;
};
PlanCacheStats plan_cache_stats();

}  // namespace stabkernels::cuda
#endif  // STABKERNELS_WITH_CUDA
