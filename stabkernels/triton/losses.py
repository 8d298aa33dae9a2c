"""Triton kernels of the fused losses: one program per row, three sweeps over the row (max, sum, gradient;
the second and third read it from cache), math in float32 (float64 for float64)."""
import torch
import triton
import triton.language as tl

from .._checks import acc_dtype
from ._common import tl_acc


@triton.jit
def _zero_row(g, V, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """The gradient row of an ignored target: zeros."""
    for c0 in range(0, V, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        tl.store(g + cols, tl.zeros([BLOCK], ACC).to(g.dtype.element_ty), mask=cols < V)


@triton.jit
def _row(z_ptr, y_ptr, g_ptr, stride_z, stride_g):
    """This program's row: its index, target, and logits and gradient row pointers."""
    row = tl.program_id(0).to(tl.int64)
    return row, tl.load(y_ptr + row), z_ptr + row * stride_z, g_ptr + row * stride_g


@triton.jit
def _ce_z_kernel(z_ptr, y_ptr, g_ptr, scale_ptr, ce_ptr, zl_ptr, V, stride_z, stride_g, coef_ptr, ignore_index,
                 ACC: tl.constexpr, WITH_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row, y, z, g = _row(z_ptr, y_ptr, g_ptr, stride_z, stride_g)
    if y == ignore_index:
        if WITH_GRAD:
            _zero_row(g, V, ACC, BLOCK)
    else:
        m = tl.full([BLOCK], float("-inf"), ACC)
        for c0 in range(0, V, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            m = tl.maximum(m, tl.load(z + cols, mask=cols < V, other=float("-inf")).to(ACC))
        mx = tl.max(m, axis=0)
        s = tl.zeros([BLOCK], ACC)
        for c0 in range(0, V, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            x = tl.load(z + cols, mask=cols < V, other=float("-inf")).to(ACC)
            s += tl.where(cols < V, tl.exp(x - mx), 0.0)
        lse = mx + tl.log(tl.sum(s, axis=0))
        zy = tl.load(z + y).to(ACC)
        c = tl.load(coef_ptr).to(ACC)  # from a tensor: Triton would pass a Python float as fp32
        tl.store(ce_ptr + row, lse - zy)
        tl.store(zl_ptr + row, c * lse * lse)
        if WITH_GRAD:
            scale = tl.load(scale_ptr).to(ACC)
            a = scale * (1 + 2 * c * lse)
            for c0 in range(0, V, BLOCK):
                cols = c0 + tl.arange(0, BLOCK)
                x = tl.load(z + cols, mask=cols < V, other=0.0).to(ACC)
                gr = tl.exp(x - lse) * a - tl.where(cols == y, scale, 0.0)
                tl.store(g + cols, gr.to(g.dtype.element_ty), mask=cols < V)


@triton.jit
def _stable_s(x):
    return tl.where(x >= 0, x + 1, 1 / (1 - tl.minimum(x, 0.0)))


@triton.jit
def _stable_ds(x):
    r = 1 / (1 - tl.minimum(x, 0.0))
    return tl.where(x >= 0, 1.0, r * r)


@triton.jit
def _stablemax_kernel(z_ptr, y_ptr, g_ptr, scale_ptr, loss_ptr, V, stride_z, stride_g, ignore_index,
                      ACC: tl.constexpr, WITH_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row, y, z, g = _row(z_ptr, y_ptr, g_ptr, stride_z, stride_g)
    if y == ignore_index:
        if WITH_GRAD:
            _zero_row(g, V, ACC, BLOCK)
    else:
        s = tl.zeros([BLOCK], ACC)
        for c0 in range(0, V, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            x = tl.load(z + cols, mask=cols < V, other=0.0).to(ACC)
            s += tl.where(cols < V, _stable_s(x), 0.0)
        S = tl.sum(s, axis=0)
        zy = tl.load(z + y).to(ACC)
        sy = _stable_s(zy)
        tl.store(loss_ptr + row, tl.log(S) - tl.log(sy))
        if WITH_GRAD:
            scale = tl.load(scale_ptr).to(ACC)
            inv = scale / S
            corr = scale * _stable_ds(zy) / sy
            for c0 in range(0, V, BLOCK):
                cols = c0 + tl.arange(0, BLOCK)
                x = tl.load(z + cols, mask=cols < V, other=0.0).to(ACC)
                gr = _stable_ds(x) * inv - tl.where(cols == y, corr, 0.0)
                tl.store(g + cols, gr.to(g.dtype.element_ty), mask=cols < V)


def _block(V):
    return min(1024, triton.next_power_of_2(max(V, 16)))


def cross_entropy_z_loss(logits, target, grad, grad_scale, z_coef, ignore_index):
    N, V = logits.shape
    acc = acc_dtype(logits.dtype)
    ce = torch.zeros(N, dtype=acc, device=logits.device)
    zl = torch.zeros_like(ce)
    with_grad = grad.numel() > 0
    if N:
        _ce_z_kernel[(N,)](logits, target, grad if with_grad else logits, grad_scale.to(acc).reshape(1), ce, zl, V,
                           logits.stride(0), grad.stride(0) if with_grad else 0,
                           torch.tensor([z_coef], dtype=acc, device=logits.device), ignore_index,
                           ACC=tl_acc(logits.dtype), WITH_GRAD=with_grad, BLOCK=_block(V))
    return ce, zl


def stablemax_cross_entropy(logits, target, grad, grad_scale, ignore_index):
    N, V = logits.shape
    acc = acc_dtype(logits.dtype)
    loss = torch.zeros(N, dtype=acc, device=logits.device)
    with_grad = grad.numel() > 0
    if N:
        _stablemax_kernel[(N,)](logits, target, grad if with_grad else logits, grad_scale.to(acc).reshape(1), loss, V,
                                logits.stride(0), grad.stride(0) if with_grad else 0, ignore_index,
                                ACC=tl_acc(logits.dtype), WITH_GRAD=with_grad, BLOCK=_block(V))
    return loss
