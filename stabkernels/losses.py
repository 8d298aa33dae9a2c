"""Fused losses (SPEC 4): softmax cross-entropy with z-loss, and StableMax cross-entropy.

Both compute the loss and its gradient with respect to the logits in the forward call, reading the
logits once from memory (row by row: the remaining passes over a row hit the cache), and store no (N, V)
softmax: the only (N, V) buffer is the gradient itself, which with ``inplace_backward=True`` is the logits'
own storage (the logits are overwritten, as in Liger-Kernel's fused cross-entropy). Backward then only
scales that buffer by the incoming gradient (nothing at all for the usual ``loss.backward()``) and hands it
over, so backward runs once per forward.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import backend as _backend
from ._checks import acc_dtype, check_float_tensor
from ._library import define_op

REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------------
# ops


def _rows_fake(logits, *args):
    return logits.new_empty(logits.shape[0], dtype=acc_dtype(logits.dtype))


_ce_z_op = define_op(
    "cross_entropy_z_loss",
    "(Tensor logits, Tensor target, Tensor(a!) grad, Tensor grad_scale, float z_coef, int ignore_index, "
    "str backend) -> (Tensor, Tensor)",
    lambda logits, *a: (_rows_fake(logits), _rows_fake(logits)))


def _valid_targets(target: Tensor, classes: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(rows that count, targets with ignored rows set to class 0); out-of-range targets raise."""
    valid = target != ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    if bool(((y < 0) | (y >= classes)).any()):
        raise IndexError(f"target out of range [0, {classes})")
    return valid, y


