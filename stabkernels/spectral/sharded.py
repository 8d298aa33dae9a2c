"""The spectral family on DTensor (FSDP2) shards: the power iteration of row-sharded matrices, the torch
reference's steps with the sums over rows (W^T x, |x|^2) summed over the shards through
:mod:`stabkernels.distributed`."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import distributed
from .._checks import acc_dtype, grouped_acc_dtype
from .matrices import as_matrix


def power_iteration_sharded(mats, us, vs, iters: int, eps: float, check_finite: bool) -> Tensor:
    """:func:`~stabkernels.spectral.power_iteration_` on row-sharded DTensors: the reference's steps, with the
    sums over rows (W^T x, |x|^2) summed over the shards (one all-reduce per iteration for every matrix
    together)."""
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
