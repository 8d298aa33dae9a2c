"""Spectral family (SPEC 1): grouped power iteration, stable rank, top singular triplets and in-place
smoothing of the top of weight matrices' singular spectra (the PSS method).

Every weight with ndim >= 2 is viewed as a matrix (out_features, rest), like
``torch.nn.utils.parametrizations.spectral_norm``: a conv weight (O, I, kh, kw) becomes (O, I*kh*kw).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from . import backend as _backend
from . import distributed
from ._checks import acc_dtype, check_tensor_list, grouped_acc_dtype
from ._library import define_op

RULES = ("clip", "log", "mean", "cap")


def as_matrix(w: Tensor) -> Tensor:
    """``w`` viewed as (w.shape[0], rest); a view whenever the strides allow it."""
    return w.reshape(w.shape[0], -1) if w.dim() != 2 else w



def _check_matrices(mats, name: str = "mats") -> list[Tensor]:
    mats = check_tensor_list(mats, name, allow_empty=True)
    for i, w in enumerate(mats):
        if w.dim() < 2:
            raise ValueError(f"{name}[{i}] must have ndim >= 2 (a weight matrix), got shape {tuple(w.shape)}")
        if w.numel() == 0:
            raise ValueError(f"{name}[{i}] is empty (shape {tuple(w.shape)})")
    return mats


# --------------------------------------------------------------------------------------------------
# sq_norms: sum of squares of each tensor of a list, one pass (grad norms, Frobenius norms)


def _sq_norms_fake(tensors, backend):
    return tensors[0].new_empty(len(tensors), dtype=grouped_acc_dtype(tensors))


_sq_norms_op = define_op("sq_norms", "(Tensor[] tensors, str backend) -> Tensor", _sq_norms_fake)


@_backend.register("sq_norms", "torch")
def sq_norms_reference(tensors: list[Tensor]) -> Tensor:
    """Reference: ``sum(t.to(acc) ** 2)`` per tensor."""
    dtype = grouped_acc_dtype(tensors)
    return torch.stack([t.to(acc_dtype(t.dtype)).pow(2).sum().to(dtype) for t in tensors])


_backend.register_kernels("sq_norms", "spectral")


def sq_norms(tensors: Sequence[Tensor], *, backend: str = "auto") -> Tensor:
    """Sum of squares of each tensor in ``tensors`` (any shapes, one device), read once, fp32 accumulation
    (fp64 when any tensor is fp64). Returns a (T,) tensor; ``sq_norms(grads).sum().sqrt()`` is the global
    gradient norm that ``clip_grad_norm_`` computes. DTensors (FSDP2): the local shards' sums, summed over the
    shards (one all-reduce of T numbers)."""
    if distributed.any_sharded(tensors):
        return distributed.sum_shards(sq_norms(distributed.locals_(tensors), backend=backend), tensors)
    tensors = check_tensor_list(tensors, "tensors", allow_empty=True)
    if not tensors:
        return torch.zeros(0)
    b = _backend.resolve("sq_norms", backend, tensors[0].device)
    return _sq_norms_op(tensors, b)


# --------------------------------------------------------------------------------------------------
# power_iteration_


def _power_iteration_fake(mats, us, vs, iters, eps, backend):
    return mats[0].new_empty(len(mats), dtype=grouped_acc_dtype(mats))


_power_iteration_op = define_op(
    "power_iteration_",
    "(Tensor[] mats, Tensor(a!)[] us, Tensor(b!)[] vs, int iters, float eps, str backend) -> Tensor",
    _power_iteration_fake,
)


@_backend.register("power_iteration_", "torch")
def power_iteration_reference(mats, us, vs, iters: int, eps: float) -> Tensor:
    """Reference, one matrix at a time. Per iteration: x = W v, y = W^T x, sigma = |y| / |x| (= u^T W v_new),
    u = x / |x|, v = y / |y|. A zero matrix (|x| <= eps) gives sigma 0 and a non-finite one NaN; both leave
    u and v as they were."""
    sigmas = []
    for w, u, v in zip(mats, us, vs):
        w = w.to(u.dtype)
        sigma, u_new, v_new = 0.0, u, v
        for _ in range(iters):
            x = w @ v_new
            y = w.T @ x
            nx, ny = x.norm(), y.norm()
            if not (torch.isfinite(nx) and torch.isfinite(ny)):
                sigma, u_new, v_new = float("nan"), u, v
                break
            if nx <= eps or ny == 0:
                sigma = 0.0
                break
            u_new, v_new, sigma = x / nx, y / ny, (ny / nx).item()
        u.copy_(u_new)
        v.copy_(v_new)
        sigmas.append(sigma)
    return torch.tensor(sigmas, dtype=grouped_acc_dtype(mats), device=mats[0].device)


_backend.register_kernels("power_iteration_", "spectral")


def init_power_vectors(mats: Sequence[Tensor], generator: torch.Generator | None = None):
    """Random normal unit vectors (u, v) for each matrix (SPEC 1.1), in the matrices' math dtype and on
    their device; drawn from ``generator`` (on the CPU) so runs are reproducible."""
    us, vs = [], []
    for w in mats:
        m = as_matrix(w)
        for size, out in ((m.shape[0], us), (m.shape[1], vs)):
            r = torch.randn(size, generator=generator, dtype=torch.float64)
            out.append((r / r.norm().clamp_min(1e-12)).to(device=w.device, dtype=acc_dtype(w.dtype)))
    return us, vs


def power_iteration_(mats: Sequence[Tensor], us: Sequence[Tensor], vs: Sequence[Tensor], iters: int = 1, *,
                     eps: float = 1e-12, check_finite: bool = True, backend: str = "auto") -> Tensor:
    """Power iteration on every matrix of ``mats`` at once; updates ``us``/``vs`` in place (SPEC 1.1).

    Each iteration reads each matrix once: for each block of rows W_b it computes x_b = W_b v and accumulates
    W_b^T x_b while the block is in cache, then sigma_1 = |W^T x| / |x| (equal to u^T W v with the updated
    vectors, the estimate of ``torch.nn.utils.spectral_norm``), u = x / |x|, v = W^T x / |W^T x|.

    Args:
        mats: matrices of any shapes and float dtypes on one device; ndim > 2 is viewed as (shape[0], rest).
        us, vs: unit vectors of sizes (rows,) and (cols,) per matrix, contiguous, in the matrix's math dtype
            (float32, float64 for float64 matrices), e.g. from :func:`init_power_vectors`. Updated in place.
        iters: iterations (about 15 from a random start, 1-2 warm-started).
        eps: a matrix with |W v| <= eps is treated as zero: sigma 0, vectors unchanged.
        check_finite: raise ``ValueError`` naming the matrix when one holds NaN/inf (its vectors are left
            unchanged); this reads the (T,) result on the host.

    Row-sharded DTensor matrices (FSDP2): ``us[i]`` holds the local rows' part of u (a plain tensor of the
    local row count) and ``vs[i]`` the whole v; x = W v stays local and each iteration sums W^T x and |x|^2
    over the shards in one all-reduce for all matrices (then every rank holds the same v and sigma).

    Returns:
        (T,) sigma_1 estimates, float32 (float64 if any matrix is float64).
    """
    if distributed.any_sharded(mats):
        return _power_iteration_sharded(list(mats), list(us), list(vs), iters, eps, check_finite)
    mats = _check_matrices(mats)
    us, vs = list(us), list(vs)
    if not (len(us) == len(vs) == len(mats)):
        raise ValueError(f"mats, us and vs must have the same length, got {len(mats)}, {len(us)}, {len(vs)}")
    if not mats:
        return torch.zeros(0)
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    views = [as_matrix(w) for w in mats]
    for i, (w, u, v) in enumerate(zip(views, us, vs)):
        want = acc_dtype(w.dtype)
        for name, t, size in (("us", u, w.shape[0]), ("vs", v, w.shape[1])):
            if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() != size:
                raise ValueError(f"{name}[{i}] must be a 1-D tensor of {size} elements for mats[{i}] of shape "
                                 f"{tuple(mats[i].shape)}, got {getattr(t, 'shape', type(t).__name__)}")
            if t.dtype != want or t.device != w.device or not t.is_contiguous():
                raise ValueError(f"{name}[{i}] must be a contiguous {want} tensor on {w.device}, got "
                                 f"{t.dtype} on {t.device}{'' if t.is_contiguous() else ' (non-contiguous)'}")
    b = _backend.resolve("power_iteration_", backend, views[0].device)
    sigmas = _power_iteration_op(views, us, vs, int(iters), float(eps), b)
    if check_finite:
        bad = (~torch.isfinite(sigmas)).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise ValueError(f"mats[{i}] (shape {tuple(mats[i].shape)}) holds non-finite values (NaN or inf); "
                             f"its power-iteration vectors were left unchanged ({len(bad)} such matrices)")
    return sigmas


def _power_iteration_sharded(mats, us, vs, iters: int, eps: float, check_finite: bool) -> Tensor:
    """power_iteration_ on row-sharded DTensors: the reference's steps, with the sums over rows (W^T x, |x|^2)
    summed over the shards (one all-reduce per iteration for every matrix together)."""
    if not (len(us) == len(vs) == len(mats)):
        raise ValueError(f"mats, us and vs must have the same length, got {len(mats)}, {len(us)}, {len(vs)}")
    if len({distributed.layout(w).groups for w in mats}) > 1:
        raise ValueError("power_iteration_: the DTensor matrices of one call must be sharded over the same mesh")
    views = [as_matrix(distributed.local(w)) for w in mats]
    for i, (w, u, v) in enumerate(zip(views, us, vs)):
        cols = math.prod(mats[i].shape[1:])
        for name, t, size in (("us", u, w.shape[0]), ("vs", v, cols)):
            if t.dim() != 1 or t.numel() != size or t.dtype != acc_dtype(w.dtype):
                raise ValueError(f"{name}[{i}] must be a 1-D {acc_dtype(w.dtype)} tensor of {size} elements (the "
                                 f"local rows for us, all columns for vs), got {t.dtype} {tuple(t.shape)}")
    start = [(u.clone(), v.clone()) for u, v in zip(us, vs)]
    sigma = [0.0] * len(mats)
    done = [False] * len(mats)
    for _ in range(iters):
        live = [i for i in range(len(mats)) if not done[i]]
        if not live:
            break
        xs = {i: views[i].to(us[i].dtype) @ vs[i] for i in live}
        ys = {i: views[i].to(us[i].dtype).T @ xs[i] for i in live}
        # per matrix [W^T x, |x|^2], summed over the shards: a (1, total) row of the first matrix's groups
        flat = torch.cat([torch.cat([ys[i].double(), xs[i].double().square().sum().reshape(1)]) for i in live])
        flat = distributed.sum_shards(flat.reshape(1, -1), mats[live[0]:live[0] + 1])[0]
        at = 0
        for i in live:
            n = ys[i].numel()
            y, nx = flat[at: at + n], float(flat[at + n].sqrt())
            at += n + 1
            ny = float(y.norm())
            if not (math.isfinite(nx) and math.isfinite(ny)):
                sigma[i], done[i] = math.nan, True
                us[i].copy_(start[i][0])
                vs[i].copy_(start[i][1])
            elif nx <= eps or ny == 0:
                sigma[i], done[i] = 0.0, True
            else:
                us[i].copy_(xs[i] / nx)
                vs[i].copy_((y / ny).to(vs[i].dtype))
                sigma[i] = ny / nx
    if check_finite:
        bad = [i for i, s in enumerate(sigma) if not math.isfinite(s)]
        if bad:
            raise ValueError(f"mats[{bad[0]}] (shape {tuple(mats[bad[0]].shape)}) holds non-finite values (NaN or "
                             f"inf); its power-iteration vectors were left unchanged ({len(bad)} such matrices)")
    return torch.tensor(sigma, dtype=grouped_acc_dtype(views), device=views[0].device)


# --------------------------------------------------------------------------------------------------
# stable rank


def stable_rank(mats: Sequence[Tensor], sigmas: Tensor | None = None, *, iters: int = 30,
                backend: str = "auto") -> Tensor:
    """Stable rank ||W||_F^2 / sigma_1^2 (>= 1) of each matrix; 0 for a zero matrix (SPEC 1.1).

    ``sigmas`` (e.g. from :func:`power_iteration_`) saves the spectral norms' cost; without it they are
    estimated by ``iters`` power iterations from a fixed random start (an estimate from below, so the stable
    rank is an estimate from above, exact once the iteration has converged)."""
    mats = _check_matrices(mats)
    if not mats:
        return torch.zeros(0)
    views = [as_matrix(w) for w in mats]
    if sigmas is None:
        us, vs = init_power_vectors(views, torch.Generator().manual_seed(0))
        sigmas = power_iteration_(views, us, vs, iters, backend=backend)
    fro2 = sq_norms(views, backend=backend)
    sigmas = sigmas.to(fro2)
    return torch.where(sigmas > 0, fro2 / sigmas.clamp_min(1e-30) ** 2, torch.zeros_like(fro2))


# --------------------------------------------------------------------------------------------------
# top singular triplets (randomized subspace iteration; GEMM and QR bound, so it runs torch's BLAS on every
# device rather than a custom kernel)


def _randn(shape, dtype, device, generator):
    if generator is None:
        return torch.randn(shape, dtype=dtype, device=device)
    return torch.randn(shape, dtype=dtype, generator=generator, device=generator.device).to(device)


def _subspace_svd(W: Tensor, omega: Tensor, iters: int):
    """Randomized subspace iteration on one matrix (m, n) or a batch (B, m, n): returns U, S, Vh of the
    sketch's small SVD."""
    Q = torch.linalg.qr(W @ omega).Q
    for _ in range(iters):
        Q = torch.linalg.qr(W.mT @ Q).Q
        Q = torch.linalg.qr(W @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.mT @ W, full_matrices=False)
    return Q @ Ub, S, Vh


