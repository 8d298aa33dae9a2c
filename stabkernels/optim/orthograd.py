"""OrthoGrad ("⊥Grad", SPEC 4): the gradient component along each weight tensor is removed before the wrapped
optimizer steps, keeping the gradient's norm."""
from __future__ import annotations

from typing import Callable

import torch

from .. import directional
from ._wrapper import OptimizerWrapper


class OrthoGrad(OptimizerWrapper):
    """Wraps any optimizer; before each step every gradient g of a parameter w becomes
    g_perp |g| / |g_perp| with g_perp = g - (w.g / w.w) w (:func:`stabkernels.orthograd_`, fused)::

        opt = OrthoGrad(torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0))

    (the grokking paper's setup). The wrapped optimizer's param groups and state are shared, so LR schedulers
    and GradScaler work on the wrapper."""

    state_kind = "OrthoGrad"

    def __init__(self, optimizer: torch.optim.Optimizer, *, backend: str = "auto"):
        super().__init__(optimizer)
        self.backend = backend

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        directional.orthograd_(self.params(), backend=self.backend)
        self.optimizer.step()
        return loss
