"""Multi-tensor launch plans (docs/architecture.md, "Where launch plans live"): the metadata one kernel launch
needs to walk many tensors, built once per tensor list and kept on the tensors' device.

A grouped launch needs, per dtype group, the tensors' addresses (one int64 table per tensor list), their sizes,
and which chunk of which tensor each program handles. Built per call, these tables cost host time that grows
with the model (one entry per chunk) and a host-to-device copy that waits for the device and cannot be captured
in a CUDA graph. Here they are split by what they depend on and cached:

* a :class:`Layout` (dtype groups, sizes, chunk tables, the groups' global indices) depends only on the
  tensors' dtypes and sizes and the chunk length;
* an address table depends only on the data pointers.

Each is keyed by per-tensor metadata (host work proportional to the number of tensors, never to the number of
elements) and reused while the key is unchanged: new storage (a reallocated gradient, ``model.to()``) or a new
shape gives a new key and a new table, never a stale one. Only a cache miss copies host data to the device.

Every GPU backend takes its tables from here (the Triton kernels directly; the CUDA glue keeps its own C++
cache of the same key in csrc/cuda/launch_plan.cpp, since it builds its tables in C++).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch
from torch import Tensor


class _LRU:
    """A small least-recently-used map; ``get`` builds a missing entry with ``build()``."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict = OrderedDict()
        self.builds = 0  # misses, for tests and the host-cost benchmark

    def get(self, key: Hashable, build: Callable):
        entry = self._entries.get(key)
        if entry is None:
            entry = build()
            self.builds += 1
            self._entries[key] = entry
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return entry

    def clear(self) -> None:
        self._entries.clear()


_LAYOUTS = _LRU(64)
_ADDRESSES = _LRU(512)
_CONSTANTS = _LRU(256)


def clear() -> None:
    """Drops every cached plan (tests; freeing the device memory they hold)."""
    for c in (_LAYOUTS, _ADDRESSES, _CONSTANTS):
        c.clear()


def builds() -> int:
    """How many tables were built so far (cache misses of every kind)."""
    return _LAYOUTS.builds + _ADDRESSES.builds + _CONSTANTS.builds


def _upload(values, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The one host-to-device copy of this module, on a cache miss (``values``: a list or a CPU tensor): pinned
    and asynchronous on CUDA (the pinned buffer is kept alive by the caching host allocator until the copy has
    run)."""
    host = values.to(dtype) if isinstance(values, Tensor) else torch.tensor(list(values), dtype=dtype)
    if host.numel() == 0:
        host = torch.zeros(1, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class Group:
    """One dtype group of a grouped launch: ``members`` are global indices into the tensor list, in order."""

    dtype: torch.dtype
    members: tuple
    index: Tensor  # members, int64 on the device: device-side scatters of per-tensor results
    numels: Tensor  # int64 per member
    chunk_tensor: Tensor  # per program: the member it works on (position in the group)
    chunk_start: Tensor  # per program: its first unit (element, or Philox counter)
    num_chunks: int
    first_chunk: Tensor  # int64 per member: its first program (programs of one member are consecutive)
    chunk_count: Tensor  # int64 per member: its number of programs

    @property
    def size(self) -> int:
        return len(self.members)


Layout = tuple  # of Group


def _build_layout(dtypes, numels, starts, chunk, unit, device) -> Layout:
    groups: dict = {}
    for i, d in enumerate(dtypes):
        groups.setdefault(d, []).append(i)
    out = []
    for dtype, members in groups.items():
        begin = [starts[i] if starts else 0 for i in members]
        lo = [b // unit for b in begin]
        hi = [max(-(-(b + numels[i]) // unit), l + 1) for b, i, l in zip(begin, members, lo)]  # >= 1 program each
        count = torch.tensor([-(-(h - l) // chunk) for l, h in zip(lo, hi)], dtype=torch.int64)
        first = torch.cumsum(count, 0) - count
        # per program (vectorised: 6.5M programs for a 7B model's stream take 0.1 s, not seconds of Python)
        chunk_tensor = torch.repeat_interleave(torch.arange(len(members)), count)
        chunk_start = ((torch.arange(int(count.sum())) - first.repeat_interleave(count)) * chunk
                       + torch.tensor(lo, dtype=torch.int64).repeat_interleave(count))
        up = lambda t: _upload(t, torch.int64, device)  # noqa: E731
        out.append(Group(dtype, tuple(members), up(torch.tensor(members)), up(torch.tensor([numels[i] for i in members])),
                         up(chunk_tensor), up(chunk_start), int(count.sum()), up(first), up(count)))
    return tuple(out)


def layout(tensors: Sequence[Tensor], chunk: int, *, unit: int = 1, dtypes: Sequence[torch.dtype] | None = None,
           starts: Sequence[int] | None = None, sizes: Sequence[int] | None = None) -> Layout:
    """The dtype groups of ``tensors`` (by ``dtypes`` when given, e.g. the outputs' dtypes) with chunk tables:
    each tensor's units (elements, or ``unit`` elements each) ``[start // unit, ceil((start + numel) / unit))``
    cut into programs of ``chunk`` units (at least one program per tensor, so empty tensors get their results
    written). ``starts`` (default 0) are per-tensor element offsets (a shard's place in its stream); ``sizes``
    replace the numels (e.g. a matrix's rows, for row blocks)."""
    dtypes = tuple(t.dtype for t in tensors) if dtypes is None else tuple(dtypes)
    numels = tuple(t.numel() for t in tensors) if sizes is None else tuple(sizes)
    starts = tuple(starts) if starts is not None else ()
    device = tensors[0].device
    key = (device, chunk, unit, dtypes, numels, starts)
    return _LAYOUTS.get(key, lambda: _build_layout(dtypes, numels, starts, chunk, unit, device))


def cached(key: Hashable, build: Callable):
    """Any other launch table, cached like the layouts: ``key`` must determine what ``build()`` returns and must
    be cheap (per-tensor metadata)."""
    return _LAYOUTS.get(("cached",) + tuple(key), build)


def upload(values: Sequence, device: torch.device, dtype: torch.dtype = torch.int64) -> Tensor:
    """A table for :func:`cached` builders (the only host-to-device copy, made on a cache miss)."""
    return _upload(values, dtype, device)


def addresses(tensors: Sequence[Tensor], group: Group) -> Tensor:
    """The int64 data addresses of ``tensors[i]`` for the group's members, on the device (cached by address)."""
    ptrs = tuple(tensors[i].data_ptr() for i in group.members)
    device = group.index.device
    return _ADDRESSES.get((device, ptrs), lambda: _upload(ptrs, torch.int64, device))


def constants(values: Sequence[float], device: torch.device, dtype: torch.dtype = torch.float64) -> Tensor:
    """Hyper-parameters that change rarely (betas, eps, weight decay) as a device tensor, cached by value: a
    kernel reads them in float64 (Triton passes a Python float as float32) and no step copies them again."""
    values = tuple(float(v) for v in values)
    return _CONSTANTS.get((device, dtype, values), lambda: _upload(values, dtype, device))


def arange(n: int, device: torch.device) -> Tensor:
    """0 .. n-1 as int64 on the device (generated there; cached)."""
    return _CONSTANTS.get((device, "arange", n), lambda: torch.arange(n, dtype=torch.int64, device=device))


def device_guard(device: torch.device):
    """Makes ``device`` current for a launch on it (Triton launches on the current device, whatever the
    tensors' device); nothing on CPU."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