def top_singular(mats: Sequence[Tensor], k, oversample: int = 8, iters: int = 2, *,
                 generator: torch.Generator | None = None, init: Sequence[Tensor | None] | None = None,
                 batch: bool | None = None):
    """Top-k singular triplets of each matrix by randomized subspace iteration (SPEC 1.3 step 2).

    Omega (n x (k + oversample)) Gaussian, Q = orth(W Omega), then ``iters`` power steps
    Q = orth(W orth(W^T Q)), then the small SVD of Q^T W: 2 + 2 * iters reads of W, all in BLAS (GEMM and
    QR bound, so torch's MKL/cuBLAS serve every device rather than a custom kernel).

    Args:
        mats: matrices (ndim > 2 viewed as (shape[0], rest)).
        k: an int or one int per matrix (each capped at min(m, n)).
        oversample, iters: the sketch's extra columns and power steps (more: more accurate, slower).
        generator: draws Omega (reproducible runs).
        init: optional per-matrix (n, j) right singular vectors of an earlier call: warm start, the first j
            columns of Omega are these.
        batch: stack matrices of the same shape, dtype and device into one batched call. Default: on CUDA
            (fewer launches) but not on CPU, where stacking is a full copy of the weights and buys nothing.

    Returns:
        A list of (U (m, k), S (k,), V (n, k)) in the math dtype (float32, float64 for float64).
    """
    mats = _check_matrices(mats)
    ks = [int(k)] * len(mats) if isinstance(k, int) else [int(x) for x in k]
    if len(ks) != len(mats):
        raise ValueError(f"k must be an int or one int per matrix, got {len(ks)} for {len(mats)} matrices")
    if any(x < 1 for x in ks):
        raise ValueError(f"k must be >= 1, got {ks}")
    if oversample < 0 or iters < 0:
        raise ValueError("oversample and iters must be >= 0")
    init = list(init) if init is not None else [None] * len(mats)
    views = [as_matrix(w) for w in mats]
    groups = defaultdict(list)
    for i, w in enumerate(views):
        stack = batch if batch is not None else w.device.type == "cuda"
        groups[(tuple(w.shape), w.dtype, w.device) if stack else i].append(i)
    out = [None] * len(mats)
    for idx in groups.values():
        m, n = views[idx[0]].shape
        acc, device = acc_dtype(views[idx[0]].dtype), views[idx[0]].device
        width = min(max(ks[i] for i in idx) + oversample, m, n)
        omega = _randn((len(idx), n, width), acc, device, generator)
        for b, i in enumerate(idx):
            if init[i] is not None:
                j = min(init[i].shape[1], width)
                omega[b, :, :j] = init[i][:, :j].to(omega)
        if len(idx) == 1:
            U, S, Vh = (t.unsqueeze(0) for t in _subspace_svd(views[idx[0]].to(acc), omega[0], iters))
        else:
            U, S, Vh = _subspace_svd(torch.stack([views[i] for i in idx]).to(acc), omega, iters)
        for b, i in enumerate(idx):
            kk = min(ks[i], m, n)
            out[i] = (U[b, :, :kk], S[b, :kk], Vh[b, :kk, :].mT)
    return out


