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
    "Tensor? class_weight, float label_smoothing, float softcap, str backend) -> (Tensor, Tensor)",
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


def _capped(logits: Tensor, softcap: float) -> tuple[Tensor, Tensor | None]:
    """(z, dz/dlogits) in the math dtype: softcap * tanh(logits / softcap) and 1 - tanh^2 (SPEC 4.5), or the
    logits and None when softcap is 0 (off)."""
    z = logits.to(acc_dtype(logits.dtype))
    if not softcap:
        return z, None
    t = torch.tanh(z / softcap)
    return softcap * t, 1 - t * t


def _smoothing_terms(z: Tensor, y: Tensor, class_weight: Tensor | None, eps: float):
    """The class weights' pieces of SPEC 4.5: (w, w_y, W = sum_j w_j, b_y = (1 - eps) w_y + eps w_y / V, the
    coefficient a0 = (1 - eps) w_y + eps W / V of p_j in the gradient); w is None without class weights."""
    V = z.shape[1]
    w = None if class_weight is None else class_weight.to(z.dtype)
    w_y = torch.ones_like(z[:, 0]) if w is None else w[y]
    W = float(V) if w is None else w.sum()
    return w, w_y, W, (1 - eps) * w_y + eps * w_y / V, (1 - eps) * w_y + eps * W / V


@_backend.register("cross_entropy_z_loss", "torch")
def cross_entropy_z_loss_reference(logits, target, grad, grad_scale, z_coef, ignore_index, class_weight=None,
                                   label_smoothing=0.0, softcap=0.0):
    """Reference (SPEC 4.3, 4.5): per row, on z = softcap(logits), the (weighted, smoothed) cross-entropy
    (1 - eps) w_y (lse - z_y) + eps / V sum_j w_j (lse - z_j) and the z-loss w_y c lse^2 (both 0 on ignored
    rows); the gradient scale * d(row)/d(logits) into ``grad`` unless it is empty:
    (p_j a - eps w_j / V) dz_j, a = (1 - eps) w_y + eps W / V + 2 c w_y lse, minus b_y = (1 - eps + eps / V) w_y
    at j = y.

    Without softmax collapse: with m = max z, s_y = exp(z_y - m) and S_rest = sum_{j != y} exp(z_j - m) summed
    apart from s_y, log S = log(s_y + S_rest) is log1p(S_rest) where the target holds the maximum (s_y = 1),
    so lse - z_y = (m - z_y) + log S keeps the S_rest of a dominant target (below float32's epsilon against 1)
    instead of rounding to 0 (elsewhere it is >= log 2); the smoothing term is summed as
    sum_j w_j (m - z_j) + W log S (no term negative); and the target's gradient p_y a - b_y is written
    (s_y (a - b_y) - b_y S_rest) / S, which does not cancel to 0 when p_y rounds to 1."""
    z, dz = _capped(logits, softcap)
    eps = label_smoothing
    valid, y = _valid_targets(target, z.shape[1], ignore_index)
    V = z.shape[1]
    w, w_y, W, b_y, a0 = _smoothing_terms(z, y, class_weight, eps)
    m = z.amax(1)
    e = torch.exp(z - m[:, None])
    s_y, rest = _split_target(e, y)
    zy = z.gather(1, y[:, None])[:, 0]
    S = s_y + rest
    log_S = torch.where(zy == m, torch.log1p(rest), torch.log(S))
    lse = m + log_S
    zero = torch.zeros_like(lse)
    ce = (1 - eps) * w_y * ((m - zy) + log_S)
    if eps:
        d = m[:, None] - z
        ce = ce + eps / V * ((d.sum(1) if w is None else d @ w) + W * log_S)
    ce = torch.where(valid, ce, zero)
    zl = torch.where(valid, z_coef * w_y * lse * lse, zero)
    if grad.numel():
        a = a0 + 2 * z_coef * w_y * lse
        g = e * (a / S)[:, None]
        if eps:
            g = g - eps / V * (1.0 if w is None else w)
        g.scatter_(1, y[:, None], ((s_y * (a - b_y) - b_y * rest) / S)[:, None])
        if dz is not None:
            g = g * dz
        grad.copy_(torch.where(valid[:, None], g * grad_scale.to(z.dtype), torch.zeros_like(g)))
    return ce, zl


