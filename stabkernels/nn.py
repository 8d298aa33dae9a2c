"""Small modules that complement the kernels."""
from __future__ import annotations

from torch import Tensor, nn


class QKLayerNorm(nn.Module):
    """qk-layernorm: LayerNorm over the head dimension of queries and keys, applied before the attention
    scores (Dehghani et al. 2023, "Scaling Vision Transformers to 22 Billion Parameters"; Wortsman et al.
    2023, "Small-scale proxies for large-scale Transformer training instabilities"). It keeps attention
    logits from growing without bound, the attention-side companion of the z-loss.

    ``forward(q, k)`` takes tensors whose last dimension is ``head_dim`` (e.g. (B, H, T, D)) and returns the
    normalised pair; queries and keys have separate scales and biases (shared across heads).
    """

    def __init__(self, head_dim: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device, dtype=dtype)
        self.head_dim = head_dim
        self.q_norm = nn.LayerNorm(head_dim, **kw)
        self.k_norm = nn.LayerNorm(head_dim, **kw)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        for name, t in (("q", q), ("k", k)):
            if t.shape[-1] != self.head_dim:
                raise ValueError(f"{name} must end in head_dim={self.head_dim}, got shape {tuple(t.shape)}")
        return self.q_norm(q), self.k_norm(k)
