"""Everything stabkernels knows about torch.distributed: which process group, the few reductions the
optimizers need, and unwrapping DistributedDataParallel. The family ops and the optimizers call this module
and never ``torch.distributed`` themselves. With one process (or none initialised) nothing here runs a
collective and every function is the identity, so single-process numbers do not change.

What must agree across ranks under DDP (gradients are already averaged by DDP):
- the radius: the global sample set's spread is the MAX of the ranks' spreads (a quantile needs all of them:
  an all-gather, with equal per-rank sample counts);
- S-Adam's slopes: the losses at theta and at each perturbed point are the MEAN over ranks (each rank's
  loss is the mean over its equal share of the global batch);
- the direction stream's seed: rank 0's.

Under FSDP2 (``fully_shard``: parameters, gradients and optimizer state are DTensors sharded along dim 0) the
ops take the local shards (:func:`local`) and sum what is a sum over the whole tensor (:func:`sum_shards`:
squared norms, dot products, the power iteration's W^T x); :func:`layout` gives a shard's place in the full
tensor, so the direction stream is keyed by the global element index.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


def group(process_group=None):
    """The process group to reduce over, or None when there is nothing to reduce (torch.distributed not
    available or not initialised, or a group of one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    pg = process_group if process_group is not None else torch.distributed.group.WORLD
    return pg if torch.distributed.get_world_size(pg) > 1 else None


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (probe forwards must not go through DDP's forward: it would
    prepare its gradient reducer and broadcast buffers)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _all_reduce(t: Tensor, op: str, process_group) -> tuple[Tensor, object]:
    pg = group(process_group)
    if pg is None:  # also where torch.distributed is not built in: ReduceOp is not looked up then
        return t, None
    out = t.detach().clone()
    torch.distributed.all_reduce(out, op=getattr(torch.distributed.ReduceOp, op), group=pg)
    return out, pg


def max_(t: Tensor, process_group=None) -> Tensor:
    """The element-wise maximum over ranks (a new tensor; ``t`` itself when there is one process)."""
    return _all_reduce(t, "MAX", process_group)[0]


def mean(t: Tensor, process_group=None) -> Tensor:
    """The element-wise mean over ranks (a new tensor; ``t`` itself when there is one process)."""
    total, pg = _all_reduce(t, "SUM", process_group)
    return total if pg is None else total / torch.distributed.get_world_size(pg)


_checked_counts: set[tuple[int, int]] = set()


def gather_rows(t: Tensor, process_group=None) -> Tensor:
    """Every rank's rows of ``t`` concatenated in rank order. All ranks must hold the same number of rows
    (checked once per count, with a clear error instead of a hang)."""
    pg = group(process_group)
    if pg is None:
        return t
    key = (id(pg), t.shape[0])
    if key not in _checked_counts:
        counts = [None] * torch.distributed.get_world_size(pg)
        torch.distributed.all_gather_object(counts, int(t.shape[0]), group=pg)
        if len(set(counts)) != 1:
            raise ValueError(f"a quantile radius over ranks needs the same number of samples on every rank, got "
                             f"{counts}; use reduce='max' (exact for any split) or even per-rank batches")
        _checked_counts.add(key)
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size(pg))]
    torch.distributed.all_gather(parts, t.detach().contiguous(), group=pg)
    return torch.cat(parts)


def broadcast_int(value: int, process_group=None) -> int:
    """Rank 0's ``value`` on every rank (a host integer: called once, at set-up, not in a step)."""
    pg = group(process_group)
    if pg is None:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=torch.distributed.get_global_rank(pg, 0), group=pg)
    return int(box[0])


# --------------------------------------------------------------------------------------------------
# DTensor (FSDP2) shards


@functools.cache
def _dtensor_type():
    """DTensor, or None for a torch built without distributed (looked up once: the import machinery cost
    microseconds per tensor on every step)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_sharded(t) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter, its gradient or optimizer state)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def any_sharded(ts) -> bool:
    cls = _dtensor_type()
    return cls is not None and any(isinstance(t, cls) for t in ts)


def local(t):
    """The local shard of a DTensor (the very tensor the DTensor holds, so in-place writes reach the parameter);
    any other tensor (or None) as it is."""
    return t._local_tensor if is_sharded(t) else t


def locals_(ts) -> list:
    return [local(t) for t in ts]


@dataclass(frozen=True)
class ShardLayout:
    """Where a local shard sits in its full tensor: flat elements [offset, offset + local numel) of ``numel``
    (row-major), and the process groups whose ranks hold the other shards (empty: the shard is the whole)."""

    offset: int
    numel: int
    groups: tuple


def layout(t) -> ShardLayout:
    """The :class:`ShardLayout` of ``t``: a DTensor sharded along dim 0 over any mesh dimensions and replicated
    over the others (FSDP2, HSDP), or a plain tensor (the whole tensor). Other placements raise
    ``NotImplementedError`` naming them."""
    if not is_sharded(t):
        return ShardLayout(0, t.numel(), ())
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = t.device_mesh, t.placements
    for pl in placements:
        if not (isinstance(pl, Replicate) or (type(pl) is Shard and pl.dim == 0)):
            raise NotImplementedError(f"stabkernels supports DTensors sharded along dim 0 (FSDP2) or replicated; "
                                      f"got placements {placements} for a tensor of shape {tuple(t.shape)}")
    _, offsets = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    row = math.prod(t.shape[1:]) if t.dim() > 0 else 1
    groups = tuple(mesh.get_group(d) for d, pl in enumerate(placements) if isinstance(pl, Shard))
    return ShardLayout(offsets[0] * row if t.dim() > 0 else 0, t.numel(), groups)


def reshard(model) -> None:
    """Frees the gathered parameters of every FSDP2 module of ``model``. FSDP2 keeps the root's parameters
    gathered after a forward (the backward needs them at once); after a probe forward (no backward) they would
    stay gathered, and later forwards would use them instead of gathering the shards the optimizer wrote."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def whole(shard: Tensor, like) -> Tensor:
    """The full tensor whose local shard is ``shard``, sharded as the DTensor ``like`` is (an all-gather);
    ``shard`` itself when ``like`` is not a DTensor."""
    if not is_sharded(like):
        return shard
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(shard, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()


def sum_shards(values: Tensor, tensors) -> Tensor:
    """``values[i, ...]``, a partial sum over the local shard of ``tensors[i]``, summed over the ranks that hold
    that tensor's shards: one all-reduce per distinct group (one under FSDP2). Plain tensors' entries and a
    single process are left as they are."""
    by_groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups = layout(t).groups
        if groups and any(torch.distributed.get_world_size(g) > 1 for g in groups):
            by_groups.setdefault(groups, []).append(i)
    if not by_groups:
        return values
    out = values.clone()
    for groups, idx in by_groups.items():
        rows = torch.tensor(idx, device=values.device)
        part = out.index_select(0, rows)
        for g in groups:
            torch.distributed.all_reduce(part, group=g)
        out.index_copy_(0, rows, part)
    return out
