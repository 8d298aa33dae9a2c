// Torch glue for the raw CUDA kernels: device guard, current stream, dtype mapping, output allocation.
// Compiled only when setup.py builds CUDA kernels (STABKERNELS_WITH_CUDA).
#ifdef STABKERNELS_WITH_CUDA
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernels.h"

namespace stabkernels::cuda {
namespace {

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

at::Tensor row_spread_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "row_spread: expected an (N, C>0) tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({x.size(0)}, x.options().dtype(acc));
  check(row_spread(x.const_data_ptr(), dtype_of(x), x.size(0), x.size(1), x.stride(0), x.stride(1),
                   out.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()),
        "row_spread");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(stabkernels_C, CUDA, m) {
  m.impl("row_spread", &row_spread_cuda);
}

}  // namespace stabkernels::cuda
#endif  // STABKERNELS_WITH_CUDA
