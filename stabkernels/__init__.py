"""stabkernels: fused kernels for training stability in PyTorch.

Families (see the README and SPEC):
  * logit spread: :func:`row_spread` (more to come: tangent spreads, softmax radius)

Every op takes ``backend="auto" | "torch" | "cpp" | "triton" | "cuda"``; :func:`info` reports which
backends serve each op on this machine.
"""
from . import _ext  # noqa: F401  (loads the compiled extension if it can)
from . import backend
from ._info import info
from .backend import BackendUnavailable
from .spread import row_spread

__version__ = "0.1.0"
__all__ = ["BackendUnavailable", "backend", "info", "row_spread", "__version__"]
