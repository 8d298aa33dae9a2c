#include "list_checks.h"

#include <c10/util/Exception.h>

namespace stabkernels {
namespace {

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

at::ScalarType acc_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_update_lists(const char* op, at::TensorList params, std::initializer_list<MatchingList> lists,
                        c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(!params.empty(), op, ": params is empty");
  const at::Device device = params[0].device();
  TORCH_CHECK_VALUE(device.type() == device_type, op, ": params must be ", c10::DeviceTypeName(device_type, true),
                    " tensors for this kernel, got one on ", device);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(p.layout() == at::kStrided && is_float(p.scalar_type()), op, ": params[", i,
                      "] must be a dense float32, float64, float16 or bfloat16 tensor, got ", p.toString());
    TORCH_CHECK_VALUE(p.device() == device, op, ": params must all be on one device, got ", device, " and ",
                      p.device());
    TORCH_CHECK_VALUE(p.is_contiguous(), op, ": params[", i, "] must be contiguous");
  }
  for (const MatchingList& l : lists) {
    if (!l.required && l.tensors.empty()) continue;
    TORCH_CHECK_VALUE(l.tensors.size() == params.size(), op, ": ", l.name, " has ", l.tensors.size(),
                      " tensors for ", params.size(), " params");
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor& t = l.tensors[i];
      const at::Tensor& p = params[i];
      TORCH_CHECK_VALUE(t.defined() && t.sizes() == p.sizes(), op, ": ", l.name, "[", i,
                        "] must have the shape of params[", i, "] ", p.sizes(), ", got ",
                        t.defined() ? c10::str(t.sizes()) : "an undefined tensor");
      const at::ScalarType want = l.acc ? acc_of(p.scalar_type()) : p.scalar_type();
      TORCH_CHECK_VALUE(t.layout() == at::kStrided && t.scalar_type() == want && t.device() == device &&
                            t.is_contiguous(),
                        op, ": ", l.name, "[", i, "] must be a contiguous ", want, " tensor on ", device, ", got ",
                        t.toString(), " on ", t.device(), t.is_contiguous() ? "" : " (non-contiguous)");
    }
  }
}

}  // namespace stabkernels
