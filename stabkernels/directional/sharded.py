"""The directional family on DTensor (FSDP2) shards: each rank generates the stream of its own elements, keyed by
their global index (the ``shard_normals`` op), so a shard holds exactly its slice of the unsharded direction; the
unit-norm sums S are summed over the shards (one all-reduce of T numbers per probe). OrthoGrad sums w.g, w.w and
g.g over the shards. Reductions through :mod:`stabkernels.distributed`."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .. import distributed
from .._checks import acc_dtype, grouped_acc_dtype
from .._orthograd import orthograd_coefficients
from .._stream import unit_scale_from_sum
from .keys import op_keys
from .ops import shard_normals_op


def shard_normals(tensors, seed: int, probe: int, backend: str = "auto") -> tuple[list[Tensor], Tensor]:
    """The local shards' normals (flat float32) and the per-tensor float32 scales s of step 4, over the whole
    tensors."""
    shards = distributed.locals_(tensors)
    normals = [torch.empty(t.numel(), dtype=torch.float32, device=t.device) for t in shards]
    b = _backend.resolve("shard_normals", backend, shards[0].device)
    keys = op_keys(seed, probe, 1, len(tensors), b, shards[0].device)[0]
    sums = shard_normals_op(normals, keys, [distributed.layout(t).offset for t in tensors], b)
    S = distributed.sum_shards(sums.to(shards[0].device), tensors)
    return normals, unit_scale_from_sum(S)


def sharded_directions(tensors, seed: int, probe: int, backend: str = "auto") -> list[Tensor]:
    """random_directions of DTensors: each local shard's slice of its tensor's unit direction."""
    normals, scales = shard_normals(tensors, seed, probe, backend)
    out = []
    for t, n, s in zip(tensors, normals, scales):
        A = acc_dtype(t.dtype)
        out.append((n.to(A) * s.to(A)).reshape(distributed.local(t).shape))
    return out


def perturb_sharded(params, seed: int, probe: int, sigma: float, out, backend: str) -> list:
    """perturb of DTensors: theta + sigma * d on each local shard, written into ``out``'s local shards."""
    if out is None:
        out = [torch.empty_like(p) for p in params]
    out = list(out)
    if len(out) != len(params):
        raise ValueError(f"out has {len(out)} tensors for {len(params)} params")
    for i, (p, o, d) in enumerate(zip(params, out, sharded_directions(params, seed, probe, backend))):
        pl, ol = distributed.local(p), distributed.local(o)
        if ol.shape != pl.shape or ol.dtype != pl.dtype:
            raise ValueError(f"out[{i}] must be a {pl.dtype} tensor of the local shard's shape {tuple(pl.shape)}")
        if ol.data_ptr() == pl.data_ptr() and pl.numel():
            raise ValueError(f"out[{i}] aliases params[{i}]: perturb never writes the parameters")
        A = d.dtype
        ol.copy_(pl.to(A) + torch.tensor(sigma, dtype=A) * d)
    return out


def dots_sharded(grads, seed: int, probes, backend: str) -> Tensor:
    """Per probe: sum_t (g_t . n_t) s_t, with the shard dot products and S summed over the shards."""
    out = []
    for probe in probes:
        normals, scales = shard_normals(grads, seed, probe, backend)
        dots = torch.stack([distributed.local(g).reshape(-1).to(torch.float64) @ n.to(torch.float64)
                            for g, n in zip(grads, normals)])
        out.append((distributed.sum_shards(dots, grads) * scales.to(torch.float64)).sum())
    return torch.stack(out).to(grouped_acc_dtype(grads))


def orthograd_sharded(params) -> None:
    """OrthoGrad on DTensor shards: w.g, w.w and g.g per tensor from the local shards, summed over the shards
    (one all-reduce of 3T numbers), then each rank writes its shard of g (the kernels' formula, float64)."""
    W = [distributed.local(p.detach()) for p in params]
    G = [distributed.local(p.grad) for p in params]
    partial = torch.stack([torch.stack([(w.double() * g.double()).sum(), w.double().square().sum(),
                                        g.double().square().sum()]) for w, g in zip(W, G)])
    c, scale = orthograd_coefficients(*distributed.sum_shards(partial, params).unbind(1))
    for w, g, ci, si in zip(W, G, c, scale):
        g.copy_((g.double() - ci * w.double()) * si)
