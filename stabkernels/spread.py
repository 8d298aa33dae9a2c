"""Logit-spread family (SPEC 2): spreads of directional logit derivatives and the softmax radius.

The op pattern every family follows:
  1. ``torch.ops.stabkernels.<op>``: one schema, defined once with :func:`stabkernels._library.define_op`,
     a fake kernel for torch.compile, and a trailing ``backend`` argument naming the implementation;
  2. one implementation per backend: the ``torch`` reference (registered with
     :func:`stabkernels.backend.register`), which every other backend is tested against, and the compiled
     ones (:func:`stabkernels.backend.register_kernels`: the C++/CUDA op and the Triton kernel);
  3. a public function that validates its inputs, resolves ``backend="auto"`` and calls the op.
"""
from __future__ import annotations

import math

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


_backend.register_kernels("row_spread", "spread")


def reduce_spreads(spreads: Tensor, reduce) -> Tensor:
    """Applies ``reduce`` ("none", "max" or a quantile in [0, 1]) to per-row spreads."""
    if reduce == "none":
        return spreads
    if spreads.numel() == 0:
        return spreads.new_zeros(())
    if reduce == "max":
        return spreads.amax()
    return torch.quantile(spreads, float(reduce))


def check_reduce(reduce) -> None:
    """Raises ValueError unless ``reduce`` is "none", "max" or a quantile q in [0, 1] (shared by the spread ops
    and the radius probe)."""
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
    check_reduce(reduce)
    b = _backend.resolve("row_spread", backend, x.device)
    return reduce_spreads(_row_spread_op(x, b), reduce)


# --------------------------------------------------------------------------------------------------
# tangent_spread_linear: the spread of an output head's tangent logits, never materialised


def _tangent_spread_fake(h, h_dot, weight, weight_dot, bias_dot, backend):
    return h.new_empty(h.shape[0], dtype=acc_dtype(h.dtype))


_tangent_spread_op = define_op(
    "tangent_spread_linear",
    "(Tensor h, Tensor h_dot, Tensor weight, Tensor? weight_dot, Tensor? bias_dot, str backend) -> Tensor",
    _tangent_spread_fake,
)


@_backend.register("tangent_spread_linear", "torch")
def tangent_spread_linear_reference(h, h_dot, weight, weight_dot, bias_dot):
    """Reference: materialise z' = h' W^T + h W'^T + b' (N x V) in fp32/fp64, then max - min per row."""
    acc = acc_dtype(h.dtype)
    z = h_dot.to(acc) @ weight.to(acc).T
    if weight_dot is not None:
        z = z + h.to(acc) @ weight_dot.to(acc).T
    if bias_dot is not None:
        z = z + bias_dot.to(acc)
    return row_spread_reference(z)


_backend.register_kernels("tangent_spread_linear", "spread")


def tangent_spread_linear(h: Tensor, h_dot: Tensor, weight: Tensor, weight_dot: Tensor | None = None,
                          bias_dot: Tensor | None = None, reduce="max", *, backend: str = "auto") -> Tensor:
    """Spread of the tangent logits of a linear output head, reduced inside the kernel (SPEC 2.3).

    For logits z = h W^T + b moving along a direction, the tangent is z' = h' W^T + h W'^T + b'. This returns
    ``reduce`` (as in :func:`row_spread`) of its per-row spreads max_k z'_k - min_k z'_k without ever
    building the (N, V) tangent: the compiled backends sweep the vocabulary in tiles and keep running
    extremes per row (C++: L2-sized tiles, single-threaded GEMM per thread, then the epilogue; Triton:
    ``tl.dot`` in IEEE fp32 per tile; CUDA: cuBLAS per 1024-column chunk and a folding kernel).

    Args:
        h, h_dot: (N, d) features entering the head and their tangent.
        weight, weight_dot: (V, d) head weight and its tangent (None: the head does not move).
        bias_dot: (V,) tangent of the head's bias (None: no bias or it does not move).
        reduce: "none", "max" or a quantile q (see :func:`row_spread`).
    """
    check_float_tensor(h, "h", ndim=2)
    check_float_tensor(h_dot, "h_dot", ndim=2)
    check_float_tensor(weight, "weight", ndim=2)
    if h_dot.shape != h.shape:
        raise ValueError(f"h_dot must have h's shape {tuple(h.shape)}, got {tuple(h_dot.shape)}")
    if weight.shape[1] != h.shape[1]:
        raise ValueError(f"weight must be (V, {h.shape[1]}) for h of shape {tuple(h.shape)}, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (class)")
    tensors = {"h": h, "h_dot": h_dot, "weight": weight}
    if weight_dot is not None:
        check_float_tensor(weight_dot, "weight_dot", ndim=2)
        if weight_dot.shape != weight.shape:
            raise ValueError(f"weight_dot must have weight's shape {tuple(weight.shape)}, got {tuple(weight_dot.shape)}")
        tensors["weight_dot"] = weight_dot
    if bias_dot is not None:
        check_float_tensor(bias_dot, "bias_dot", ndim=1)
        if bias_dot.shape[0] != weight.shape[0]:
            raise ValueError(f"bias_dot must have {weight.shape[0]} elements, got {bias_dot.shape[0]}")
        tensors["bias_dot"] = bias_dot
    if len({t.dtype for t in tensors.values()}) > 1 or len({t.device for t in tensors.values()}) > 1:
        raise ValueError("h, h_dot, weight, weight_dot and bias_dot must share one dtype and device, got "
                         + ", ".join(f"{k}: {t.dtype} on {t.device}" for k, t in tensors.items()))
    check_reduce(reduce)
    b = _backend.resolve("tangent_spread_linear", backend, h.device)
    return reduce_spreads(_tangent_spread_op(h, h_dot, weight, weight_dot, bias_dot, b), reduce)