# --------------------------------------------------------------------------------------------------
# smoothing rules and spectral_smooth_


def smooth_values(s: Tensor, rule: str = "clip", *, cap: float | None = None, window: int = 3) -> Tensor:
    """Smoothed top singular values s~ for sorted (descending) top-k values ``s`` (SPEC 1.3 step 3).

    - ``clip``: s~_i = min(s_i, s_k): every top value cut to the k-th.
    - ``log``: s~_i = s_k (1 + log(s_i / s_k)).
    - ``mean``: a moving average of width ``window`` over the sorted values, with the ends reflected
      (s_1 | s_1, s_2, ...), which is doubly stochastic: it preserves the sum of the top k, never raises s_1
      and never raises the sum of squares.
    - ``cap``: s~_i = min(s_i, cap).
    ``clip``, ``log`` and ``cap`` never raise a value.
    """
    if s.numel() == 0:
        return s.clone()
    sk = s[-1]
    if rule == "clip":
        return torch.minimum(s, sk)
    if rule == "log":
        if sk <= 0:
            return torch.zeros_like(s)
        return torch.minimum(s, sk * (1 + torch.log(s / sk)))
    if rule == "cap":
        if cap is None:
            raise ValueError("rule='cap' needs an absolute cap value")
        return s.clamp_max(cap)
    if rule == "mean":
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window must be a positive odd integer, got {window}")
        h = window // 2
        k = s.numel()
        idx = torch.arange(k, device=s.device)
        total = torch.zeros_like(s)
        for off in range(-h, h + 1):
            j = idx + off
            j = torch.where(j < 0, -1 - j, j)  # reflect at the top: s_1 | s_1, s_2
            j = torch.where(j >= k, 2 * k - 1 - j, j)  # and at the k-th value
            j = j.clamp(0, k - 1)  # windows wider than 2k: repeated reflection collapses to the ends
            total = total + s[j]
        return total / window
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


