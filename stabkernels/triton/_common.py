"""Small helpers shared by the Triton kernel modules."""
import triton.language as tl
import torch

ACC_DTYPE = {torch.float64: tl.float64}


def tl_acc(dtype: torch.dtype):
    """Triton math dtype for a storage dtype: fp64 for fp64, fp32 otherwise."""
    return ACC_DTYPE.get(dtype, tl.float32)
