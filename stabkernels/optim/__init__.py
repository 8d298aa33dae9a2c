"""Optimizers: thin ``torch.optim``-style classes over the kernel families.

- :class:`PSS`, :class:`PSSAdamW`: spectral smoothing of weight matrices on trigger steps (SPEC 1).
"""
from .pss import PSS, PSSAdamW, PSSReport

__all__ = ["PSS", "PSSAdamW", "PSSReport"]
