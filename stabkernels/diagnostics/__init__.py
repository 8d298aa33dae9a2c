"""Diagnostics: read-only reports on a model or an optimizer.

- :func:`spectral_report`: per-layer sigma_1, stable rank and Frobenius norm (SPEC 1).
"""
from .spectral import SpectralTable, spectral_report

__all__ = ["SpectralTable", "spectral_report"]
