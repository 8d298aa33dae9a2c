"""Triton kernels of the fused losses: one program per row, three sweeps over the row (max, sum, gradient;
the second and third read it from cache), math in float32 (float64 for float64). The sums leave the target's
column out (S_rest), so that neither the loss nor the target's gradient cancels when the target dominates
(stabkernels/losses.py has the formulas)."""
import torch
import triton
import triton.language as tl

from .. import _launch_plan as plan
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
def _log1p(x, ACC: tl.constexpr):
    """log(1 + x) for x >= 0, accurate for small x too, without libdevice (the interpreter has none). float32:
    the series to x^7 below 1/16 (truncation < x^7 / 8 < 5e-10 relative), log(1 + x) above (1 + x loses
    < 1e-6), so it rests on no accuracy of log near 1; float64: log(u) x / (u - 1), u = 1 + x (Goldberg)."""
    if ACC == tl.float64:
        u = 1 + x
        d = u - 1
        out = tl.where(d == 0, x, tl.log(u) * (x / tl.where(d == 0, 1.0, d)))
    else:
        t = tl.minimum(x, 0.0625)
        series = t * (1 - t * (1 / 2 - t * (1 / 3 - t * (1 / 4 - t * (1 / 5 - t * (1 / 6 - t * (1 / 7)))))))
        out = tl.where(x < 0.0625, series, tl.log(1 + x))
    return out


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
            s += tl.where((cols < V) & (cols != y), tl.exp(x - mx), 0.0)
        rest = tl.sum(s, axis=0)
        zy = tl.load(z + y).to(ACC)
        sy = tl.where(zy == mx, 1.0, tl.exp(zy - mx))
        S = sy + rest
        log_S = tl.where(zy == mx, _log1p(rest, ACC), tl.log(S))
        lse = mx + log_S
        c = tl.load(coef_ptr).to(ACC)  # from a tensor: Triton would pass a Python float as fp32
        tl.store(ce_ptr + row, (mx - zy) + log_S)
        tl.store(zl_ptr + row, c * lse * lse)
        if WITH_GRAD:
            scale = tl.load(scale_ptr).to(ACC)
            a = scale * (1 + 2 * c * lse) / S
            gy = scale * (2 * c * lse * sy - rest) / S
            for c0 in range(0, V, BLOCK):
                cols = c0 + tl.arange(0, BLOCK)
                x = tl.load(z + cols, mask=cols < V, other=float("-inf")).to(ACC)  # 0 past the row's end
                gr = tl.where(cols == y, gy, tl.exp(x - mx) * a)
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
            s += tl.where((cols < V) & (cols != y), _stable_s(x), 0.0)
        rest = tl.sum(s, axis=0)
        zy = tl.load(z + y).to(ACC)
        sy = _stable_s(zy)
        S = sy + rest
        r = rest / sy
        # where r overflows, rest > sy (the maximum only keeps log(0) out of the branch not taken when rest = 0)
        tl.store(loss_ptr + row, tl.where(r == float("inf"), tl.log(tl.maximum(rest, sy)) - tl.log(sy), _log1p(r, ACC)))
        if WITH_GRAD:
            scale = tl.load(scale_ptr).to(ACC)
            inv = scale / S
            gy = -scale * (_stable_ds(zy) / sy) * (rest / S)
            for c0 in range(0, V, BLOCK):
                cols = c0 + tl.arange(0, BLOCK)
                x = tl.load(z + cols, mask=cols < V, other=0.0).to(ACC)
                gr = tl.where(cols == y, gy, _stable_ds(x) * inv)
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
        with plan.device_guard(logits.device):  # z_coef from a cached device tensor: Triton passes floats as fp32
            _ce_z_kernel[(N,)](logits, target, grad if with_grad else logits, grad_scale.to(acc).reshape(1), ce, zl,
                               V, logits.stride(0), grad.stride(0) if with_grad else 0,
                               plan.constants((z_coef,), logits.device, acc), ignore_index, ACC=tl_acc(logits.dtype),
                               WITH_GRAD=with_grad, BLOCK=_block(V))
    return ce, zl


def stablemax_cross_entropy(logits, target, grad, grad_scale, ignore_index):
    N, V = logits.shape
    acc = acc_dtype(logits.dtype)
    loss = torch.zeros(N, dtype=acc, device=logits.device)
    with_grad = grad.numel() > 0
    if N:
        with plan.device_guard(logits.device):
            _stablemax_kernel[(N,)](logits, target, grad if with_grad else logits, grad_scale.to(acc).reshape(1),
                                    loss, V, logits.stride(0), grad.stride(0) if with_grad else 0, ignore_index,
                                    ACC=tl_acc(logits.dtype), WITH_GRAD=with_grad, BLOCK=_block(V))
    return loss