_stablemax_op = define_op(
    "stablemax_cross_entropy",
    "(Tensor logits, Tensor target, Tensor(a!) grad, Tensor grad_scale, int ignore_index, Tensor? class_weight, "
    "float label_smoothing, float softcap, str backend) -> Tensor",
    _rows_fake)


def stablemax_s(x: Tensor) -> Tensor:
    """s(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0 (SPEC 4)."""
    return torch.where(x >= 0, x + 1, 1 / (1 - x.clamp_max(0)))


def stablemax_ds(x: Tensor) -> Tensor:
    """s'(x) = 1 for x >= 0, 1 / (1 - x)^2 for x < 0."""
    return torch.where(x >= 0, torch.ones_like(x), 1 / (1 - x.clamp_max(0)) ** 2)


def stablemax_log_s(x: Tensor) -> Tensor:
    """log s(x) = log1p(x) for x >= 0, -log1p(-x) for x < 0."""
    return torch.sign(x) * torch.log1p(x.abs())


@_backend.register("stablemax_cross_entropy", "torch")
def stablemax_cross_entropy_reference(logits, target, grad, grad_scale, ignore_index, class_weight=None,
                                      label_smoothing=0.0, softcap=0.0):
    """Reference (SPEC 4.2, 4.5): on z = softcap(logits), loss = (1 - eps) w_y (log S - log s(z_y))
    + eps / V sum_j w_j (log S - log s(z_j)), S = sum_j s(z_j); the gradient scale * d(row)/d(logits) into
    ``grad`` unless it is empty: (s'(z_j) / S a - eps w_j s'(z_j) / (V s(z_j))) dz_j with
    a = (1 - eps) w_y + eps W / V, and at j = y s'(z_y) (a / S - b_y / s_y), b_y = (1 - eps + eps / V) w_y (the
    tests check it against autograd of the plain formula).

    Without softmax collapse: with s_y = s(z_y) and S_rest = sum_{j != y} s(z_j) summed apart from it,
    log S - log s_y is log1p(S_rest / s_y) (log S_rest - log s_y where that ratio overflows) and the target's
    gradient s'(z_y) (s_y (a - b_y) - b_y S_rest) / (S s_y): neither cancels to 0 when p_y rounds to 1."""
    z, dz = _capped(logits, softcap)
    eps = label_smoothing
    V = z.shape[1]
    valid, y = _valid_targets(target, V, ignore_index)
    w, w_y, W, b_y, a = _smoothing_terms(z, y, class_weight, eps)
    s = stablemax_s(z)
    s_y, rest = _split_target(s, y)
    S = s_y + rest
    r = rest / s_y
    rows = (1 - eps) * w_y * torch.where(r.isinf(), torch.log(rest) - torch.log(s_y), torch.log1p(r))
    if eps:
        ls = stablemax_log_s(z)
        rows = rows + eps / V * (W * torch.log(S) - (ls.sum(1) if w is None else ls @ w))
    rows = torch.where(valid, rows, torch.zeros_like(S))
    if grad.numel():
        zy = z.gather(1, y[:, None])[:, 0]
        ds = stablemax_ds(z)
        g = ds * (a / S)[:, None]
        if eps:
            g = g - eps / V * (1.0 if w is None else w) * ds / s
        g.scatter_(1, y[:, None], (stablemax_ds(zy) * (s_y * (a - b_y) - b_y * rest) / (S * s_y))[:, None])
        if dz is not None:
            g = g * dz
        grad.copy_(torch.where(valid[:, None], g * grad_scale.to(z.dtype), torch.zeros_like(g)))
    return rows


for _op in ("cross_entropy_z_loss", "stablemax_cross_entropy"):
    _backend.register_kernels(_op, "losses")


# --------------------------------------------------------------------------------------------------
# autograd


