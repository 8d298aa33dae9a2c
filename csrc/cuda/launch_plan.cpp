// Launch plans (see launch_plan.h): the one module of the CUDA glue that uploads host data to the device.
#ifdef STABKERNELS_WITH_CUDA
#include "launch_plan.h"

#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstring>
#include <list>
#include <mutex>
#include <string_view>

namespace stabkernels::cuda {
namespace {

// splitmix64's finaliser: a cheap, well-mixed hash step per word.
uint64_t mix(uint64_t h, uint64_t w) {
  uint64_t z = h ^ (w + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2));
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct Entry {
  PlanKey key;
  std::shared_ptr<const LaunchPlan> plan;
};

struct Cache {
  std::mutex mutex;
  std::list<Entry> entries;  // most recently used first
  int64_t hits = 0, misses = 0;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: plans may outlive static destruction order
  return *c;
}

}  // namespace

PlanKey::PlanKey(const char* kind, const at::Device& device) : hash_(0) {
  add(static_cast<int64_t>(std::hash<std::string_view>{}(kind)));
  add(static_cast<int64_t>(device.type()));
  add(device.index());
}

PlanKey& PlanKey::add(int64_t word) {
  words_.push_back(word);
  hash_ = mix(hash_, static_cast<uint64_t>(word));
  return *this;
}

PlanKey& PlanKey::add_tensor(const at::Tensor& t) {
  if (!t.defined()) return add(-1);
  add(reinterpret_cast<int64_t>(t.const_data_ptr()));
  add(static_cast<int64_t>(t.scalar_type()));
  add(t.dim());
  for (int64_t d = 0; d < t.dim(); ++d) add(t.size(d)).add(t.stride(d));
  return *this;
}

PlanKey& PlanKey::add_flat(const at::Tensor& t) {
  if (!t.defined()) return add(-1);
  return add(reinterpret_cast<int64_t>(t.const_data_ptr())).add(static_cast<int64_t>(t.scalar_type())).add(t.numel());
}

PlanKey& PlanKey::add_list(at::TensorList ts, bool flat) {
  add(static_cast<int64_t>(ts.size()));
  for (const auto& t : ts) flat ? add_flat(t) : add_tensor(t);
  return *this;
}

namespace {

bool capturing(const c10::cuda::CUDAStream& stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(stream.stream(), &status) == cudaSuccess && status != cudaStreamCaptureStatusNone;
}

}  // namespace

LaunchPlan::LaunchPlan(PlanTables tables, const at::Device& device, const c10::cuda::CUDAStream& stream)
    : stream_(stream), info_(std::move(tables.info)) {
  int64_t total = 0;
  for (const auto& c : tables.columns) total += static_cast<int64_t>(c.size());
  host_ = at::empty({std::max<int64_t>(total, 1)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* p = host_.mutable_data_ptr<int64_t>();
  std::vector<int64_t> offsets;
  for (const auto& c : tables.columns) {
    offsets.push_back(p - host_.mutable_data_ptr<int64_t>());
    p = std::copy(c.begin(), c.end(), p);
  }
  // One asynchronous copy from pinned memory on the current stream: ordered before the launches that follow
  // on that stream; the host buffer stays alive with the plan.
  device_ = at::empty({host_.numel()}, at::TensorOptions().dtype(at::kLong).device(device));
  device_.copy_(host_, /*non_blocking=*/true);
  for (int64_t off : offsets) starts_.push_back(device_.const_data_ptr<int64_t>() + off);
  if (!capturing(stream_) && cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming) == cudaSuccess &&
      cudaEventRecord(ready_, stream_.stream()) != cudaSuccess) {
    cudaEventDestroy(ready_);
    ready_ = nullptr;
  }
}

LaunchPlan::~LaunchPlan() {
  if (ready_ != nullptr) cudaEventDestroy(ready_);
}

void LaunchPlan::use_on(const c10::cuda::CUDAStream& stream) const {
  if (stream == stream_ || capturing(stream)) return;
  if (ready_ != nullptr) cudaStreamWaitEvent(stream.stream(), ready_, 0);
  device_.record_stream(stream);
}

std::shared_ptr<const LaunchPlan> launch_plan(const PlanKey& key, const std::function<PlanTables()>& build) {
  Cache& c = cache();
  const at::Device device(static_cast<at::DeviceType>(key.words()[1]), static_cast<at::DeviceIndex>(key.words()[2]));
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  {
    std::shared_ptr<const LaunchPlan> hit;
    {
      std::lock_guard<std::mutex> lock(c.mutex);
      for (auto it = c.entries.begin(); it != c.entries.end(); ++it) {
        if (it->key == key) {
          c.entries.splice(c.entries.begin(), c.entries, it);
          ++c.hits;
          hit = c.entries.front().plan;
          break;
        }
      }
    }
    if (hit) {
      hit->use_on(stream);
      return hit;
    }
  }
  // Built outside the lock (host work proportional to the number of tensors, plus the upload).
  auto plan = std::make_shared<const LaunchPlan>(build(), device, stream);
  std::lock_guard<std::mutex> lock(c.mutex);
  ++c.misses;
  c.entries.push_front(Entry{key, plan});
  if (c.entries.size() > kPlanCacheSize) c.entries.pop_back();
  return plan;
}

PlanCacheStats plan_cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return {c.hits, c.misses, static_cast<int64_t>(c.entries.size())};
}

}  // namespace stabkernels::cuda
#endif  // STABKERNELS_WITH_CUDA