@dataclass
class SpectralReport:
    """What :func:`spectral_smooth_` did, one entry per matrix."""

    sigma_before: Tensor  # sigma_1 before smoothing (power iteration estimate)
    sigma_after: Tensor  # the target sigma_1: the largest smoothed value (the new sigma_1 up to the sketch)
    k: Tensor  # number of top singular values smoothed
    stable_rank: Tensor  # ||W||_F^2 / sigma_1^2 before smoothing
    changed: Tensor  # bool: the matrix was modified
    V: list | None = None  # right singular vectors used per matrix (None where no sketch ran): warm start

    def __repr__(self) -> str:
        return (f"SpectralReport(matrices={self.k.numel()}, changed={int(self.changed.sum())}, "
                f"sigma_before={self.sigma_before.tolist()}, sigma_after={self.sigma_after.tolist()}, "
                f"k={self.k.tolist()})")


def spectral_smooth_(mats: Sequence[Tensor], us: Sequence[Tensor] | None = None, vs: Sequence[Tensor] | None = None,
                     *, rule: str = "clip", max_rank: int = 8, min_rank: int = 1, cap: float | None = None,
                     window: int = 3, oversample: int = 8, iters: int = 2, power_iters: int = 1,
                     warmup_iters: int = 15, generator: torch.Generator | None = None, init=None,
                     backend: str = "auto") -> SpectralReport:
    """Smooths the top of each matrix's singular spectrum in place (SPEC 1.3; a reconstruction: the PSS
    paper's method text is not public, its choices are options here).

    Per matrix: sigma_1 by power iteration (warm-started from ``us``/``vs`` with ``power_iters`` iterations,
    else from a random start with ``warmup_iters``), the stable rank SR = ||W||_F^2 / sigma_1^2,
    k = clamp(floor(SR), min_rank, max_rank) (and <= min(m, n)), the top-k triplets by randomized subspace
    iteration (:func:`top_singular`), the smoothed values s~ = rule(s) (:func:`smooth_values`), then the
    rank-k update W <- W - U diag(s - s~) V^T, in place; singular vectors and optimizer state are untouched.
    With k = 1 the update is (sigma_1 - c)_+ u v^T straight from the power-iteration vectors, where c is the
    rule's target for s_1: only ``cap`` changes anything there (``clip``, ``log`` and ``mean`` of a single
    value are that value), so with the default ``min_rank=1`` a matrix of stable rank < 2 is left alone.

    Args:
        mats: weights (ndim >= 2; conv weights viewed as (out, rest)), one device, any float dtypes.
        us, vs: power-iteration state (see :func:`power_iteration_`), updated in place; None: temporary.
        rule: ``clip`` (default), ``log``, ``mean`` or ``cap`` (needs ``cap``).
        init: optional per-matrix right singular vectors from a previous call (warm-started sketch).

    Returns:
        A :class:`SpectralReport`; its ``V`` holds the right singular vectors used (pass them as ``init``).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "cap" and (cap is None or not math.isfinite(cap) or cap < 0):
        raise ValueError(f"rule='cap' needs a finite cap >= 0, got {cap!r}")
    if not 1 <= min_rank <= max_rank:
        raise ValueError(f"need 1 <= min_rank <= max_rank, got min_rank={min_rank}, max_rank={max_rank}")
    mats = _check_matrices(mats)
    views = [as_matrix(w) for w in mats]
    if us is None or vs is None:
        us, vs = init_power_vectors(views, generator)
        sig = power_iteration_(views, us, vs, warmup_iters, backend=backend)
    else:
        sig = power_iteration_(views, list(us), list(vs), power_iters, backend=backend)
    sr = stable_rank(views, sig, backend=backend)
    limits = torch.tensor([min(w.shape) for w in views])
    k = sr.floor().clamp(min_rank, max_rank).to(torch.int64).cpu().minimum(limits)
    after = sig.clone()
    changed = torch.zeros(len(mats), dtype=torch.bool)
    need_svd = [i for i in range(len(mats)) if k[i] > 1 and sig[i] > 0]
    init = list(init) if init is not None else [None] * len(mats)
    Vs = [None] * len(mats)
    for i in range(len(mats)):
        if k[i] == 1 and sig[i] > 0:
            target = smooth_values(sig[i : i + 1], rule, cap=cap, window=window)[0]
            delta = sig[i] - target
            if delta > 0:
                _apply_update(mats[i], us[i][:, None] * delta.to(us[i]), vs[i][:, None])
                after[i], changed[i] = target, True
    if need_svd:
        triplets = top_singular([views[i] for i in need_svd], [int(k[i]) for i in need_svd], oversample, iters,
                                generator=generator, init=[init[i] for i in need_svd])
        for i, (U, S, V) in zip(need_svd, triplets):
            target = smooth_values(S, rule, cap=cap, window=window)
            delta = S - target
            Vs[i] = V
            if (delta > 0).any():
                _apply_update(mats[i], U * delta, V)
                after[i], changed[i] = target.max(), True
    return SpectralReport(sigma_before=sig, sigma_after=after, k=k, stable_rank=sr, changed=changed, V=Vs)


def _apply_update(w: Tensor, left: Tensor, right: Tensor) -> None:
    """w -= left @ right.T in place, with w viewed as a matrix: a GEMM straight into w when its dtype is the
    math dtype, else math in fp32 with the result rounded once into w's dtype."""
    if w.dtype == left.dtype:
        try:
            w.view(w.shape[0], -1).addmm_(left, right.T, alpha=-1)
            return
        except RuntimeError:  # strides that admit no matrix view: go through a copy
            pass
    w.copy_(torch.addmm(as_matrix(w).to(left.dtype), left, right.T, alpha=-1).to(w.dtype).reshape(w.shape))