class _Options:
    """The loss options shared by the row ops and the linear op (SPEC 4.5): the kind of loss and its scalars,
    host values all (no host read), and the class weights as a tensor (or None)."""

    def __init__(self, kind, z_coef, reduction, ignore_index, class_weight, label_smoothing, softcap):
        self.kind, self.z_coef, self.reduction, self.ignore_index = kind, z_coef, reduction, ignore_index
        self.class_weight, self.label_smoothing, self.softcap = class_weight, label_smoothing, softcap

    def denominator(self, t: Tensor, A: torch.dtype) -> Tensor:
        """The mean's denominator as F.cross_entropy takes it: the rows that count, or with class weights the
        sum of their targets' weights (a device tensor: no host read)."""
        valid = t != self.ignore_index
        if self.class_weight is None:
            return valid.sum().to(A)
        w_y = self.class_weight.to(A).gather(0, torch.where(valid, t, torch.zeros_like(t)))
        return torch.where(valid, w_y, torch.zeros_like(w_y)).sum()

    def grad_scale(self, denominator: Tensor, A: torch.dtype, device) -> Tensor:
        """The factor the row kernels write the gradient with: 1 / denominator for a mean (1 where it is 0,
        which leaves the loss NaN as F.cross_entropy does), else 1."""
        if self.reduction != "mean":
            return torch.ones((), dtype=A, device=device)
        return 1.0 / torch.where(denominator == 0, torch.ones_like(denominator), denominator)

    def rows(self, x: Tensor, t: Tensor, grad: Tensor, scale: Tensor, backend: str) -> tuple[Tensor, Tensor]:
        """(loss rows including the z-loss, z-loss rows) of one block of rows, the gradient into ``grad``
        (which may be x itself) unless it is empty: the one place the loss math is called from."""
        b = _backend.resolve(self.kind, backend, x.device)
        V = x.shape[1]
        if b in ("triton", "cuda"):  # the CPU kernels check themselves; here a device-side assert, no host read
            valid = t != self.ignore_index
            torch._assert_async(~(((t < 0) | (t >= V)) & valid).any(), f"target out of range [0, {V})")
        cw = self.class_weight
        if self.kind == "cross_entropy_z_loss":
            ce, zl = _ce_z_op(x, t, grad, scale, self.z_coef, self.ignore_index, cw, self.label_smoothing,
                              self.softcap, b)
            return ce + zl, zl
        rows = _stablemax_op(x, t, grad, scale, self.ignore_index, cw, self.label_smoothing, self.softcap, b)
        return rows, torch.zeros_like(rows)

    def reduce(self, rows: Tensor, zl: Tensor, denominator: Tensor, shape) -> tuple[Tensor, Tensor]:
        if self.reduction == "mean":
            return rows.sum() / denominator, zl.sum() / denominator
        if self.reduction == "sum":
            return rows.sum(), zl.sum()
        return rows.reshape(shape), zl.reshape(shape)


def _rows_as_columns(x: Tensor) -> bool:
    """(N, V) logits whose rows are columns (a (V, N) matrix seen transposed): the C++ kernels read them as they
    lie, vectorised across rows."""
    return x.dim() == 2 and x.stride(0) == 1 and x.stride(1) >= x.shape[0]


def _gpu_backend(opts: _Options, backend: str, device) -> bool:
    return _backend.resolve(opts.kind, backend, device) in ("triton", "cuda")


def _scale_stored_(grad: Tensor, grad_loss: Tensor, gpu: bool, inplace: bool = True) -> Tensor:
    """The stored gradient times the upstream scalar gradient: nothing when that is 1 (the usual
    loss.backward()); decided on the device for a GPU backend (no host read), on the host for CPU (free). Under
    torch.compile a traced backward cannot branch on the value: it always multiplies."""
    if gpu:
        return _scale_unless_one_(grad, grad_loss)
    if not torch.compiler.is_compiling() and bool(grad_loss == 1):
        return grad
    return grad.mul_(grad_loss.to(grad.dtype)) if inplace else grad * grad_loss.to(grad.dtype)


