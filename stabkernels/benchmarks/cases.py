"""Benchmark cases of every family. A case names the op, the shape, the dtype, the bytes one pass over its
inputs moves, the torch baseline it must beat, and one callable per backend that serves it here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .. import backend as _backend


@dataclass
class Case:
    op: str
    shape: str
    dtype: str
    nbytes: int  # bytes one pass over the inputs moves: GB/s = nbytes / time
    baseline: Callable[[], object]
    candidates: dict[str, Callable[[], object]] = field(default_factory=dict)
    baseline_name: str = "torch"
    note: str = ""


def kernel_backends(op: str, device: str) -> list[str]:
    """Compiled backends that serve ``op`` natively on ``device`` (the Triton interpreter is not timed)."""
    names = ("cpp",) if device == "cpu" else ("cuda", "triton")
    return [b for b in names if _backend.why_unavailable(b, device, op) is None]


def spread_cases(device: str, quick: bool) -> Iterator[Case]:
    from .. import spread

    shapes = [(256, 4000)] if quick else [(2048, 32000)]
    for n, c in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(n, c, device=device, dtype=dtype)
            yield Case(
                op="row_spread", shape=f"{n}x{c}", dtype=str(dtype).replace("torch.", ""),
                nbytes=x.numel() * x.element_size(),
                baseline=lambda x=x: (x.amax(1) - x.amin(1)).max(),
                baseline_name="(x.amax(1) - x.amin(1)).max()",
                candidates={b: (lambda x=x, b=b: spread.row_spread(x, "max", backend=b))
                            for b in kernel_backends("row_spread", device)},
            )


FAMILIES: dict[str, Callable[[str, bool], Iterator[Case]]] = {
    "spread": spread_cases,
}
