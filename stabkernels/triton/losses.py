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
def _tanh(x):
    """tanh without libdevice: the odd series to x^13 below |x| = 1/16 (truncation < 2e-19 relative), and
    (1 - e) / (1 + e), e = exp(-2 |x|), above (1 - e > 0.11 there, so a few ulp)."""
    ax = tl.abs(x)
    a = tl.minimum(ax, 0.0625)
    a2 = a * a
    series = a * (1 - a2 * (1 / 3 - a2 * (2 / 15 - a2 * (17 / 315 - a2 * (62 / 2835 - a2 * (1382 / 155925 - a2 * (
        21844 / 6081075)))))))
    e = tl.exp(-2 * ax)
    t = tl.where(ax < 0.0625, series, (1 - e) / (1 + e))
    return tl.where(x < 0, -t, t)


@triton.jit
def _capped(x, cap, CAP: tl.constexpr):
    """(softcap(x) = cap tanh(x / cap), its derivative 1 - tanh^2) (SPEC 4.5); (x, 1) without a softcap."""
    if CAP:
        t = _tanh(x / cap)
        out, d = cap * t, 1 - t * t
    else:
        out, d = x, tl.full(x.shape, 1.0, x.dtype)
    return out, d


@triton.jit
def _cap(x, cap, CAP: tl.constexpr):
    """softcap(x) alone (a loop-carried name for the unused derivative would change type across the loops)."""
    out, d = _capped(x, cap, CAP)
    return out


@triton.jit
def _smoothing(par_ptr, V, ACC: tl.constexpr, SMOOTH: tl.constexpr):
    """(eps, eps / V); constant zeros without label smoothing, so that no float64 division (a called subroutine,
    whose saved registers spilled) is left in the plain kernel."""
    if SMOOTH:
        eps = tl.load(par_ptr + 1).to(ACC)
        ev = eps / V
    else:
        eps = tl.zeros([], ACC)
        ev = tl.zeros([], ACC)
    return eps, ev


@triton.jit
def _target_weight(w_ptr, wsum_ptr, y, V, ACC: tl.constexpr, HAS_W: tl.constexpr):
    """(the target's class weight, the sum of all class weights): (1, V) without weights."""
    if HAS_W:
        wy = tl.load(w_ptr + y).to(ACC)
        W = tl.load(wsum_ptr).to(ACC)
    else:
        wy = tl.full([], 1.0, ACC)
        W = wy * V
    return wy, W


@triton.jit
def _weights(w_ptr, cols, V, ACC: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    """The class weights of a block of columns (1 without weights; 0 past the row's end)."""
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cols < V, other=0.0).to(ACC)
    else:
        w = tl.where(cols < V, 1.0, 0.0).to(ACC)
    return w


