"""Directional family (SPEC 3.3, 4): random directions generated inside the kernels, perturbations with
nothing to undo, K directional derivatives in one read of the gradients, and the OrthoGrad projection.

The direction stream (keys, Philox4x32-10, float32 Box-Muller, per-tensor unit norm) is specified, with its keys
and constants, in :mod:`stabkernels._stream` (docs/spec.md 3.4); its torch reference is :mod:`.reference`.

Modules: :mod:`.api` (the public functions ``random_directions``, ``perturb``, ``directional_dots``,
``orthograd_``), :mod:`.ops` (the ops' schemas, fake kernels and torch references), :mod:`.sharded` (the DTensor
variants), :mod:`.keys` (the stream's keys where each backend reads them), :mod:`.reference` (the stream's torch
reference). This package re-exports their public names and the stream's.
"""
from .._stream import (COS_COEFS, LN2, LOG_COEFS, MASK32, MASK64, PI_OVER_4, SIN_COEFS, SQRT2, key_table, signed64,
                       splitmix64, splitmix64_tensor, stream_key)
from .api import directional_dots, orthograd_, perturb, random_directions
from .keys import device_key_table
from .ops import (directional_dots_reference, orthograd_reference, perturb_reference, random_directions_reference,
                  shard_normals_reference)
from .reference import box_muller, philox4x32_10, sqrt_rn, stream_normals, unit_scale

__all__ = [
    "directional_dots", "orthograd_", "perturb", "random_directions",
    "device_key_table",
    "directional_dots_reference", "orthograd_reference", "perturb_reference", "random_directions_reference",
    "shard_normals_reference",
    "box_muller", "philox4x32_10", "sqrt_rn", "stream_normals", "unit_scale",
    # the stream's specification (stabkernels._stream)
    "COS_COEFS", "LN2", "LOG_COEFS", "MASK32", "MASK64", "PI_OVER_4", "SIN_COEFS", "SQRT2", "key_table", "signed64",
    "splitmix64", "splitmix64_tensor", "stream_key",
]
