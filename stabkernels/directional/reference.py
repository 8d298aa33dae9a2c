"""The torch reference of the direction stream (docs/spec.md 3.4, specified in :mod:`stabkernels._stream`):
Philox4x32-10 on int64 counters, the float32 Box-Muller of step 3 made of correctly rounded operations only, a
tensor's normals and its unit-norm scale. Any device, no compiled code; every other backend is tested against it
bit for bit. Its constants come from :mod:`stabkernels._stream`, as the Triton kernels' do (csrc/philox.h writes
the same steps and constants in C++)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import acc_dtype
from .._stream import (COS_COEFS, LN2, LOG_COEFS, MASK32, PHILOX_KEY_A, PHILOX_KEY_B, PHILOX_ROUND_A,
                       PHILOX_ROUND_B, PI_OVER_4, SIN_COEFS, SQRT2, unit_scale_from_sum)


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a * b for a constant a < 2^32 and int64 b in [0, 2^32), with 16-bit pieces
    so that no int64 product overflows."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    mid = a_hi * b_lo + a_lo * b_hi
    t = a_lo * b_lo + ((mid & 0xFFFF) << 16)
    return (a_hi * b_hi + (mid >> 16) + (t >> 32)) & MASK32, t & MASK32


def philox4x32_10(key: int, counters: Tensor) -> tuple[Tensor, ...]:
    """Reference Philox4x32-10 on int64 counters (any device); returns the four words as int64 in
    [0, 2^32)."""
    k0, k1 = key & MASK32, (key >> 32) & MASK32
    c0, c1 = counters & MASK32, (counters >> 32) & MASK32
    c2 = torch.zeros_like(counters)
    c3 = torch.zeros_like(counters)
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY_A) & MASK32, (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def _horner(x: Tensor, head: float, coefs: list) -> Tensor:
    """head + x (c0 + x (c1 + ... + x c_last)), evaluated innermost first, one rounding per operation."""
    acc = x * coefs[-1]
    for c in reversed(coefs[:-1]):
        acc = x * (acc + c)
    return acc + head


def sqrt_rn(x: Tensor) -> Tensor:
    """Correctly rounded float32 sqrt of positive float32 ``x``. (torch's CPU sqrt may come from MKL's VML,
    which is within an ulp but not correctly rounded.) Candidate r, then the exact test against the midpoints
    to its neighbours: those have 25-bit significands, so their squares are exact in float64."""
    r = torch.sqrt(x.double()).float()
    down = torch.nextafter(r, torch.zeros_like(r))
    up = torch.nextafter(r, torch.full_like(r, math.inf))
    xd, rd = x.double(), r.double()
    lo, hi = (rd + down.double()) / 2, (rd + up.double()) / 2
    return torch.where(xd < lo * lo, down, torch.where(xd > hi * hi, up, r))


def box_muller(wa: Tensor, wb: Tensor) -> tuple[Tensor, Tensor]:
    """Reference step 3: two float32 normals from two int64 tensors of Philox words (see csrc/philox.h)."""
    x = (2 * (wa >> 9) + 1).to(torch.float32)
    mant, ex = torch.frexp(x)  # x = mant 2^ex, mant in [1/2, 1)
    m, e = mant * 2.0, ex - 1
    big = m >= SQRT2
    m, e = torch.where(big, m * 0.5, m), e + big.to(e.dtype)
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    ln_u = (e - 24).to(torch.float32) * LN2 + s * _horner(z, 2.0, LOG_COEFS)
    r = sqrt_rn(-2.0 * ln_u)
    o = wb >> 29
    k = (wb >> 6) & 0x7FFFFF
    k = torch.where((o & 1) == 1, 0x7FFFFF - k, k)
    t = (2 * k + 1).to(torch.float32) * 2.0 ** -24 * PI_OVER_4
    y = t * t
    sn = t * _horner(y, 1.0, SIN_COEFS)
    cs = _horner(y, 1.0, COS_COEFS)
    swap = ((o ^ (o >> 1)) & 1) == 1
    a, b = torch.where(swap, sn, cs), torch.where(swap, cs, sn)
    a = torch.where(((o + 2) & 4) != 0, -a, a)
    b = torch.where((o & 4) != 0, -b, b)
    return r * a, r * b


def stream_normals(key: int, numel: int, device=None, start: int = 0) -> Tensor:
    """Reference: the float32 normals n_start .. n_{start+numel-1} of one tensor's stream (steps 2 and 3)."""
    first = start // 4
    counters = torch.arange(first, (start + numel + 3) // 4, dtype=torch.int64, device=device)
    w = philox4x32_10(key, counters)
    n0, n1 = box_muller(w[0], w[1])
    n2, n3 = box_muller(w[2], w[3])
    skip = start - 4 * first
    return torch.stack([n0, n1, n2, n3], dim=1).reshape(-1)[skip: skip + numel]


def unit_scale(n: Tensor, dtype: torch.dtype) -> Tensor:
    """s = 1 / (sqrt(sum n^2) + 1e-12), the sum in float64, s rounded to float32, then held in the math dtype
    of ``dtype`` (step 4)."""
    return unit_scale_from_sum(n.to(torch.float64).pow(2).sum()).to(acc_dtype(dtype))
