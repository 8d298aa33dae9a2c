"""stabkernels: fused kernels for training stability in PyTorch.

Families (see the README and SPEC):
  * logit spread: :func:`row_spread`
  * spectral: :func:`power_iteration_`, :func:`stable_rank`, :func:`top_singular`, :func:`spectral_smooth_`,
    :func:`sq_norms`

Every op takes ``backend="auto" | "torch" | "cpp" | "triton" | "cuda"``; :func:`info` reports which
backends serve each op on this machine.
"""
from . import _ext  # noqa: F401  (loads the compiled extension if it can)
from . import backend
from ._info import info
from .backend import BackendUnavailable
from .spectral import (init_power_vectors, power_iteration_, spectral_smooth_, sq_norms, stable_rank,
                       top_singular)
from .spread import row_spread
from . import diagnostics, optim
from .diagnostics import spectral_report

__version__ = "0.1.0"
__all__ = [
    "BackendUnavailable", "backend", "info", "__version__",
    # logit spread
    "row_spread",
    # spectral
    "init_power_vectors", "power_iteration_", "spectral_report", "spectral_smooth_", "sq_norms", "stable_rank",
    "top_singular",
    # subpackages
    "diagnostics", "optim",
]