@triton.jit
def _ce_z_kernel(z_ptr, y_ptr, g_ptr, scale_ptr, ce_ptr, zl_ptr, w_ptr, wsum_ptr, V, stride_z, stride_g, par_ptr,
                 ignore_index, ACC: tl.constexpr, WITH_GRAD: tl.constexpr, HAS_W: tl.constexpr,
                 SMOOTH: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr):
    row, y, z, g = _row(z_ptr, y_ptr, g_ptr, stride_z, stride_g)
    if y == ignore_index:
        if WITH_GRAD:
            _zero_row(g, V, ACC, BLOCK)
    else:
        # from a tensor: Triton would pass Python floats as fp32
        c = tl.load(par_ptr).to(ACC)
        eps, ev = _smoothing(par_ptr, V, ACC, SMOOTH)
        cap = tl.load(par_ptr + 2).to(ACC)
        m = tl.full([BLOCK], float("-inf"), ACC)
        for c0 in range(0, V, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            m = tl.maximum(m, tl.load(z + cols, mask=cols < V, other=float("-inf")).to(ACC))
        mx = _cap(tl.max(m, axis=0), cap, CAP)  # tanh is increasing: softcap of the max is the max
        s = tl.zeros([BLOCK], ACC)
        sw = tl.zeros([BLOCK], ACC)
        for c0 in range(0, V, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            x = _cap(tl.load(z + cols, mask=cols < V, other=0.0).to(ACC), cap, CAP)
            s += tl.where((cols < V) & (cols != y), tl.exp(x - mx), 0.0)
            if SMOOTH:  # sum_j w_j (m - z_j): no term negative
                sw += _weights(w_ptr, cols, V, ACC, HAS_W, BLOCK) * tl.where(cols < V, mx - x, 0.0)
        rest = tl.sum(s, axis=0)
        zy, dy = _capped(tl.load(z + y).to(ACC), cap, CAP)
        sy = tl.where(zy == mx, 1.0, tl.exp(zy - mx))
        S = sy + rest
        log_S = tl.where(zy == mx, _log1p(rest, ACC), tl.log(S))
        lse = mx + log_S
        wy, W = _target_weight(w_ptr, wsum_ptr, y, V, ACC, HAS_W)
        ce = (1 - eps) * wy * ((mx - zy) + log_S)
        if SMOOTH:
            ce += ev * (tl.sum(sw, axis=0) + W * log_S)
        tl.store(ce_ptr + row, ce)
        tl.store(zl_ptr + row, c * wy * lse * lse)
        if WITH_GRAD:
            scale = tl.load(scale_ptr).to(ACC)
            inv_s = scale / S
            a = (1 - eps) * wy + ev * W + 2 * c * wy * lse
            by = (1 - eps + ev) * wy
            gy = (sy * (a - by) - by * rest) * inv_s * dy
            pa = a * inv_s
            pe = scale * ev
            for c0 in range(0, V, BLOCK):
                cols = c0 + tl.arange(0, BLOCK)
                # -inf past the row's end: exp gives 0 there (no overflowing value to cast into the gradient's dtype)
                x, d = _capped(tl.load(z + cols, mask=cols < V, other=float("-inf")).to(ACC), cap, CAP)
                gr = tl.exp(x - mx) * pa
                if SMOOTH:
                    gr -= pe * _weights(w_ptr, cols, V, ACC, HAS_W, BLOCK)
                gr = tl.where(cols == y, gy, gr * d)
                tl.store(g + cols, gr.to(g.dtype.element_ty), mask=cols < V)


@triton.jit
def _stable_s(x):
    return tl.where(x >= 0, x + 1, 1 / (1 - tl.minimum(x, 0.0)))


@triton.jit
def _stable_ds(x):
    r = 1 / (1 - tl.minimum(x, 0.0))
    return tl.where(x >= 0, 1.0, r * r)


@triton.jit
def _stablemax_kernel(z_ptr, y_ptr, g_ptr, scale_ptr, loss_ptr, w_ptr, wsum_ptr, V, stride_z, stride_g, par_ptr,
                      ignore_index, ACC: tl.constexpr, WITH_GRAD: tl.constexpr, HAS_W: tl.constexpr,
                      SMOOTH: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr):
    row, y, z, g = _row(z_ptr, y_ptr, g_ptr, stride_z, stride_g)
    if y == ignore_index:
        if WITH_GRAD:
            _zero_row(g, V, ACC, BLOCK)
    else:
        eps, ev = _smoothing(par_ptr, V, ACC, SMOOTH)
        cap = tl.load(par_ptr + 2).to(ACC)
        s = tl.zeros([BLOCK], ACC)
        sl = tl.zeros([BLOCK], ACC)
        for c0 in range(0, V, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            x = _cap(tl.load(z + cols, mask=cols < V, other=0.0).to(ACC), cap, CAP)
            s += tl.where((cols < V) & (cols != y), _stable_s(x), 0.0)
            if SMOOTH:  # sum_j w_j log s(z_j), log s(x) = sign(x) log1p(|x|)
                ls = _log1p(tl.abs(x), ACC)
                sl += _weights(w_ptr, cols, V, ACC, HAS_W, BLOCK) * tl.where(x < 0, -ls, ls)
        rest = tl.sum(s, axis=0)
        zy, dy = _capped(tl.load(z + y).to(ACC), cap, CAP)
        sy = _stable_s(zy)
        S = sy + rest
        r = rest / sy
        wy, W = _target_weight(w_ptr, wsum_ptr, y, V, ACC, HAS_W)
        # where r overflows, rest > sy (the maximum only keeps log(0) out of the branch not taken when rest = 0)
        loss = (1 - eps) * wy * tl.where(r == float("inf"), tl.log(tl.maximum(rest, sy)) - tl.log(sy), _log1p(r, ACC))
        if SMOOTH:
            loss += ev * (W * tl.log(S) - tl.sum(sl, axis=0))
        tl.store(loss_ptr + row, loss)
        if WITH_GRAD:
            scale = tl.load(scale_ptr).to(ACC)
            inv_s = scale / S
            a = (1 - eps) * wy + ev * W
            by = (1 - eps + ev) * wy
            gy = _stable_ds(zy) * ((sy * (a - by) - by * rest) / sy) * inv_s * dy
            pa = a * inv_s
            pe = scale * ev
            for c0 in range(0, V, BLOCK):
                cols = c0 + tl.arange(0, BLOCK)
                x, d = _capped(tl.load(z + cols, mask=cols < V, other=0.0).to(ACC), cap, CAP)
                ds = _stable_ds(x)
                gr = ds * pa
                if SMOOTH:
                    gr -= pe * _weights(w_ptr, cols, V, ACC, HAS_W, BLOCK) * ds / _stable_s(x)
                gr = tl.where(cols == y, gy, gr * d)
                tl.store(g + cols, gr.to(g.dtype.element_ty), mask=cols < V)


def _block(V):
    return min(1024, triton.next_power_of_2(max(V, 16)))


def _launch(kernel, logits, target, grad, grad_scale, outs, z_coef, ignore_index, class_weight, label_smoothing,
            softcap):
    """One program per row; the scalars (z_coef, label smoothing, softcap) from a cached device tensor, the class
    weights' sum computed on the device (no host read)."""
    N, V = logits.shape
    acc = acc_dtype(logits.dtype)
    with_grad = grad.numel() > 0
    has_w = class_weight is not None
    w = class_weight.to(acc).contiguous() if has_w else logits
    wsum = w.sum().reshape(1) if has_w else logits
    with plan.device_guard(logits.device):
        kernel[(N,)](logits, target, grad if with_grad else logits, grad_scale.to(acc).reshape(1), *outs, w, wsum,
                     V, logits.stride(0), grad.stride(0) if with_grad else 0,
                     plan.constants((z_coef, label_smoothing, softcap), logits.device, acc), ignore_index,
                     ACC=tl_acc(logits.dtype), WITH_GRAD=with_grad, HAS_W=has_w, SMOOTH=label_smoothing > 0,
                     CAP=softcap > 0, BLOCK=_block(V))


def cross_entropy_z_loss(logits, target, grad, grad_scale, z_coef, ignore_index, class_weight, label_smoothing,
                         softcap):
    acc = acc_dtype(logits.dtype)
    ce = torch.zeros(logits.shape[0], dtype=acc, device=logits.device)
    zl = torch.zeros_like(ce)
    if logits.shape[0]:
        _launch(_ce_z_kernel, logits, target, grad, grad_scale, (ce, zl), z_coef, ignore_index, class_weight,
                label_smoothing, softcap)
    return ce, zl


def stablemax_cross_entropy(logits, target, grad, grad_scale, ignore_index, class_weight, label_smoothing, softcap):
    loss = torch.zeros(logits.shape[0], dtype=acc_dtype(logits.dtype), device=logits.device)
    if logits.shape[0]:
        _launch(_stablemax_kernel, logits, target, grad, grad_scale, (loss,), 0.0, ignore_index, class_weight,
                label_smoothing, softcap)
    return loss
