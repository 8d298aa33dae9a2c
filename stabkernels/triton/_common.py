"""Small helpers shared by the Triton kernel modules."""
import torch
import triton
import triton.language as tl

ACC_DTYPE = {torch.float64: tl.float64}


def tl_acc(dtype: torch.dtype):
    """Triton math dtype for a storage dtype: fp64 for fp64, fp32 otherwise."""
    return ACC_DTYPE.get(dtype, tl.float32)

TL_STORAGE = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
              torch.bfloat16: tl.bfloat16}


def pointer_table(tensors, device) -> torch.Tensor:
    """int64 data pointers of ``tensors``, for kernels that walk a list of tensors in one launch (cast back
    in the kernel with ``.to(tl.pointer_type(...))``)."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


def int_table(values, device) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64, device=device)


def group_by_dtype(tensors):
    """{dtype: [indices]} preserving order: one launch per storage dtype."""
    groups = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return groups


@triton.jit
def chunk_range(chunk_tensor, chunk_start, numels):
    """(tensor index, first element, tensor size) of this program's chunk in a grouped launch."""
    c = tl.program_id(0)
    i = tl.load(chunk_tensor + c)
    return i, tl.load(chunk_start + c), tl.load(numels + i)
