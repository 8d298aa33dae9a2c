"""Per-parameter scratch tensors an optimizer reuses from step to step, so its hot path allocates nothing."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import distributed


class ScratchBuffers:
    """One contiguous tensor per parameter, made on first use and made again only when the parameter's shape,
    dtype or device changes (``model.double()`` or ``.to(device)`` keep the Parameter objects)."""

    def __init__(self) -> None:
        self._buffers: dict[int, Tensor] = {}

    def like(self, p: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """The scratch tensor of ``p``: its shape and device, ``dtype`` (``p``'s own if None); contents undefined.
        For a DTensor (FSDP2) parameter, the shape of its local shard."""
        key = id(p)
        p = distributed.local(p)
        dtype = p.dtype if dtype is None else dtype
        s = self._buffers.get(key)
        if s is None or s.shape != p.shape or s.dtype != dtype or s.device != p.device:
            s = torch.empty(p.shape, dtype=dtype, device=p.device)
            self._buffers[key] = s
        return s