class _FusedLoss(torch.autograd.Function):
    """Runs a fused loss op; its gradient, computed in the forward, is returned by backward after scaling."""

    @staticmethod
    def forward(ctx, logits, target, opts, inplace, backend):
        V = logits.shape[-1]
        x = logits.detach().reshape(-1, V)
        columns = _rows_as_columns(x) and _backend.resolve(opts.kind, backend, x.device) == "cpp"
        if x.stride(-1) != 1 and not columns:
            x = x.contiguous()
        t = target.reshape(-1).contiguous()  # every backend reads target[i] at i
        A = acc_dtype(logits.dtype)
        needs_grad = ctx.needs_input_grad[0]
        if not needs_grad:
            grad = x.new_empty(0)
        elif inplace and x.data_ptr() == logits.data_ptr():
            grad = x  # the logits' own storage
        else:
            grad = x.new_empty(x.shape[::-1]).t() if columns else torch.empty_like(x)
        denominator = opts.denominator(t, A) if opts.reduction == "mean" else None
        scale = opts.grad_scale(denominator, A, x.device)
        rows, zl = opts.rows(x, t, grad, scale, backend)
        loss, z = opts.reduce(rows, zl, denominator, target.shape)
        ctx.mark_non_differentiable(z)
        # The gradient is an intermediate, kept on ctx (not save_for_backward) so that backward can drop this
        # reference and hand autograd the only one: AccumulateGrad then adopts the buffer instead of copying
        # it. The inputs are saved too (free: they exist anyway), so that a second backward (retain_graph,
        # gradcheck) can recompute the gradient.
        ctx.grad = grad
        ctx.save_for_backward(logits, target)
        ctx.opts, ctx.backend = opts, backend
        ctx.shape, ctx.inplace = logits.shape, inplace and grad is x
        ctx.gpu_backend = _gpu_backend(opts, backend, x.device) and grad.numel() > 0
        return loss, z

    @staticmethod
    def backward(ctx, grad_loss, grad_z):
        grad, ctx.grad = ctx.grad, None
        if grad is None:  # a second backward over the same graph: recompute
            if ctx.inplace:
                raise RuntimeError("with inplace_backward=True the logits hold the gradient, so backward can run "
                                   "only once")
            logits, target = ctx.saved_tensors
            with torch.enable_grad():
                x = logits.detach().requires_grad_()
                loss, _ = _FusedLoss.apply(x, target, ctx.opts, False, ctx.backend)
            (g,) = torch.autograd.grad(loss, x, grad_loss)
            return g, None, None, None, None
        if ctx.opts.reduction == "none":
            grad = grad * grad_loss.reshape(-1, 1).to(grad.dtype)
        else:
            grad = _scale_stored_(grad, grad_loss, ctx.gpu_backend, ctx.inplace or ctx.gpu_backend)
        return grad.reshape(ctx.shape), None, None, None, None


def _scale_unless_one_(grad: Tensor, s: Tensor) -> Tensor:
    """grad *= s (a 0-d device tensor) without reading s on the host. grad is ours (its only reference) or, with
    inplace_backward, the logits' storage handed over for this purpose, so scaling in place is safe."""
    if grad.is_contiguous() and _backend.why_unavailable("triton", grad.device) is None:
        from .triton.scale import scale_unless_one_
        return scale_unless_one_(grad, s.reshape(()))
    return grad.mul_(s.to(grad.dtype))


