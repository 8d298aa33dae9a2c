"""Attention family (SPEC 8): measurements of attention logits without building the (T x T) score matrix.

``qk_max_logits`` is the measurement behind QK-clip (:class:`stabkernels.optim.QKClip`, SPEC 8.2): the largest
pre-softmax logit of each head. Same op pattern as every family (see :mod:`stabkernels.spread`): one schema with a
fake kernel, a float64-capable torch reference, the compiled backends, and a validating public function.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import backend as _backend
from ._checks import acc_dtype, check_float_tensor
from ._library import define_op

# --------------------------------------------------------------------------------------------------
# qk_max_logits


def _qk_max_logits_fake(q: Tensor, k: Tensor, scale: float, causal: bool, backend: str) -> Tensor:
    return q.new_empty(q.shape[0], q.shape[1], dtype=acc_dtype(q.dtype))


# (B, H, T, D) queries and (B, Hk, Tk, D) keys -> (B, H) max over (i, j [<= i if causal]) of scale * q_i . k_j.
_qk_max_logits_op = define_op("qk_max_logits", "(Tensor q, Tensor k, float scale, bool causal, str backend) -> Tensor",
                              _qk_max_logits_fake)


@_backend.register("qk_max_logits", "torch")
def qk_max_logits_reference(q: Tensor, k: Tensor, scale: float, causal: bool) -> Tensor:
    """Reference: upcast, materialise every head's (T, Tk) scores (key heads repeated over their query group),
    mask the future when causal, ``amax`` (NaN propagates). No keys for a query row (T = 0 or Tk = 0): -inf."""
    acc = acc_dtype(q.dtype)
    B, H, T, _ = q.shape
    Tk = k.shape[2]
    if T == 0 or Tk == 0 or B == 0:
        return torch.full((B, H), float("-inf"), dtype=acc, device=q.device)
    kk = k.to(acc).repeat_interleave(H // k.shape[1], dim=1)
    s = torch.einsum("bhid,bhjd->bhij", q.to(acc), kk) * scale
    if causal:
        future = torch.ones(T, Tk, dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(future, float("-inf"))
    return s.amax(dim=(2, 3))


_backend.register_kernels("qk_max_logits", "attention")


def qk_max_logits(q: Tensor, k: Tensor, *, scale: float | None = None, causal: bool = True,
                  backend: str = "auto") -> Tensor:
    """The largest pre-softmax attention logit of each head, ``max_{i, j} scale * q_i . k_j`` (SPEC 8.1).

    ``j`` runs over ``j <= i`` when ``causal`` (query i sees keys 0..i; queries and keys then have one length),
    over every key otherwise. Grouped-query attention: with ``Hk`` key heads for ``H`` query heads
    (``H % Hk == 0``), query head ``h`` is scored against key head ``h // (H // Hk)``.

    A measurement, not a differentiable op: no autograd (the result is detached; call it on the activations of
    a training forward, as :class:`stabkernels.optim.QKClip` does). The compiled backends sweep q and k in tiles
    with running maxima and never build the (T x Tk) scores: extra memory is O(B H T D) at most (the cpp
    backend widens float16/bfloat16 inputs to float32 once), against O(B H T Tk) for ``q @ k.transpose(-1, -2)``.

    Args:
        q: (B, H, T, D) queries, or (H, T, D) for one sequence; float32/float64/float16/bfloat16, any strides.
        k: (B, Hk, Tk, D) keys (or (Hk, Tk, D)), same dtype and device as ``q``; ``Tk == T`` when ``causal``.
        scale: the logits' scale; default ``1 / sqrt(D)`` (scaled dot-product attention's). Must be > 0.
        causal: mask keys after the query (``j > i``).
        backend: ``"auto"`` or one of ``stabkernels.backend.BACKENDS``.

    Returns:
        (B, H) (or (H,)) in float32 (float64 for float64 inputs), computed with fp32 (fp64) math. A head with no
        (query, key) pair (T = 0) gives -inf; a NaN in a head's q or k makes its maximum NaN.
    """
    check_float_tensor(q, "q")
    check_float_tensor(k, "k")
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be (B, H, T, D) or (H, T, D), got shape {tuple(q.shape)}")
    if k.dim() != q.dim():
        raise ValueError(f"k must have q's number of dimensions ({q.dim()}: (B, Hk, T, D) or (Hk, T, D)), "
                         f"got shape {tuple(k.shape)}")
    if k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"q and k must share one dtype and device, got q: {q.dtype} on {q.device}, "
                         f"k: {k.dtype} on {k.device}")
    squeeze = q.dim() == 3
    if squeeze:
        q, k = q.unsqueeze(0), k.unsqueeze(0)
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be (B={B}, Hk, Tk, D={D}) for q of shape {tuple(q.shape)}, got {tuple(k.shape)}")
    Hk = k.shape[1]
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"q's head count H={H} must be a multiple of k's head count Hk={Hk} (grouped-query "
                         "attention: each key head serves H // Hk query heads)")
    if causal and k.shape[2] != T:
        raise ValueError(f"causal=True needs as many keys as queries, got q length {T} and k length {k.shape[2]}")
    if D == 0:
        raise ValueError("q and k must have a head dimension D >= 1")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    scale = float(scale)
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    b = _backend.resolve("qk_max_logits", backend, q.device)
    with torch.no_grad():
        out = _qk_max_logits_op(q.detach(), k.detach(), scale, bool(causal), b)
    return out[0] if squeeze else out
