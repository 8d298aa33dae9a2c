"""Spectral family (SPEC 1): grouped power iteration, stable rank, top singular triplets and in-place
smoothing of the top of weight matrices' singular spectra (the PSS method).

Every weight with ndim >= 2 is viewed as a matrix (out_features, rest), like
``torch.nn.utils.parametrizations.spectral_norm``: a conv weight (O, I, kh, kw) becomes (O, I*kh*kw).

Modules: :mod:`.ops` (the ops' schemas, fake kernels, torch references and public functions: ``sq_norms``,
``init_power_vectors``, ``power_iteration_``, ``stable_rank``), :mod:`.sharded` (the power iteration of DTensor
shards), :mod:`.rsvd` (``top_singular``, randomized subspace iteration), :mod:`.smoothing` (the smoothing rules, the
rank-k update and ``spectral_smooth_``), :mod:`.matrices` (weights viewed as matrices, validated). This package
re-exports their public names.
"""
from .matrices import as_matrix
from .ops import (init_power_vectors, power_iteration_, power_iteration_reference, sq_norms, sq_norms_reference,
                  stable_rank)
from .rsvd import top_singular
from .smoothing import RULES, SpectralReport, smooth_values, spectral_smooth_

__all__ = ["RULES", "SpectralReport", "as_matrix", "init_power_vectors", "power_iteration_",
           "power_iteration_reference", "smooth_values", "spectral_smooth_", "sq_norms", "sq_norms_reference",
           "stable_rank", "top_singular"]