def _check(logits, target, reduction, name="logits"):
    check_float_tensor(logits, name)
    if logits.dim() < 2:
        raise ValueError(f"{name} must be (N, V) (or (..., V)), got shape {tuple(logits.shape)}")
    if not isinstance(target, Tensor) or target.dtype != torch.int64:
        raise TypeError(f"target must be an int64 tensor, got {getattr(target, 'dtype', type(target).__name__)}")
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(logits.shape[:-1])} for {name} {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device}, {name} on {logits.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _options(kind, z_coef, reduction, ignore_index, label_smoothing, softcap, class_weight, classes, like):
    """Validates the options of SPEC 4.5 (errors name the argument) and bundles them; softcap None -> 0 (off),
    the class weights in the math dtype of ``like`` (the kernels read them so)."""
    device = like.device
    if not math.isfinite(z_coef) or z_coef < 0:
        raise ValueError(f"z_coef must be finite and >= 0, got {z_coef}")
    if kind == "stablemax_cross_entropy" and z_coef != 0:
        raise ValueError("z_coef applies to the softmax loss only (SPEC 4.5: StableMax has no logsumexp to "
                         f"penalise), got z_coef={z_coef} with the stablemax loss")
    if not (0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap}")
    if class_weight is not None:
        check_float_tensor(class_weight, "class_weight")
        if class_weight.shape != (classes,):
            raise ValueError(f"class_weight must have shape ({classes},) (one weight per class), got "
                             f"{tuple(class_weight.shape)}")
        if class_weight.device != device:
            raise ValueError(f"class_weight is on {class_weight.device}, the inputs on {device}")
        class_weight = class_weight.detach().to(acc_dtype(like.dtype)).contiguous()
    return _Options(kind, float(z_coef), reduction, int(ignore_index), class_weight, float(label_smoothing),
                    float(softcap or 0.0))


def cross_entropy_z_loss(logits: Tensor, target: Tensor, z_coef: float = 1e-4, reduction: str = "mean",
                         ignore_index: int = -100, *, label_smoothing: float = 0.0, softcap: float | None = None,
                         class_weight: Tensor | None = None, inplace_backward: bool = False,
                         backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Softmax cross-entropy plus the z-loss z_coef * logsumexp(z)^2 per row (SPEC 4), fused.

    Returns ``(loss, z_loss)``: ``loss`` includes the z-loss and is what to backpropagate; ``z_loss`` is its
    z-loss part, reduced the same way and detached, for logging. Rows whose target is ``ignore_index``
    contribute nothing, and ``"mean"`` averages over the other rows (as ``F.cross_entropy``).

    Options (SPEC 4.5), each as in ``F.cross_entropy`` where it has them: ``label_smoothing`` eps in [0, 1]
    ((1 - eps) * nll + eps * the mean over classes of -log p); ``class_weight`` (V,) weights, the row weighted by
    its target's weight (the smoothing term by each class's) and ``"mean"`` dividing by the sum of the counted
    rows' target weights; ``softcap`` c > 0 replaces the logits by c * tanh(logits / c) first (Gemma 2), the
    gradient flowing through it. The z-loss is taken on the softcapped logits and weighted by w_y.

    One call computes the loss and the gradient with respect to the logits; no (N, V) softmax is kept. The
    gradient lives in a buffer shaped like the logits, or, with ``inplace_backward=True``, in the logits'
    own storage, which the call then overwrites (use it when nothing else needs the logits afterwards, e.g.
    a language-model head; the matmul producing them does not). Backward may run once. For a head whose
    logits need not exist at all, see :func:`linear_cross_entropy`.

    Args:
        logits: (N, V) or (..., V) float logits. Math in float32 (float64 for float64); the loss comes back
            in that dtype.
        target: int64 class indices of shape logits.shape[:-1].
    """
    _check(logits, target, reduction)
    opts = _options("cross_entropy_z_loss", z_coef, reduction, ignore_index, label_smoothing, softcap, class_weight,
                    logits.shape[-1], logits)
    return _FusedLoss.apply(logits, target, opts, bool(inplace_backward), backend)


def stablemax_cross_entropy(logits: Tensor, target: Tensor, reduction: str = "mean", *, ignore_index: int = -100,
                            label_smoothing: float = 0.0, softcap: float | None = None,
                            class_weight: Tensor | None = None, inplace_backward: bool = False,
                            backend: str = "auto") -> Tensor:
    """StableMax cross-entropy (SPEC 4; "Grokking at the Edge of Numerical Stability"): p_i = s(z_i) / sum_j s(z_j)
    with s(x) = x + 1 for x >= 0 and 1 / (1 - x) for x < 0, loss = -log p_y. Fused like
    :func:`cross_entropy_z_loss` (same arguments and options, SPEC 4.5, label smoothing taken with StableMax's
    probabilities; no z-loss). The authors compute in float64; here the math is float32 (float64 for float64
    logits), which the tests compare against a float64 reference."""
    _check(logits, target, reduction)
    opts = _options("stablemax_cross_entropy", 0.0, reduction, ignore_index, label_smoothing, softcap, class_weight,
                    logits.shape[-1], logits)
    loss, _ = _FusedLoss.apply(logits, target, opts, bool(inplace_backward), backend)
    return loss


# --------------------------------------------------------------------------------------------------
# linear cross-entropy (SPEC 4.6): a composition over the row ops, chunked over tokens


LOSSES = {"softmax": "cross_entropy_z_loss", "stablemax": "stablemax_cross_entropy"}


# Fewest rows of a default chunk (unless N / 8 is fewer): every chunk re-reads W in two GEMMs and reads and writes
# grad_W once, so thin chunks spend their time on that traffic. At 1024 x 512 x 16384 on CPU (bench/linear_ce.py)
# Liger's 32-row chunks took 2.4 s per forward + backward, 128-row ones 0.98 s (eager F.linear + F.cross_entropy
# 0.78 s).
MIN_CHUNK_ROWS = 128
# On CPU a default chunk grows to the 1/8 budget (N / 8 rows) where Liger's rule gives fewer rows, but not past
# this many: the gain was measured going from 128 to 256 rows, and the buffer's size stays bounded for long
# batches (at N = 65536 and V = 128k the 1/8 budget would be 4 GB of fp32).
MAX_CPU_CHUNK_ROWS = 512


def default_chunk_size(n: int, hidden: int, classes: int, *, cpu: bool = False) -> int:
    """Liger-Kernel's rule, about n / ceil(V / H) rows rounded up to a power of two (so that the (chunk, V) logits
    buffer is about as large as the (N, H) hidden states, at most twice), but at least MIN_CHUNK_ROWS rows or
    the largest power of two <= n / 8 if that is fewer (the buffer then stays within 1/8 of the (N, V) logits).

    ``cpu=True`` (CPU tensors): at least that largest power of two <= n / 8 (the whole 1/8 budget) up to
    MAX_CPU_CHUNK_ROWS, since the CPU's BLAS reads W from memory again for every chunk: at 2048 x 1024 x 32768
    (2 threads) 256-row chunks took 2413 ms per forward + backward against 2622 ms for 128 (torch.compile of
    F.linear + F.cross_entropy 2375-2397 ms in the same runs)."""
    rows = -(-n // max(1, -(-classes // hidden)))
    liger = 1 << max(0, rows - 1).bit_length()
    eighth = 1 << max(0, (n // 8).bit_length() - 1)
    return max(liger, min(MAX_CPU_CHUNK_ROWS if cpu else MIN_CHUNK_ROWS, eighth))


def _linear_chunks(h: Tensor, weight: Tensor, bias: Tensor | None, t: Tensor, opts: _Options, scale: Tensor,
                   chunk: int, backend: str, needs: tuple[bool, bool, bool], row_scale: Tensor | None = None):
    """One pass over the tokens in chunks: per chunk the logits (one GEMM), the row op's loss rows and its
    gradient written over those logits, then that gradient's products with W (grad_hidden) and the hidden
    chunk (grad_weight, accumulated; grad_bias its column sums). ``row_scale`` (N,): the upstream gradient of
    reduction="none", multiplied into each gradient row. Returns (rows, z rows, grad_h, grad_w, grad_b); the
    weight and bias gradients accumulate in the math dtype."""
    N, V = h.shape[0], weight.shape[0]
    A = acc_dtype(h.dtype)
    rows = torch.empty(N, dtype=A, device=h.device)
    zrows = torch.empty_like(rows)
    # The C++ row kernels also read a chunk whose rows are columns, the logits computed as W @ h_c^T: on CPU the
    # BLAS makes that (V, chunk) product and grad_h's W^T @ grad_c^T (written into the columns of grad_h^T)
    # faster than the row-major ones (1024 x 512 x 16384 in 128-row chunks, 2 threads, CPU time per forward +
    # backward: 207 ms against 264 ms for the logits, 206 against 213 for grad_h; docs/performance.md).
    columns = _backend.resolve(opts.kind, backend, h.device) == "cpp"
    # grad_h^T's columns are a strided out=, which torch.compile does not trace: there grad_h is written by rows.
    # Nor where grad_h outweighs a chunk: grad_h^T is copied into rows at the end, two (N, H) arrays at once.
    h_columns = columns and not torch.compiler.is_compiling() and min(chunk, N) * V >= N * h.shape[1]
    if needs[0]:
        grad_h = (h.new_empty(h.shape[::-1]).t() if h_columns
                  else torch.empty_like(h, memory_format=torch.contiguous_format))
    else:
        grad_h = None
    # float32 / float64 weights accumulate in place (addmm_); half-precision ones into a float32 sum. The first
    # chunk's product is written, not added: no pass to zero the (V, H) sum first.
    grad_w = (torch.empty if N else torch.zeros)(weight.shape, dtype=A, device=h.device) if needs[1] else None
    grad_b = torch.zeros(V, dtype=A, device=h.device) if needs[2] else None
    any_grad = any(needs)
    # one (chunk, V) buffer for every chunk's logits (and gradient), the last chunk's a leading part of it
    buffer = h.new_empty(min(chunk, N) * V)
    for s in range(0, N, chunk):
        hc = h[s:s + chunk]
        n = hc.shape[0]
        if columns:  # (V, n) storage, the chunk's rows as its columns
            out = buffer[:n * V].view(V, n)
            logits = (torch.addmm(bias[:, None], weight, hc.t(), out=out) if bias is not None
                      else torch.mm(weight, hc.t(), out=out)).t()
        else:
            out = buffer[:n * V].view(n, V)
            logits = (torch.addmm(bias, hc, weight.t(), out=out) if bias is not None
                      else torch.mm(hc, weight.t(), out=out))
        grad = logits if any_grad else logits.new_empty(0)  # the gradient replaces the logits in place
        r, zr = opts.rows(logits, t[s:s + chunk], grad, scale, backend)
        rows[s:s + chunk], zrows[s:s + chunk] = r, zr
        if not any_grad:
            continue
        if row_scale is not None:
            grad.mul_(row_scale[s:s + chunk, None].to(grad.dtype))
        if grad_h is not None:
            if h_columns:
                torch.mm(weight.t(), grad.t(), out=grad_h[s:s + chunk].t())
            else:
                torch.mm(grad, weight, out=grad_h[s:s + chunk])
        if grad_w is not None:
            if grad_w.dtype != grad.dtype and s == 0:
                grad_w.copy_(grad.t() @ hc)
            elif grad_w.dtype != grad.dtype:
                grad_w += grad.t() @ hc
            elif s == 0:
                torch.mm(grad.t(), hc, out=grad_w)
            else:
                grad_w.addmm_(grad.t(), hc)
        if grad_b is not None:
            grad_b += grad.sum(0, dtype=A)
    logits = grad = out = buffer = None  # the chunk buffer is freed before grad_h^T is copied into rows
    if h_columns and grad_h is not None:
        grad_h = grad_h.contiguous()
    return rows, zrows, grad_h, grad_w, grad_b


class _LinearLoss(torch.autograd.Function):
    """linear_cross_entropy: the gradients of hidden, weight and bias are computed in the forward (mean, sum)
    and only scaled by the upstream gradient in backward; reduction="none" needs the upstream gradient per
    row, so its backward runs the chunked pass again (the forward then only computes the loss)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, opts, chunk, backend):
        H = hidden.shape[-1]
        h = hidden.detach().reshape(-1, H)
        t = target.reshape(-1).contiguous()  # every backend reads target[i] at i
        A = acc_dtype(h.dtype)
        needs = ctx.needs_input_grad[:3]
        w = weight.detach()
        b = None if bias is None else bias.detach()
        denominator = opts.denominator(t, A) if opts.reduction == "mean" else None
        scale = opts.grad_scale(denominator, A, h.device)
        eager = opts.reduction != "none"
        rows, zl, gh, gw, gb = _linear_chunks(h, w, b, t, opts, scale, chunk, backend,
                                              needs if eager else (False, False, False))
        loss, z = opts.reduce(rows, zl, denominator, target.shape)
        ctx.mark_non_differentiable(z)
        # kept on ctx, not saved: backward hands autograd the only reference (no copy on accumulation)
        ctx.grads = (gh, gw, gb) if eager else None
        ctx.save_for_backward(hidden, weight, bias, target)
        ctx.opts, ctx.chunk, ctx.backend = opts, chunk, backend
        ctx.gpu_backend = _gpu_backend(opts, backend, h.device)
        return loss, z

    @staticmethod
    def backward(ctx, grad_loss, grad_z):
        hidden, weight, bias, target = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        grads, ctx.grads = ctx.grads, None
        if grads is None:  # reduction="none", or a second backward: the chunked pass with the upstream gradient
            opts = ctx.opts
            H = hidden.shape[-1]
            h, t = hidden.detach().reshape(-1, H), target.reshape(-1).contiguous()
            A = acc_dtype(h.dtype)
            if opts.reduction == "none":
                scale, row_scale = torch.ones((), dtype=A, device=h.device), grad_loss.reshape(-1)
            else:
                scale = opts.grad_scale(opts.denominator(t, A) if opts.reduction == "mean" else None, A, h.device)
                scale, row_scale = scale * grad_loss.to(A), None
            _, _, gh, gw, gb = _linear_chunks(h, weight.detach(), None if bias is None else bias.detach(), t, opts,
                                              scale, ctx.chunk, ctx.backend, needs, row_scale)
        else:
            gh, gw, gb = (None if g is None else _scale_stored_(g, grad_loss, ctx.gpu_backend) for g in grads)
        gh = None if gh is None else gh.reshape(hidden.shape)
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(bias.dtype)
        return gh, gw, gb, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *,
                         loss: str = "softmax", z_coef: float = 0.0, label_smoothing: float = 0.0,
                         softcap: float | None = None, class_weight: Tensor | None = None, ignore_index: int = -100,
                         reduction: str = "mean", chunk_size: int | None = None,
                         backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The loss of a linear head, ``loss_fn(F.linear(hidden, weight, bias), target)``, without ever holding the
    (N, V) logits or their gradient (SPEC 4.6; Liger-Kernel's fused linear cross-entropy).

    The tokens are taken in chunks: per chunk the logits (one GEMM, the BLAS's), the fused row kernel of
    :func:`cross_entropy_z_loss` (``loss="softmax"``) or :func:`stablemax_cross_entropy` (``"stablemax"``)
    writes the loss and, over those logits, their gradient, which is multiplied into the hidden, weight and
    bias gradients at once. Backward only scales these by the upstream gradient (not at all for the usual
    ``loss.backward()``; no host read on GPU). ``reduction="none"`` runs the chunked pass again in backward,
    since each row's upstream gradient is needed before the products.

    Returns ``(loss, z_loss)``: ``loss`` (including the z-loss) is what to backpropagate; ``z_loss`` its z-loss
    part, reduced the same way and detached, for logging (zeros when z_coef is 0 or loss is "stablemax").

    Args:
        hidden: (N, H) or (..., H) float hidden states, any strides.
        weight: (V, H) head weight of the same dtype; bias: optional (V,).
        target: int64 class indices of shape hidden.shape[:-1].
        loss, z_coef, label_smoothing, softcap, class_weight, ignore_index, reduction: as in
            :func:`cross_entropy_z_loss` (SPEC 4.5); z_coef must be 0 for ``"stablemax"``.
        chunk_size: tokens per chunk; default :func:`default_chunk_size` (about N / ceil(V / H), a power of
            two, so the (chunk, V) buffer is about the size of the hidden states; at least 128 rows or N / 8;
            on CPU at least N / 8 rounded down to a power of two, up to 512 rows).

    Math in float32 for float32/bfloat16/float16 (the logits chunk and its gradient are stored in the input
    dtype, the weight and bias gradients accumulated in float32), float64 for float64. DTensor inputs are not
    supported.
    """
    check_float_tensor(hidden, "hidden")
    check_float_tensor(weight, "weight", ndim=2)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (N, H) (or (..., H)), got shape {tuple(hidden.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, got shape "
                         f"{tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must match hidden ({hidden.dtype}, "
                         f"{hidden.device})")
    V = weight.shape[0]
    if bias is not None:
        check_float_tensor(bias, "bias", ndim=1)
        if bias.shape != (V,) or bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"bias must be ({V},) of hidden's dtype and device, got {tuple(bias.shape)} "
                             f"{bias.dtype} on {bias.device}")
    _check(hidden, target, reduction, "hidden")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {tuple(LOSSES)}, got {loss!r}")
    opts = _options(LOSSES[loss], z_coef, reduction, ignore_index, label_smoothing, softcap, class_weight, V,
                    hidden)
    n = target.numel()
    if chunk_size is None:
        chunk_size = default_chunk_size(n, hidden.shape[-1], V, cpu=hidden.device.type == "cpu")
    elif not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return _LinearLoss.apply(hidden, weight, bias, target, opts, max(1, chunk_size), backend)
