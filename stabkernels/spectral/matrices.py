"""Weights as matrices, for every module of the spectral family: a weight with ndim >= 2 is viewed as
(out_features, rest), like ``torch.nn.utils.parametrizations.spectral_norm`` (a conv weight (O, I, kh, kw) becomes
(O, I*kh*kw)), and a list of them is validated once here."""
from __future__ import annotations

from torch import Tensor

from .._checks import check_tensor_list


def as_matrix(w: Tensor) -> Tensor:
    """``w`` viewed as (w.shape[0], rest); a view whenever the strides allow it."""
    return w.reshape(w.shape[0], -1) if w.dim() != 2 else w


def check_matrices(mats, name: str = "mats") -> list[Tensor]:
    """``mats`` as a list of tensors on one device, each with ndim >= 2 and at least one element (errors name
    the argument and the index)."""
    mats = check_tensor_list(mats, name, allow_empty=True)
    for i, w in enumerate(mats):
        if w.dim() < 2:
            raise ValueError(f"{name}[{i}] must have ndim >= 2 (a weight matrix), got shape {tuple(w.shape)}")
        if w.numel() == 0:
            raise ValueError(f"{name}[{i}] is empty (shape {tuple(w.shape)})")
    return mats
