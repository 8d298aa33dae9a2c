"""OrthoGrad's per-tensor coefficients (SPEC 4), the one host-side statement of them: from the float64 sums
w.g, w.w and g.g of each tensor, c = w.g / (w.w + EPS) and the rescale |g| / (|g - c w| + EPS), with
|g - c w|^2 = g.g - 2c w.g + c^2 w.w (clamped at 0) so that no pass materialises g - c w. The Triton wrapper and
the DTensor path compute them here; csrc/orthograd.h writes the same for the CPU kernel and the CUDA glue. A leaf
module (torch only)."""
from __future__ import annotations

from torch import Tensor

EPS = 1e-30


def orthograd_coefficients(wg: Tensor, ww: Tensor, gg: Tensor) -> tuple[Tensor, Tensor]:
    """(c, scale) per tensor from (T,) float64 sums w.g, w.w, g.g: the write pass makes g <- (g - c w) * scale.
    Zero weights or gradients give c = 0 or scale = 0, never NaN."""
    coef = wg / (ww + EPS)
    perp2 = (gg - 2 * coef * wg + coef * coef * ww).clamp_min(0)
    return coef, gg.sqrt() / (perp2.sqrt() + EPS)
