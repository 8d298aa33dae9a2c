"""Triton kernels of the logit-spread family."""
import torch
import triton
import triton.language as tl

from .._checks import acc_dtype
from ._common import tl_acc


@triton.jit
def _row_spread_kernel(x_ptr, out_ptr, N, C, stride_n, stride_c,
                       ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # A block of rows per program; sweep the columns once, keeping running extremes per row. NaN is
    # tracked separately: tl.max/tl.min on a GPU drop NaN, torch.amax propagates it.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    hi = tl.full([BLOCK_N], float("-inf"), ACC)
    lo = tl.full([BLOCK_N], float("inf"), ACC)
    nan = tl.zeros([BLOCK_N], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        m = row_ok[:, None] & (cols[None, :] < C)
        v = tl.load(x_ptr + rows[:, None] * stride_n + cols[None, :] * stride_c, mask=m, other=0.0).to(ACC)
        hi = tl.maximum(hi, tl.max(tl.where(m, v, float("-inf")), axis=1))
        lo = tl.minimum(lo, tl.min(tl.where(m, v, float("inf")), axis=1))
        nan = nan | tl.max((v != v).to(tl.int32), axis=1)
    spread = tl.where(nan != 0, float("nan"), hi - lo)
    tl.store(out_ptr + rows, spread, mask=row_ok)


def row_spread(x: torch.Tensor, block_n: int = 16, block_c: int = 128) -> torch.Tensor:
    N, C = x.shape
    out = torch.empty(N, device=x.device, dtype=acc_dtype(x.dtype))
    if N == 0:
        return out
    block_c = min(block_c, triton.next_power_of_2(C))
    grid = (triton.cdiv(N, block_n),)
    _row_spread_kernel[grid](x, out, N, C, x.stride(0), x.stride(1),
                             ACC=tl_acc(x.dtype), BLOCK_N=block_n, BLOCK_C=block_c)
    return out
