"""Backend selection: which implementation of an op runs for given tensors.

Backends:
  ``torch``   the plain-PyTorch reference (the spec in code; any device, float64-capable)
  ``cpp``     C++ CPU kernels in ``stabkernels._C`` (CPU tensors)
  ``triton``  Triton kernels (CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``)
  ``cuda``    CUDA kernels in ``stabkernels._C`` (CUDA tensors, CUDA builds only)

``backend="auto"`` picks ``cuda``, then ``triton``, then ``torch`` for CUDA tensors and ``cpp``, then ``torch``
for CPU tensors. An explicit backend that cannot run raises :class:`BackendUnavailable` saying why.

Each op module registers its implementations with :func:`register`; nothing else in the package decides
which backend runs.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable

import torch

from . import _ext

BACKENDS = ("torch", "cpp", "triton", "cuda")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}

_impls: dict[str, dict[str, Callable]] = {}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here (not compiled, no triton, wrong device, ...)."""


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` implements ``op`` on ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def deco(fn: Callable) -> Callable:
        _impls.setdefault(op, {})[backend] = fn
        return fn

    return deco


def register_kernels(op: str, triton_module: str, *, cuda: bool = True) -> None:
    """Registers the compiled implementations of ``op``: ``torch.ops.stabkernels_C.<op>`` for ``cpp`` and ``cuda``
    (one C++ schema, a CPU and a CUDA kernel; ``cuda=False`` for an op with no CUDA kernel) and
    ``stabkernels.triton.<triton_module>.<op>`` for ``triton`` (imported at first use, so that importing
    stabkernels never imports triton)."""

    def compiled(*args):
        return getattr(torch.ops.stabkernels_C, op)(*args)

    def triton_kernel(*args):
        return getattr(importlib.import_module(f"stabkernels.triton.{triton_module}"), op)(*args)

    register(op, "cpp")(compiled)
    if cuda:
        register(op, "cuda")(compiled)
    register(op, "triton")(triton_kernel)


def implementation(op: str, backend: str) -> Callable:
    """The function registered for ``op`` on a concrete ``backend``."""
    return _impls[op][backend]


def ops() -> list[str]:
    """Names of all ops with registered implementations."""
    return sorted(_impls)


_triton_status: list[tuple[bool, str]] = []  # filled once; a plain list keeps torch.compile tracing simple


def triton_status() -> tuple[bool, str]:
    """(importable, reason or version). Imports triton once, on first use, never at package import."""
    if not _triton_status:
        if importlib.util.find_spec("triton") is None:
            _triton_status.append((False, "triton is not installed"))
        else:
            try:
                triton = importlib.import_module("triton")
                _triton_status.append((True, triton.__version__))
            except Exception as e:  # a broken install must not break stabkernels
                _triton_status.append((False, f"importing triton failed: {e}"))
    return _triton_status[0]


def triton_interpreted() -> bool:
    """Whether Triton kernels run in the interpreter on CPU tensors (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(backend: str, device: torch.device | str, op: str | None = None) -> str | None:
    """None when ``backend`` can run ``op`` on tensors of ``device``, else the reason it cannot."""
    device = torch.device(device)
    if op is not None and backend not in _impls.get(op, {}):
        return f"{op} has no {backend} implementation"
    if backend == "torch":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs CPU tensors, got a {device.type} tensor"
        if not _ext.loaded:
            return f"the C++ extension is not loaded: {_ext.load_error}"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs CUDA tensors, got a {device.type} tensor"
        if not _ext.loaded:
            return f"the C++/CUDA extension is not loaded: {_ext.load_error}"
        if not _ext.has_cuda_kernels():
            return "the extension was built without CUDA kernels (CPU torch, no toolkit, or STABKERNELS_CUDA=0)"
        return None
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return why
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if triton_interpreted():
                return None
            return "triton runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        return f"triton does not run {device.type} tensors"
    raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")


def resolve(op: str, backend: str, device: torch.device | str) -> str:
    """The concrete backend that runs ``op`` for tensors on ``device``."""
    device = torch.device(device)
    if backend == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            if why_unavailable(candidate, device, op) is None:
                return candidate
        raise BackendUnavailable(f"no backend can run {op} on {device.type} tensors")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    reason = why_unavailable(backend, device, op)
    if reason is not None:
        raise BackendUnavailable(f"backend={backend!r} cannot run {op}: {reason}")
    return backend


def _natural_device(backend: str) -> torch.device:
    if backend in ("cuda",) or (backend == "triton" and not triton_interpreted()):
        return torch.device("cuda")
    return torch.device("cpu")


def status() -> dict[str, dict[str, str]]:
    """For each op and backend: 'yes' or 'no: <reason>' on the backend's natural device."""
    table = {}
    for op in ops():
        row = {}
        for b in BACKENDS:
            dev = _natural_device(b)
            reason = why_unavailable(b, dev, op)
            if reason is None and dev.type == "cuda" and not torch.cuda.is_available():
                reason = "no CUDA device visible"
            row[b] = "yes" if reason is None else f"no: {reason}"
        table[op] = row
    return table
