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
"""
from __future__ import annotations

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
