"""Diagnostics: read-only reports on a model or an optimizer.

- :func:`spectral_report`: per-layer sigma_1, stable rank and Frobenius norm (SPEC 1).
- kappa(V) of the optimizer's update operator (SPEC 5): :func:`kappa_momentum`, :func:`kappa_adam_bound`,
  :func:`kappa_dense`, :func:`top_hessian_eigenvalues`, :class:`InstabilityMonitor`.
"""
from .kappa import (InstabilityMonitor, KappaResult, MonitorRecord, hessian, kappa_adam_bound, kappa_dense,
                    kappa_momentum, kappa_of, top_hessian_eigenvalues, update_operator)
from .spectral import SpectralTable, spectral_report

__all__ = ["InstabilityMonitor", "KappaResult", "MonitorRecord", "SpectralTable", "hessian", "kappa_adam_bound",
           "kappa_dense", "kappa_momentum", "kappa_of", "spectral_report", "top_hessian_eigenvalues",
           "update_operator"]
