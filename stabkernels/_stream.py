"""The direction stream: its specification, the host-side keys and the plain-PyTorch reference (docs/spec.md 3.4).

A leaf module (it imports torch and stabkernels._checks only): the public ops (stabkernels/directional.py), the
Triton kernels (stabkernels/triton/directional.py) and the tests take the stream's constants and host helpers
from here; csrc/philox.h writes the same steps in C++.

The direction stream (one definition; every backend follows it)
---------------------------------------------------------------
For tensor ``t`` of a list, probe ``p`` and a 64-bit ``seed``:

1. key = splitmix64(splitmix64(splitmix64(seed) XOR p) XOR t), all mod 2^64
   (splitmix64(x): x += 0x9E3779B97F4A7C15; z = (x ^ x >> 30) * 0xBF58476D1CE4E5B9;
   z = (z ^ z >> 27) * 0x94D049BB133111EB; return z ^ z >> 31).
2. Element e of the tensor (flat, row-major) takes counter c = e // 4 and word j = e % 4 of
   Philox4x32-10 with key (key mod 2^32, key >> 32) and counter (c mod 2^32, c >> 32, 0, 0), exactly as
   Triton's ``tl.randint4x(key, c)``.
3. Words (w0, w1) give elements 4c and 4c + 1, (w2, w3) elements 4c + 2 and 4c + 3, by float32 Box-Muller
   (``box_muller`` below; csrc/philox.h writes the same steps in C++), built from IEEE-exact operations
   only (+, -, *, /, sqrt, exact integer-to-float conversions, in a fixed order, no fused multiply-add):
   radius r = sqrt(-2 ln u) with u = (2 (wa >> 9) + 1) 2^-24, ln u from the exponent and a degree-9 odd
   polynomial in s = (m - 1) / (m + 1) of the mantissa m in [sqrt(1/2), sqrt 2); angle from the octant
   (wb >> 29) and a 23-bit fraction, with degree-9/10 polynomials for sin and cos on (0, pi/4). The
   normals are within about 1e-7 (relative) of exact Box-Muller on the same uniforms, and in (-5.8, 5.8).
4. The direction is unit norm per tensor: d = n * s with s = 1 / (sqrt(S) + 1e-12) rounded to float32, S the
   sum of n^2 accumulated in float64, and the product taken in the tensor's math dtype (float32; float64 for
   float64 tensors, where n * s is exact). Rounding s hides the last-bit differences that summing S in another
   order makes, so every backend arrives at the same s.

Because step 3 uses correctly rounded operations only, independent implementations (the torch reference, the
C++ kernels, scalar or AVX-512, and Triton's interpreter with numpy) agree bit for bit. On a GPU the
compilers may fuse multiply-adds: a float32 ulp or so.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ._checks import acc_dtype

MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------------
# the stream: keys (host), Philox and Box-Muller (reference)


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def stream_key(seed: int, probe: int, index: int) -> int:
    """The 64-bit Philox key of tensor ``index`` for probe ``probe`` (step 1 of the stream)."""
    return splitmix64(splitmix64(splitmix64(seed & MASK64) ^ (probe & MASK64)) ^ (index & MASK64))


def signed64(k: int) -> int:
    return k - (1 << 64) if k >= 1 << 63 else k


@torch.compiler.disable  # plain host integer arithmetic: traced symbolically, its 64-bit constants overflow inductor
def key_table(seed: int, probes: Sequence[int], count: int, device=None) -> Tensor:
    """(len(probes), count) int64 tensor of keys (bit patterns of the unsigned keys)."""
    return torch.tensor([[signed64(stream_key(seed, p, t)) for t in range(count)] for p in probes],
                        dtype=torch.int64, device=device)


_SPLITMIX = tuple(signed64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def srl(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64_tensor(x: Tensor) -> Tensor:
    """:func:`splitmix64` on int64 bit patterns (two's-complement wrap-around is arithmetic mod 2^64)."""
    x = x + _SPLITMIX[0]
    z = (x ^ srl(x, 30)) * _SPLITMIX[1]
    z = (z ^ srl(z, 27)) * _SPLITMIX[2]
    return z ^ srl(z, 31)




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
        hi_b, lo_b = _mulhilo32(0xCD9E8D57, c2)
        hi_a, lo_a = _mulhilo32(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def _f32(hex_literal: str) -> float:
    return float.fromhex(hex_literal)  # every constant below is a float32 value, written exactly


LN2, SQRT2, PI_OVER_4 = _f32("0x1.62e43p-1"), _f32("0x1.6a09e6p+0"), _f32("0x1.921fb6p-1")
LOG_COEFS = [_f32(h) for h in ("0x1.555556p-1", "0x1.99999ap-2", "0x1.24924ap-2", "0x1.c71c72p-3")]  # 2/k
SIN_COEFS = [_f32(h) for h in ("-0x1.555556p-3", "0x1.111112p-7", "-0x1.a01a02p-13", "0x1.71de3ap-19")]
COS_COEFS = [_f32(h) for h in ("-0x1p-1", "0x1.555556p-5", "-0x1.6c16c2p-10", "0x1.a01a02p-16", "-0x1.27e4fcp-22")]


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
    s = 1.0 / (n.to(torch.float64).pow(2).sum().sqrt() + 1e-12)
    return s.to(torch.float32).to(acc_dtype(dtype))
