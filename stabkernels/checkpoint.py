"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP) for a model and any optimizer of this
package (or of torch), under FSDP2, DDP or one process.

DCP loads *into* a state dict whose tensors already exist, but an optimizer's state appears only at its first
step, so a freshly built optimizer has nothing to load into (torch's ``get_state_dict`` helpers take a zero
step for that, which would advance our optimizers' counters, EMAs and probe streams, and they keep only the
``state``/``param_groups`` keys). :func:`save` therefore also stores the optimizer state dict's *layout* (its
nesting, numbers and strings, and for each tensor its shape, dtype and placements), and :func:`load` rebuilds
the state dict from it, lets DCP fill the tensors (DTensors stay sharded: each rank reads its shards), and
hands it to ``load_state_dict``.
"""
from __future__ import annotations

import pickle

import torch
from torch import Tensor, nn

from . import distributed

LAYOUT_KEY = "stabkernels_optimizer_layout"


def _describe(obj):
    """The layout of a state dict: tensors become ("tensor", ...) / ("dtensor", ...) descriptors."""
    if isinstance(obj, dict):
        return {k: _describe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_describe(v) for v in obj)
    if distributed.is_sharded(obj):
        return ("dtensor", tuple(obj.shape), obj.dtype, tuple(obj.placements))
    if isinstance(obj, Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype, str(obj.device))
    return obj


def _is_descriptor(obj) -> bool:
    return isinstance(obj, tuple) and len(obj) == 4 and obj[0] in ("tensor", "dtensor")


def _build(layout, mesh):
    """A state dict of the given layout with zero tensors for DCP to load into."""
    if _is_descriptor(layout):
        kind, shape, dtype, where = layout
        if kind == "tensor":
            return torch.zeros(shape, dtype=dtype, device=where)
        if mesh is None:
            raise ValueError("the checkpoint holds DTensor optimizer state, but the model has no DTensor parameters: "
                             "load it into the model sharded as it was saved (fully_shard before load)")
        from torch.distributed.tensor import zeros

        return zeros(shape, dtype=dtype, device_mesh=mesh, placements=list(where))
    if isinstance(layout, dict):
        return {k: _build(v, mesh) for k, v in layout.items()}
    if isinstance(layout, (list, tuple)):
        return type(layout)(_build(v, mesh) for v in layout)
    return layout


def _mesh(model: nn.Module):
    for p in model.parameters():
        if distributed.is_sharded(p):
            return p.device_mesh
    return None


def save(checkpoint_id, model: nn.Module, optimizer: torch.optim.Optimizer, *, process_group=None) -> None:
    """Saves ``model.state_dict()`` and ``optimizer.state_dict()`` with DCP (sharded tensors as shards) into the
    directory ``checkpoint_id``. Every rank calls it. Call ``flush()`` first on a lagged PSS if its pending
    smoothing should be applied before saving (else it is saved as pending and applied after loading)."""
    import torch.distributed.checkpoint as dcp

    osd = optimizer.state_dict()
    # one opaque leaf (DCP would flatten a dict into keys of its own)
    dcp.save({"model": model.state_dict(), "optimizer": osd, LAYOUT_KEY: pickle.dumps(_describe(osd))},
             checkpoint_id=checkpoint_id, process_group=process_group)


def load(checkpoint_id, model: nn.Module, optimizer: torch.optim.Optimizer, *, process_group=None) -> None:
    """Loads what :func:`save` wrote into ``model`` and ``optimizer``, built (and sharded) as for a fresh run,
    before their first step; training then continues exactly as the saved run would have."""
    import torch.distributed.checkpoint as dcp

    box = {LAYOUT_KEY: None}
    dcp.load(box, checkpoint_id=checkpoint_id, process_group=process_group,
             planner=dcp.DefaultLoadPlanner(allow_partial_load=True))  # a missing layout stays None
    if box[LAYOUT_KEY] is None:
        raise ValueError(f"{checkpoint_id} was not written by stabkernels.checkpoint.save (no optimizer layout)")
    state = {"model": model.state_dict(), "optimizer": _build(pickle.loads(box[LAYOUT_KEY]), _mesh(model))}
    dcp.load(state, checkpoint_id=checkpoint_id, process_group=process_group)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
