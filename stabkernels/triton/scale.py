"""grad *= s for a 0-d device tensor s, skipped on the device when s == 1: the fused losses' backward scales the
gradient they computed in the forward by the incoming gradient, which is exactly 1 for the usual
``loss.backward()``; deciding that on the host would read the device (a stall, and a graph break under
torch.compile). Each program reads s and returns at once when it is 1, so the common case moves no memory."""
import torch
import triton
import triton.language as tl

from .. import _launch_plan as plan
from ._common import tl_acc

BLOCK = 4096


@triton.jit
def _scale_kernel(x, s_ptr, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.load(s_ptr)  # in x's dtype, as torch's x.mul_(s.to(x.dtype)) rounds it
    if s != 1:
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x + idx, mask=idx < n, other=0.0)
        tl.store(x + idx, (v.to(ACC) * s.to(ACC)).to(x.dtype.element_ty), mask=idx < n)


def scale_unless_one_(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x (contiguous) *= s in place; s is a 0-d tensor on x's device, read by the kernel only."""
    n = x.numel()
    if n:
        with plan.device_guard(x.device):
            _scale_kernel[(triton.cdiv(n, BLOCK),)](x, s.to(x.dtype), n, ACC=tl_acc(x.dtype), BLOCK=BLOCK)
    return x
