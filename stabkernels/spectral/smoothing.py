"""Spectral smoothing (SPEC 1.3, the PSS method): the smoothing rules for the top singular values, the rank-k
update that applies them in place, and ``spectral_smooth_``, which chains the power iteration, the stable rank,
the randomized SVD, a rule and the update."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .matrices import as_matrix, check_matrices
from .ops import init_power_vectors, power_iteration_, stable_rank
from .rsvd import top_singular

RULES = ("clip", "log", "mean", "cap")


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
    mats = check_matrices(mats)
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
