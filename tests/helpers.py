"""Shared test helpers: which backends run here, dtype tolerances, odd shapes and layouts."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stabkernels import backend

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ODD_SHAPES = [(1, 1), (7, 100), (257, 33)]
HAS_CUDA = torch.cuda.is_available()


class DispatchedOps(TorchDispatchMode):
    """The ops dispatched while active, in order: ``names`` ("adam_step_") and ``qualified`` ("aten.full")."""

    def __init__(self):
        super().__init__()
        self.names, self.qualified = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        self.qualified.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_forwards(model: torch.nn.Module):
    """Yields a list that gets one entry per forward of ``model`` run inside the block."""
    calls = []
    hook = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        yield calls
    finally:
        hook.remove()


def backend_params(op: str, devices=("cpu", "cuda")):
    """pytest params (backend, device) for every backend of `op` on each device; a backend that cannot
    run here is skipped with its reason (the cpp backend is required by test_ext when make test runs)."""
    params = []
    for dev in devices:
        for b in backend.BACKENDS:
            if dev == "cpu" and b == "cuda" or dev == "cuda" and b == "cpp":
                continue
            if dev == "cuda" and not HAS_CUDA:
                reason = "no CUDA device"
            else:
                reason = backend.why_unavailable(b, dev, op)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param(b, dev, id=f"{b}-{dev}", marks=marks))
    return params


def layouts(x: torch.Tensor):
    """The same values of a 2-D tensor as: contiguous, column-major, a strided slice of a larger tensor,
    and (for one-row tensors) an expanded view with stride 0."""
    out = {"contiguous": x, "column_major": x.t().contiguous().t()}
    big = torch.zeros(x.shape[0] * 2, x.shape[1] * 3, dtype=x.dtype, device=x.device)
    big[::2, ::3] = x
    out["strided"] = big[::2, ::3]
    if x.shape[0] == 1:
        out["expanded"] = x[0].expand(3, -1)
    return out


def rtol_for(dtype: torch.dtype) -> float:
    """Relative tolerance of fp32 (fp64) math on values stored in `dtype`, against a float64 reference."""
    return 1e-12 if dtype == torch.float64 else 1e-6
