"""Optimizers: thin ``torch.optim``-style classes over the kernel families.

- :class:`PSS`, :class:`PSSAdamW`: spectral smoothing of weight matrices on trigger steps (SPEC 1).
- :class:`RadiusController`, :class:`RadiusAdamW`, :class:`RadiusSGD`: every step capped at the softmax
  convergence radius along it (SPEC 2).
"""
from .pss import PSS, PSSAdamW, PSSReport
from .radius import RadiusAdamW, RadiusController, RadiusProbe, RadiusReport, RadiusSGD

__all__ = ["PSS", "PSSAdamW", "PSSReport", "RadiusAdamW", "RadiusController", "RadiusProbe", "RadiusReport",
           "RadiusSGD"]
