"""Optimizers: thin ``torch.optim``-style classes over the kernel families.

- :class:`PSS`, :class:`PSSAdamW`: spectral smoothing of weight matrices on trigger steps (SPEC 1).
- :class:`RadiusController`, :class:`RadiusAdamW`, :class:`RadiusSGD`: every step capped at the softmax
  convergence radius along it (SPEC 2).
- :class:`SAdam`: AdamW damped by the instability of random-direction probes (SPEC 3).
- :class:`SkipStep`, :class:`StableAdamW`: skip a step on a loss/gradient-norm spike (OLMo-core's rule, on
  the device); AdamW with per-tensor update clipping (Wortsman et al. 2023).
- :class:`OrthoGrad`: gradients made orthogonal to their weights before any optimizer steps (SPEC 4).
- :class:`QKClip`, :class:`QKClipOptimizer`: attention heads' q/k projection rows scaled down after a step
  whose largest attention logit exceeded a threshold (Kimi K2's QK-clip, SPEC 8.2).
"""
from .pss import PSS, PSSAdamW, PSSReport
from .orthograd import OrthoGrad
from .qkclip import QKClip, QKClipOptimizer, Rows
from .radius import RadiusAdamW, RadiusController, RadiusProbe, RadiusReport, RadiusSGD
from .sadam import SAdam, SAdamReport
from .skipstep import SkipStep, SkipStepReport, StableAdamW

__all__ = ["OrthoGrad", "PSS", "PSSAdamW", "PSSReport", "RadiusAdamW", "RadiusController", "RadiusProbe",
           "RadiusReport", "RadiusSGD", "SAdam", "SAdamReport",
           "SkipStep", "SkipStepReport", "StableAdamW",
           # QK-clip
           "QKClip", "QKClipOptimizer", "Rows"]
