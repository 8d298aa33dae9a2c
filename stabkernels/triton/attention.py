"""Triton kernels of the attention family (SPEC 8)."""
import torch
import triton
import triton.language as tl

from .._checks import acc_dtype
from .. import _launch_plan as plan
from ._common import tl_acc


@triton.jit
def _qk_max_logits_kernel(q_ptr, k_ptr, part_ptr, H, T, Tk, D, GROUP, num_m,
                          sqb, sqh, sqt, sqd, skb, skh, skt, skd,
                          CAUSAL: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (query block, batch * head): sweep the keys (up to the diagonal when causal) in BLOCK_N
    # tiles, each a tl.dot over D in BLOCK_D chunks (IEEE fp32, no TF32: results match the reference), folded at
    # once into a running maximum; the scores never exist. Each program writes one partial (no atomics): the
    # wrapper takes the maximum over a head's partials (max is order-independent, so the bits are fixed).
    mb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    rows = mb.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < T
    q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    best = tl.full([BLOCK_M], float("-inf"), ACC)
    nan = tl.zeros([BLOCK_M], tl.int32)
    if CAUSAL:
        end = tl.minimum((mb + 1) * BLOCK_M, Tk)
    else:
        end = Tk
    for n0 in range(0, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < Tk
        acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            dmask = ds < D
            a = tl.load(q_base + rows[:, None] * sqt + ds[None, :] * sqd, mask=rmask[:, None] & dmask[None, :],
                        other=0.0).to(ACC)
            kt = tl.load(k_base + cols[None, :] * skt + ds[:, None] * skd, mask=cmask[None, :] & dmask[:, None],
                         other=0.0).to(ACC)
            acc += tl.dot(a, kt, input_precision="ieee", out_dtype=ACC)
        valid = rmask[:, None] & cmask[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        best = tl.maximum(best, tl.max(tl.where(valid, acc, float("-inf")), axis=1))
        # tl.max drops NaN on a GPU; torch.amax (the reference) propagates it: track it apart
        nan = nan | tl.max((valid & (acc != acc)).to(tl.int32), axis=1)
    m = tl.max(best, axis=0)
    has_nan = tl.max(nan, axis=0)
    tl.store(part_ptr + bh.to(tl.int64) * num_m + mb, tl.where(has_nan != 0, float("nan"), m))


def qk_max_logits(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool,
                  block_m: int = 32, block_n: int = 32, block_d: int = 16) -> torch.Tensor:
    B, H, T, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    acc = acc_dtype(q.dtype)
    if B * H == 0 or T == 0 or Tk == 0:
        return torch.full((B, H), float("-inf"), dtype=acc, device=q.device)
    block_d = max(16, min(block_d, triton.next_power_of_2(D)))  # tl.dot needs every dimension >= 16
    num_m = triton.cdiv(T, block_m)
    part = torch.empty((B * H, num_m), dtype=acc, device=q.device)
    with plan.device_guard(q.device):
        _qk_max_logits_kernel[(num_m, B * H)](
            q, k, part, H, T, Tk, D, H // Hk, num_m, *q.stride(), *k.stride(),
            CAUSAL=bool(causal), ACC=tl_acc(q.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    # the scale after the maximum (rounding is monotonic: max(scale * s) == scale * max(s) for scale > 0);
    # amax propagates a program's NaN
    return (part.amax(dim=1) * scale).view(B, H)
