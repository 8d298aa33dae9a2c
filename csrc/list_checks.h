// Validation of a fused update's tensor lists, done by the kernels themselves (CPU and CUDA) before they
// touch any memory, so that the Python wrappers need not walk every list in Python on every step. The
// wrappers re-check in Python when a kernel raises, to word the error (stabkernels/update.py).
// Compiled with the baseline flags (csrc/list_checks.cpp); the per-ISA kernels call it.
#pragma once
#include <ATen/core/Tensor.h>

#include <initializer_list>

namespace stabkernels {

// The math dtype of a storage dtype (SPEC 6): float64 for float64, float32 otherwise.
at::ScalarType acc_of(at::ScalarType t);

// One list that must match params tensor by tensor. `acc`: in the math dtype of each parameter (float64 for
// float64, float32 otherwise) rather than in the parameter's own dtype; `required` false: an empty list means
// the list is not given (an optional output, a buffer the options do not use).
struct MatchingList {
  const char* name;
  at::TensorList tensors;
  bool acc = false;
  bool required = true;
};

// params: non-empty, dense, contiguous float tensors on one device of type `device_type`; every list: one
// tensor per parameter, of its shape, of the wanted dtype, contiguous, on that device. Throws ValueError.
void check_update_lists(const char* op, at::TensorList params, std::initializer_list<MatchingList> lists,
                        c10::DeviceType device_type);

}  // namespace stabkernels