def _split_target(t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(t_y, sum over j != y of t_j) per row: the target's term and the rest, summed apart from it."""
    rest = t.scatter(1, y[:, None], 0).sum(1)
    return t.gather(1, y[:, None])[:, 0], rest


@_backend.register("cross_entropy_z_loss", "torch")
def cross_entropy_z_loss_reference(logits, target, grad, grad_scale, z_coef, ignore_index):
    """Reference: per-row softmax cross-entropy lse - z_y and z-loss c lse^2 (0 on ignored rows); the
    gradient scale * (softmax (1 + 2 c lse) - onehot) into ``grad`` unless it is empty.

    Without softmax collapse: with m = max z, s_y = exp(z_y - m) and S_rest = sum_{j != y} exp(z_j - m) summed
    apart from s_y, log S = log(s_y + S_rest) is log1p(S_rest) where the target holds the maximum (s_y = 1),
    so ce = (m - z_y) + log S keeps the S_rest of a dominant target (below float32's epsilon against 1) instead
    of rounding to 0 (elsewhere ce >= log 2); and the target's gradient p_y (1 + 2 c lse) - 1 is written
    (2 c lse s_y - S_rest) / S, which does not cancel to 0 when p_y rounds to 1."""
    A = acc_dtype(logits.dtype)
    z = logits.to(A)
    valid, y = _valid_targets(target, z.shape[1], ignore_index)
    m = z.amax(1)
    e = torch.exp(z - m[:, None])
    s_y, rest = _split_target(e, y)
    zy = z.gather(1, y[:, None])[:, 0]
    S = s_y + rest
    log_S = torch.where(zy == m, torch.log1p(rest), torch.log(S))
    lse = m + log_S
    zero = torch.zeros_like(lse)
    ce = torch.where(valid, (m - zy) + log_S, zero)
    zl = torch.where(valid, z_coef * lse * lse, zero)
    if grad.numel():
        g = e * ((1 + 2 * z_coef * lse) / S)[:, None]
        g.scatter_(1, y[:, None], ((2 * z_coef * lse * s_y - rest) / S)[:, None])
        grad.copy_(torch.where(valid[:, None], g * grad_scale.to(A), torch.zeros_like(g)))
    return ce, zl


_stablemax_op = define_op(
    "stablemax_cross_entropy",
    "(Tensor logits, Tensor target, Tensor(a!) grad, Tensor grad_scale, int ignore_index, str backend) -> Tensor",
    _rows_fake)


def stablemax_s(x: Tensor) -> Tensor:
    """s(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0 (SPEC 4)."""
    return torch.where(x >= 0, x + 1, 1 / (1 - x.clamp_max(0)))


def stablemax_ds(x: Tensor) -> Tensor:
    """s'(x) = 1 for x >= 0, 1 / (1 - x)^2 for x < 0."""
    return torch.where(x >= 0, torch.ones_like(x), 1 / (1 - x.clamp_max(0)) ** 2)


@_backend.register("stablemax_cross_entropy", "torch")
def stablemax_cross_entropy_reference(logits, target, grad, grad_scale, ignore_index):
    """Reference: loss = log S - log s(z_y), S = sum_j s(z_j); the gradient
    scale * (s'(z_j) / S - [j = y] s'(z_y) / s(z_y)) into ``grad`` unless it is empty (the tests check it
    against autograd of the plain formula).

    Without softmax collapse: with s_y = s(z_y) and S_rest = sum_{j != y} s(z_j) summed apart from it, the loss is
    log1p(S_rest / s_y) (log S_rest - log s_y where that ratio overflows) and the target's gradient
    -(s'(z_y) / s_y) (S_rest / S): neither cancels to 0 when p_y rounds to 1."""
    A = acc_dtype(logits.dtype)
    z = logits.to(A)
    valid, y = _valid_targets(target, z.shape[1], ignore_index)
    s = stablemax_s(z)
    s_y, rest = _split_target(s, y)
    S = s_y + rest
    r = rest / s_y
    rows = torch.where(r.isinf(), torch.log(rest) - torch.log(s_y), torch.log1p(r))
    rows = torch.where(valid, rows, torch.zeros_like(S))
    if grad.numel():
        zy = z.gather(1, y[:, None])[:, 0]
        g = stablemax_ds(z) / S[:, None]
        g.scatter_(1, y[:, None], (-(stablemax_ds(zy) / s_y) * (rest / S))[:, None])
        grad.copy_(torch.where(valid[:, None], g * grad_scale.to(A), torch.zeros_like(g)))
    return rows


for _op in ("cross_entropy_z_loss", "stablemax_cross_entropy"):
    _backend.register_kernels(_op, "losses")


# --------------------------------------------------------------------------------------------------
# autograd


class _FusedLoss(torch.autograd.Function):
    """Runs a fused loss op; its gradient, computed in the forward, is returned by backward after scaling."""

    @staticmethod
    def forward(ctx, logits, target, kind, z_coef, reduction, ignore_index, inplace, backend):
        V = logits.shape[-1]
        x = logits.detach().reshape(-1, V)
        if x.stride(-1) != 1:
            x = x.contiguous()
        t = target.reshape(-1)
        valid = t != ignore_index
        n_valid = valid.sum()
        A = acc_dtype(logits.dtype)
        # the mean's 1 / rows, in the math dtype (an int tensor divided by a float would round it to float32)
        scale = 1.0 / n_valid.clamp_min(1).to(A) if reduction == "mean" else torch.ones((), dtype=A, device=x.device)
        needs_grad = ctx.needs_input_grad[0]
        if not needs_grad:
            grad = x.new_empty(0)
        elif inplace and x.data_ptr() == logits.data_ptr():
            grad = x  # the logits' own storage
        else:
            grad = torch.empty_like(x)
        b = _backend.resolve(kind, backend, x.device)
        if b in ("triton", "cuda"):  # the CPU kernels check themselves; here a device-side assert, no host read
            torch._assert_async(~(((t < 0) | (t >= V)) & valid).any(), f"target out of range [0, {V})")
        if kind == "cross_entropy_z_loss":
            ce, zl = _ce_z_op(x, t, grad, scale, z_coef, ignore_index, b)
            rows = ce + zl
        else:
            rows = _stablemax_op(x, t, grad, scale, ignore_index, b)
            zl = torch.zeros_like(rows)
        if reduction == "mean":
            loss, z = rows.sum() / n_valid.to(A), zl.sum() / n_valid.to(A)
        elif reduction == "sum":
            loss, z = rows.sum(), zl.sum()
        else:
            loss, z = rows.reshape(target.shape), zl.reshape(target.shape)
        ctx.mark_non_differentiable(z)
        # The gradient is an intermediate, kept on ctx (not save_for_backward) so that backward can drop this
        # reference and hand autograd the only one: AccumulateGrad then adopts the buffer instead of copying
        # it. The inputs are saved too (free: they exist anyway), so that a second backward (retain_graph,
        # gradcheck) can recompute the gradient.
        ctx.grad = grad
        ctx.save_for_backward(logits, target)
        ctx.args = (kind, z_coef, reduction, ignore_index, backend)
        ctx.shape, ctx.inplace = logits.shape, inplace and grad is x
        ctx.gpu_backend = b in ("triton", "cuda") and grad.numel() > 0
        return loss, z

    @staticmethod
    def backward(ctx, grad_loss, grad_z):
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # a second backward over the same graph: recompute
            if ctx.inplace:
                raise RuntimeError("with inplace_backward=True the logits hold the gradient, so backward can run "
                                   "only once")
            logits, target = ctx.saved_tensors
            kind, z_coef, reduction, ignore_index, backend = ctx.args
            with torch.enable_grad():
                x = logits.detach().requires_grad_()
                loss, _ = _FusedLoss.apply(x, target, kind, z_coef, reduction, ignore_index, False, backend)
            (g,) = torch.autograd.grad(loss, x, grad_loss)
            return g, None, None, None, None, None, None, None
        if ctx.args[2] == "none":
            grad = grad * grad_loss.reshape(-1, 1).to(grad.dtype)
        elif ctx.gpu_backend:
            # decided on the device: no memory is moved when grad_loss is 1 (the usual loss.backward())
            grad = _scale_unless_one_(grad, grad_loss)
        elif not bool(grad_loss == 1):  # CPU: reading grad_loss costs nothing; 1 leaves the gradient final
            grad = grad.mul_(grad_loss.to(grad.dtype)) if ctx.inplace else grad * grad_loss.to(grad.dtype)
        return grad.reshape(ctx.shape), None, None, None, None, None, None, None


def _scale_unless_one_(grad: Tensor, s: Tensor) -> Tensor:
    """grad *= s (a 0-d device tensor) without reading s on the host. grad is ours (its only reference) or, with
    inplace_backward, the logits' storage handed over for this purpose, so scaling in place is safe."""
    if grad.is_contiguous() and _backend.why_unavailable("triton", grad.device) is None:
        from .triton.scale import scale_unless_one_
        return scale_unless_one_(grad, s.reshape(()))
    return grad.mul_(s.to(grad.dtype))


def _check(logits, target, reduction):
    check_float_tensor(logits, "logits")
    if logits.dim() < 2:
        raise ValueError(f"logits must be (N, V) (or (..., V)), got shape {tuple(logits.shape)}")
    if not isinstance(target, Tensor) or target.dtype != torch.int64:
        raise TypeError(f"target must be an int64 tensor, got {getattr(target, 'dtype', type(target).__name__)}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(logits.shape[:-1])} for logits {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device}, logits on {logits.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def cross_entropy_z_loss(logits: Tensor, target: Tensor, z_coef: float = 1e-4, reduction: str = "mean",
                         ignore_index: int = -100, *, inplace_backward: bool = False,
                         backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Softmax cross-entropy plus the z-loss z_coef * logsumexp(z)^2 per row (SPEC 4), fused.

    Returns ``(loss, z_loss)``: ``loss`` includes the z-loss and is what to backpropagate; ``z_loss`` is its
    z-loss part, reduced the same way and detached, for logging. Rows whose target is ``ignore_index``
    contribute nothing, and ``"mean"`` averages over the other rows (as ``F.cross_entropy``).

    One call computes the loss and the gradient with respect to the logits; no (N, V) softmax is kept. The
    gradient lives in a buffer shaped like the logits, or, with ``inplace_backward=True``, in the logits'
    own storage, which the call then overwrites (use it when nothing else needs the logits afterwards, e.g.
    a language-model head; the matmul producing them does not). Backward may run once.

    Args:
        logits: (N, V) or (..., V) float logits. Math in float32 (float64 for float64); the loss comes back
            in that dtype.
        target: int64 class indices of shape logits.shape[:-1].
    """
    _check(logits, target, reduction)
    if not math.isfinite(z_coef) or z_coef < 0:
        raise ValueError(f"z_coef must be finite and >= 0, got {z_coef}")
    return _FusedLoss.apply(logits, target, "cross_entropy_z_loss", float(z_coef), reduction, int(ignore_index),
                            bool(inplace_backward), backend)


def stablemax_cross_entropy(logits: Tensor, target: Tensor, reduction: str = "mean", *, ignore_index: int = -100,
                            inplace_backward: bool = False, backend: str = "auto") -> Tensor:
    """StableMax cross-entropy (SPEC 4; "Grokking at the Edge of Numerical Stability"): p_i = s(z_i) / sum_j s(z_j)
    with s(x) = x + 1 for x >= 0 and 1 / (1 - x) for x < 0, loss = -log p_y. Fused like
    :func:`cross_entropy_z_loss` (same arguments). The authors compute in float64; here the math is float32
    (float64 for float64 logits), which the tests compare against a float64 reference."""
    _check(logits, target, reduction)
    loss, _ = _FusedLoss.apply(logits, target, "stablemax_cross_entropy", 0.0, reduction, int(ignore_index),
                               bool(inplace_backward), backend)
    return loss