# --------------------------------------------------------------------------------------------------
# softmax_radius

RADIUS_MODES = ("bound", "binary", "top2")
RADIUS_GUARD = 1e-12


def _reduce_radii(radii: Tensor, reduce) -> Tensor:
    """Aggregates per-sample radii: 'max' instability = the smallest radius; a quantile q of instability =
    the (1 - q)-quantile of radii."""
    if reduce == "none":
        return radii
    if radii.numel() == 0:
        return radii.new_full((), float("inf"))
    if reduce == "max":
        return radii.amin()
    return torch.quantile(radii, 1.0 - float(reduce))


def softmax_radius(tangent_logits: Tensor, logits: Tensor | None = None, labels: Tensor | None = None,
                   mode: str = "bound", reduce="max", *, temperature: float = 1.0, backend: str = "auto") -> Tensor:
    """Convergence radius of the softmax cross-entropy's Taylor expansion along a direction (SPEC 2.2).

    ``tangent_logits`` a (N, C) are the directional derivatives of the logits along a unit direction v; the
    radius is the distance t along v within which the loss's expansion converges.

    Modes:
      - ``"bound"``: rho = pi T / Delta with Delta the spread max_k a_k - min_k a_k (the multiclass bound; the
        one the controller uses). Only the spreads are needed: compiled backends read ``tangent_logits`` once.
      - ``"binary"``: exact for two classes: rho = sqrt(delta^2 + (pi T)^2) / |a_1 - a_2|, delta = z_1 - z_2
        (needs ``logits``).
      - ``"top2"``: the binary formula per sample on the label (or top class when ``labels`` is None) and the
        runner-up class: a diagnostic, not used by the controller (needs ``logits``).
    ``reduce``: ``"max"`` gives the radius of the worst sample (the smallest; the paper's rule), a float q the
    q-quantile of the instability (the (1 - q)-quantile of the radii; less outlier-sensitive), ``"none"`` the
    (N,) per-sample radii. Spreads are guarded with 1e-12, so a zero tangent gives a huge, finite radius.
    ``temperature`` T scales the logits as z / T, which multiplies the radius by T.
    """
    check_float_tensor(tangent_logits, "tangent_logits", ndim=2)
    if mode not in RADIUS_MODES:
        raise ValueError(f"mode must be one of {RADIUS_MODES}, got {mode!r}")
    check_reduce(reduce)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    pi_t = math.pi * temperature
    if mode == "bound":
        spreads = row_spread(tangent_logits, "none", backend=backend)
        if reduce == "none":
            return pi_t / spreads.clamp_min(RADIUS_GUARD)
        return pi_t / reduce_spreads(spreads, reduce).clamp_min(RADIUS_GUARD)
    if logits is None:
        raise ValueError(f"mode={mode!r} needs the logits")
    check_float_tensor(logits, "logits", ndim=2)
    if logits.shape != tangent_logits.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tangent_logits {tuple(tangent_logits.shape)} differ")
    acc = acc_dtype(tangent_logits.dtype)
    z, a = logits.to(acc), tangent_logits.to(acc)
    if mode == "binary":
        if z.shape[1] != 2:
            raise ValueError(f"mode='binary' needs two classes, got {z.shape[1]}")
        delta, da = z[:, 0] - z[:, 1], a[:, 0] - a[:, 1]
    else:
        if z.shape[1] < 2:
            raise ValueError("mode='top2' needs at least two classes")
        if labels is None:
            y = z.argmax(dim=1)
        else:
            if labels.shape != (z.shape[0],) or labels.dtype.is_floating_point:
                raise ValueError(f"labels must be an integer tensor of shape ({z.shape[0]},)")
            y = labels.to(z.device)
        others = z.scatter(1, y[:, None], float("-inf"))
        c = others.argmax(dim=1)
        pick = lambda t, i: t.gather(1, i[:, None])[:, 0]  # noqa: E731
        delta, da = pick(z, y) - pick(z, c), pick(a, y) - pick(a, c)
    radii = torch.sqrt(delta ** 2 + pi_t ** 2) / da.abs().clamp_min(RADIUS_GUARD)
    return _reduce_radii(radii, reduce)
