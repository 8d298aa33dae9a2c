"""Triton kernels of the logit-spread family."""
import torch
import triton
import triton.language as tl

from .._checks import acc_dtype
from .. import _launch_plan as plan
from ._common import tl_acc


@triton.jit
def _fold_extremes(hi, lo, nan, tile, valid):
    """Folds a (rows, cols) tile into running per-row max, min and NaN flag, ignoring invalid entries. NaN is
    tracked separately: tl.max/tl.min on a GPU drop NaN, torch.amax propagates it."""
    hi = tl.maximum(hi, tl.max(tl.where(valid, tile, float("-inf")), axis=1))
    lo = tl.minimum(lo, tl.min(tl.where(valid, tile, float("inf")), axis=1))
    nan = nan | tl.max((valid & (tile != tile)).to(tl.int32), axis=1)
    return hi, lo, nan


@triton.jit
def _row_spread_kernel(x_ptr, out_ptr, N, C, stride_n, stride_c,
                       ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # A block of rows per program; sweep the columns once, keeping running extremes per row.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    hi = tl.full([BLOCK_N], float("-inf"), ACC)
    lo = tl.full([BLOCK_N], float("inf"), ACC)
    nan = tl.zeros([BLOCK_N], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        m = row_ok[:, None] & (cols[None, :] < C)
        v = tl.load(x_ptr + rows[:, None] * stride_n + cols[None, :] * stride_c, mask=m, other=0.0).to(ACC)
        hi, lo, nan = _fold_extremes(hi, lo, nan, v, m)
    spread = tl.where(nan != 0, float("nan"), hi - lo)
    tl.store(out_ptr + rows, spread, mask=row_ok)


def row_spread(x: torch.Tensor, block_n: int = 16, block_c: int = 128) -> torch.Tensor:
    N, C = x.shape
    out = torch.empty(N, device=x.device, dtype=acc_dtype(x.dtype))
    if N == 0:
        return out
    block_c = min(block_c, triton.next_power_of_2(C))
    grid = (triton.cdiv(N, block_n),)
    with plan.device_guard(x.device):
        _row_spread_kernel[grid](x, out, N, C, x.stride(0), x.stride(1),
                                 ACC=tl_acc(x.dtype), BLOCK_N=block_n, BLOCK_C=block_c)
    return out


@triton.jit
def _tangent_spread_kernel(h_ptr, hd_ptr, w_ptr, wd_ptr, bd_ptr, out_ptr, N, V, D,
                           s_h, s_hd, s_w, s_wd,
                           HAS_WD: tl.constexpr, HAS_BD: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    # One block of rows; sweep the vocabulary in BLOCK_V tiles, each a tl.dot over d (IEEE fp32, no TF32,
    # so results match the reference), folded at once into running per-row extremes: z' never exists.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    hi = tl.full([BLOCK_M], float("-inf"), ACC)
    lo = tl.full([BLOCK_M], float("inf"), ACC)
    nan = tl.zeros([BLOCK_M], tl.int32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        cmask = cols < V
        acc = tl.zeros([BLOCK_M, BLOCK_V], ACC)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < D
            a = tl.load(hd_ptr + rows[:, None] * s_hd + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                        other=0.0).to(ACC)
            b = tl.load(w_ptr + cols[None, :] * s_w + ks[:, None], mask=cmask[None, :] & kmask[:, None],
                        other=0.0).to(ACC)
            acc += tl.dot(a, b, input_precision="ieee", out_dtype=ACC)
            if HAS_WD:
                a2 = tl.load(h_ptr + rows[:, None] * s_h + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                             other=0.0).to(ACC)
                b2 = tl.load(wd_ptr + cols[None, :] * s_wd + ks[:, None], mask=cmask[None, :] & kmask[:, None],
                             other=0.0).to(ACC)
                acc += tl.dot(a2, b2, input_precision="ieee", out_dtype=ACC)
        if HAS_BD:
            acc += tl.load(bd_ptr + cols, mask=cmask, other=0.0).to(ACC)[None, :]
        valid = rmask[:, None] & cmask[None, :]
        hi, lo, nan = _fold_extremes(hi, lo, nan, acc, valid)
    tl.store(out_ptr + rows, tl.where(nan != 0, float("nan"), hi - lo), mask=rmask)


def tangent_spread_linear(h, h_dot, weight, weight_dot, bias_dot, block_m=32, block_v=64, block_k=32):
    acc = acc_dtype(h.dtype)
    h, h_dot, weight = (t.contiguous() for t in (h, h_dot, weight))
    weight_dot = weight_dot.contiguous() if weight_dot is not None else None
    bias_dot = bias_dot.contiguous() if bias_dot is not None else None
    N, D = h.shape
    V = weight.shape[0]
    out = torch.empty(N, device=h.device, dtype=acc)
    if N == 0:
        return out
    grid = (triton.cdiv(N, block_m),)
    with plan.device_guard(h.device):
        _tangent_spread_kernel[grid](
            h, h_dot, weight, weight_dot if weight_dot is not None else weight,
            bias_dot if bias_dot is not None else weight, out, N, V, D,
            h.stride(0), h_dot.stride(0), weight.stride(0),
            weight_dot.stride(0) if weight_dot is not None else 0,
            HAS_WD=weight_dot is not None, HAS_BD=bias_dot is not None, ACC=tl_acc(h.dtype),
            BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k)
    return out
