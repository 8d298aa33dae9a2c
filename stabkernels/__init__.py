"""stabkernels: fused kernels for training stability in PyTorch.

Families (see the README, docs/optimizers.md and docs/spec.md, which the code cites as "SPEC x.y"):
  * logit spread: :func:`row_spread`, :func:`tangent_spread_linear`, :func:`softmax_radius`,
    :func:`tangent_logits`
  * spectral: :func:`power_iteration_`, :func:`stable_rank`, :func:`top_singular`, :func:`spectral_smooth_`,
    :func:`sq_norms`
  * directional: :func:`random_directions`, :func:`perturb`, :func:`directional_dots`, :func:`orthograd_`
  * losses: :func:`cross_entropy_z_loss`, :func:`stablemax_cross_entropy`, :func:`linear_cross_entropy`;
    :class:`nn.QKLayerNorm`
  * fused optimizer updates: :func:`adam_step_`, :func:`sgd_step_`, :func:`apply_update_`
  * attention: :func:`qk_max_logits` (QK-clip's measurement; :class:`optim.QKClip`)

Every op takes ``backend="auto" | "torch" | "cpp" | "triton" | "cuda"``; :func:`info` reports which
backends serve each op on this machine.
"""
from . import _ext  # noqa: F401  (loads the compiled extension if it can)
from . import backend
from ._info import info
from .backend import BackendUnavailable
from .spectral import (init_power_vectors, power_iteration_, spectral_smooth_, sq_norms, stable_rank,
                       top_singular)
from .directional import directional_dots, orthograd_, perturb, random_directions
from .losses import cross_entropy_z_loss, linear_cross_entropy, stablemax_cross_entropy
from .spread import row_spread, softmax_radius, tangent_spread_linear
from .tangent import tangent_features, tangent_logits
from .update import adam_step_, apply_update_, sgd_step_
from .attention import qk_max_logits
from . import checkpoint, diagnostics, distributed, nn, optim
from .diagnostics import spectral_report

__version__ = "0.1.0"
__all__ = [
    "BackendUnavailable", "backend", "info", "__version__",
    # logit spread
    "row_spread", "softmax_radius", "tangent_features", "tangent_logits", "tangent_spread_linear",
    # directional
    "directional_dots", "orthograd_", "perturb", "random_directions",
    # losses
    "cross_entropy_z_loss", "linear_cross_entropy", "stablemax_cross_entropy",
    # fused optimizer updates
    "adam_step_", "apply_update_", "sgd_step_",
    # spectral
    "init_power_vectors", "power_iteration_", "spectral_report", "spectral_smooth_", "sq_norms", "stable_rank",
    "top_singular",
    # attention
    "qk_max_logits",
    # subpackages
    "checkpoint", "diagnostics", "distributed", "nn", "optim",
]
