"""Reading device values on the host without stalling the step: the lagged read-back.

An optimizer step must not wait for the device (no ``.item()``, ``float(t)``, ``bool(t)`` on a CUDA tensor).
Decisions that need a number on the host (PSS's trigger, S-Adam's dropped-probe warning) are therefore taken
one step late: the step that computes the value queues a non-blocking copy into pinned host memory and
records an event; a later step reads the copy once the event has completed. On a CPU tensor the value is on
the host already and is read directly (a copy, so later in-place updates do not change it).
"""
from __future__ import annotations

import torch
from torch import Tensor


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph (no host work may depend on it)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class DeferredRead:
    """A snapshot of ``t`` that the host reads later.

    ``ready()`` says whether the copy has arrived (never blocks); ``values()`` returns the snapshot as a list
    of Python numbers, waiting for the copy only if it has not arrived yet (then the host was more than a step
    ahead of the device, and the wait costs the device nothing)."""

    __slots__ = ("_host", "_event")

    def __init__(self, t: Tensor):
        t = t.detach().reshape(-1)
        if t.device.type == "cuda":
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = t.clone()
            self._event = None

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def values(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()
