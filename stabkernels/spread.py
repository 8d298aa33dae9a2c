"""Logit-spread family (SPEC 2): spreads of directional logit derivatives and the softmax radius.

The op pattern every family follows:
  1. ``torch.ops.stabkernels.<op>``: one schema, defined once with :func:`stabkernels._library.define_op`,
     a fake kernel for torch.compile, and a trailing ``backend`` argument naming the implementation;
  2. one implementation per backend, registered with :func:`stabkernels.backend.register`; the ``torch``
     one is the reference every other backend is tested against;
  3. a public function that validates its inputs, resolves ``backend="auto"`` and calls the op.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import backend as _backend
from ._checks import acc_dtype, check_float_tensor
from ._library import define_op

# --------------------------------------------------------------------------------------------------
# row_spread


def _row_spread_fake(x: Tensor, backend: str) -> Tensor:
    return x.new_empty(x.shape[0], dtype=acc_dtype(x.dtype))


# Per-row max - min of an (N, C) tensor; float32 result (float64 for float64 input).
_row_spread_op = define_op("row_spread", "(Tensor x, str backend) -> Tensor", _row_spread_fake)


@_backend.register("row_spread", "torch")
def row_spread_reference(x: Tensor) -> Tensor:
    """Reference: upcast, then ``amax - amin`` per row (NaN propagates, as in torch.amax)."""
    xa = x.to(acc_dtype(x.dtype))
    return xa.amax(dim=1) - xa.amin(dim=1)


@_backend.register("row_spread", "cpp")
def _row_spread_cpp(x: Tensor) -> Tensor:
    return torch.ops.stabkernels_C.row_spread(x)


@_backend.register("row_spread", "cuda")
def _row_spread_cuda(x: Tensor) -> Tensor:
    return torch.ops.stabkernels_C.row_spread(x)


@_backend.register("row_spread", "triton")
def _row_spread_triton(x: Tensor) -> Tensor:
    from .triton import spread as kernels

    return kernels.row_spread(x)


def _reduce_spreads(spreads: Tensor, reduce) -> Tensor:
    """Applies ``reduce`` ("none", "max" or a quantile in [0, 1]) to per-row spreads."""
    if reduce == "none":
        return spreads
    if spreads.numel() == 0:
        return spreads.new_zeros(())
    if reduce == "max":
        return spreads.amax()
    return torch.quantile(spreads, float(reduce))


def _check_reduce(reduce) -> None:
    if reduce in ("none", "max"):
        return
    if isinstance(reduce, bool) or not isinstance(reduce, (int, float)):
        raise ValueError(f"reduce must be 'none', 'max' or a quantile q in [0, 1], got {reduce!r}")
    if not 0.0 <= float(reduce) <= 1.0:
        raise ValueError(f"reduce as a quantile must lie in [0, 1], got {reduce}")


def row_spread(x: Tensor, reduce="max", *, backend: str = "auto") -> Tensor:
    """Spread of each row of ``x``: ``max_k x[i, k] - min_k x[i, k]`` (SPEC 2.1).

    ``x`` holds tangent logits a_k(x_i; v), one row per sample, one column per class; the per-sample spread
    Delta(x_i) bounds the softmax convergence radius along v by ``pi / Delta`` (SPEC 2.2).

    Args:
        x: (N, C) float tensor (float32/float64/float16/bfloat16), any strides, C >= 1.
        reduce: ``"none"`` for the (N,) per-row spreads, ``"max"`` for their maximum (0-d), or a float q in
            [0, 1] for their q-quantile (linear interpolation, as ``torch.quantile``).
        backend: ``"auto"`` or one of ``stabkernels.backend.BACKENDS``.

    Returns:
        float32 (float64 for float64 ``x``); compiled backends read ``x`` once with fp32 (fp64) math.
        N = 0 gives an empty tensor for ``"none"`` and 0 otherwise; C = 1 gives zeros. A NaN in a row makes
        that row's spread NaN, and so the ``"max"`` and quantile results too.
    """
    check_float_tensor(x, "x", ndim=2)
    if x.shape[1] == 0:
        raise ValueError(f"x must have at least one column (class), got shape {tuple(x.shape)}")
    _check_reduce(reduce)
    b = _backend.resolve("row_spread", backend, x.device)
    return _reduce_spreads(_row_spread_op(x, b), reduce)
