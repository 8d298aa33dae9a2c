"""``spectral_report(model)``: sigma_1, stable rank and Frobenius norm of every weight matrix of a model."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import spectral


@dataclass
class SpectralTable:
    """One row per weight matrix: ``names``, ``shapes`` and (L,) float64 tensors ``sigma``, ``stable_rank``,
    ``frobenius``."""

    names: list[str]
    shapes: list[tuple]
    sigma: torch.Tensor
    stable_rank: torch.Tensor
    frobenius: torch.Tensor

    def rows(self) -> list[dict]:
        return [{"name": n, "shape": s, "sigma": float(a), "stable_rank": float(b), "frobenius": float(c)}
                for n, s, a, b, c in zip(self.names, self.shapes, self.sigma, self.stable_rank, self.frobenius)]

    def __str__(self) -> str:
        w = max([len("layer")] + [len(n) for n in self.names])
        lines = [f"{'layer':<{w}}  {'shape':<18} {'sigma_1':>10} {'stable rank':>12} {'||W||_F':>10}"]
        for r in self.rows():
            shape = "x".join(map(str, r["shape"]))
            lines.append(f"{r['name']:<{w}}  {shape:<18} {r['sigma']:>10.4g} {r['stable_rank']:>12.4g} "
                         f"{r['frobenius']:>10.4g}")
        return "\n".join(lines)


@torch.no_grad()
def spectral_report(model: nn.Module, *, include_embeddings: bool = False, iters: int = 50, seed: int = 0,
                    backend: str = "auto") -> SpectralTable:
    """Per-layer table of sigma_1 (``iters`` power iterations from a seeded random start), stable rank and
    Frobenius norm for every parameter with ndim >= 2 (conv weights as (out, rest)); embedding weights only
    with ``include_embeddings``. Reads the weights, changes nothing."""
    skip = set()
    if not include_embeddings:
        skip = {id(p) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
                for p in m.parameters(recurse=False)}
    named = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2 and id(p) not in skip]
    names = [n for n, _ in named]
    shapes = [tuple(p.shape) for _, p in named]
    n = len(named)
    sigma, sr, fro = (torch.zeros(n, dtype=torch.float64) for _ in range(3))
    by_device: dict[tuple, list[int]] = {}
    for i, (_, p) in enumerate(named):
        by_device.setdefault(p.device, []).append(i)
    gen = torch.Generator().manual_seed(seed)
    for idx in by_device.values():
        mats = [named[i][1].detach() for i in idx]
        us, vs = spectral.init_power_vectors(mats, gen)
        s = spectral.power_iteration_(mats, us, vs, iters, backend=backend)
        sigma[idx] = s.double().cpu()
        sr[idx] = spectral.stable_rank(mats, s, backend=backend).double().cpu()
        fro[idx] = spectral.sq_norms([spectral.as_matrix(m) for m in mats], backend=backend).double().cpu().sqrt()
    return SpectralTable(names, shapes, sigma, sr, fro)
