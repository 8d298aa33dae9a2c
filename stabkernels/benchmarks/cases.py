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


def gpt2_weight_shapes(quick: bool) -> list[tuple[int, int]]:
    """Weight matrices of a GPT-2-small-like stack: 12 layers x {768x2304, 768x768, 768x3072, 3072x768}."""
    d, layers = (128, 2) if quick else (768, 12)
    return [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * layers


def spectral_cases(device: str, quick: bool) -> Iterator[Case]:
    import torch.nn.functional as F

    from .. import spectral
    from ..optim import PSS

    shapes = gpt2_weight_shapes(quick)
    label = f"gpt2{'-quick' if quick else ''}:{len(shapes)} mats"
    mats = [torch.randn(m, n, device=device) for m, n in shapes]
    nbytes = sum(w.numel() * w.element_size() for w in mats)
    us, vs = spectral.init_power_vectors(mats, torch.Generator().manual_seed(0))

    def torch_loop():
        for w, v in zip(mats, vs):
            u = F.normalize(torch.mv(w, v), dim=0, eps=1e-12)
            F.normalize(torch.mv(w.t(), u), dim=0, eps=1e-12)

    def clone():
        for w in mats:
            w.clone()

    candidates = {b: (lambda b=b: spectral.power_iteration_(mats, us, vs, 1, check_finite=False, backend=b))
                  for b in kernel_backends("power_iteration_", device)}
    candidates["ref:clone-same-bytes"] = clone
    yield Case(op="power_iteration_", shape=label, dtype="float32", nbytes=nbytes, baseline=torch_loop,
               baseline_name="per-matrix loop: mv, normalize, mv, normalize", candidates=candidates)

    # Optimizer step time (gradients fixed, no forward/backward): PSS around AdamW(foreach) against plain.
    def make_params():
        g = torch.Generator().manual_seed(1)
        ps = [torch.nn.Parameter(torch.randn(m, n, generator=g).to(device) * 0.02) for m, n in shapes]
        ps += [torch.nn.Parameter(torch.zeros(m, device=device)) for m, _ in shapes]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(device) * 1e-3
        return ps

    plain = torch.optim.AdamW(make_params(), lr=1e-4, foreach=True)
    quiet = PSS(torch.optim.AdamW(make_params(), lr=1e-4, foreach=True), trigger=None)
    fired = PSS(torch.optim.AdamW(make_params(), lr=1e-4, foreach=True), trigger=None, every=1)
    step_bytes = sum(p.numel() * 4 for g in plain.param_groups for p in g["params"])
    yield Case(op="pss_adamw_step", shape=label, dtype="float32", nbytes=step_bytes, baseline=plain.step,
               baseline_name="torch.optim.AdamW(foreach=True).step()",
               candidates={"pss-untriggered": quiet.step, "pss-triggered": fired.step})


FAMILIES: dict[str, Callable[[str, bool], Iterator[Case]]] = {
    "spread": spread_cases,
    "spectral": spectral_cases,
}
