"""Top singular triplets by randomized subspace iteration (SPEC 1.3 step 2). GEMM and QR bound, so it runs
torch's BLAS (MKL, cuBLAS) on every device rather than a custom kernel."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from torch import Tensor

from .._checks import acc_dtype
from .matrices import as_matrix, check_matrices


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
    mats = check_matrices(mats)
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
