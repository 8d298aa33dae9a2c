"""The direction stream: its specification, the host-side keys and its constants (docs/spec.md 3.4).

A leaf module (it imports torch only): the directional family (stabkernels/directional/, whose reference.py is
the plain-PyTorch reference of steps 2-4), the Triton kernels (stabkernels/triton/directional.py) and the tests
take the stream's constants and host helpers from here; csrc/philox.h writes the same steps and constants in
C++.

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
   (``stabkernels.directional.reference.box_muller``; csrc/philox.h writes the same steps in C++), built
   from IEEE-exact operations only (+, -, *, /, sqrt, exact integer-to-float conversions, in a fixed order, no
   fused multiply-add): radius r = sqrt(-2 ln u) with u = (2 (wa >> 9) + 1) 2^-24, ln u from the exponent
   and a degree-9 odd polynomial in s = (m - 1) / (m + 1) of the mantissa m in [sqrt(1/2), sqrt 2); angle from
   the octant (wb >> 29) and a 23-bit fraction, with degree-9/10 polynomials for sin and cos on (0, pi/4). The
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

from typing import Sequence

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------------
# step 1: the keys, on the host and as int64 tensor ops (the GPU backends' keys, computed on the device)


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


# --------------------------------------------------------------------------------------------------
# the constants of steps 2 and 3 (csrc/philox.h writes the same values in C++)

# Philox4x32-10's round multipliers and key increments (Salmon et al. 2011; tl.randint4x uses the same)
PHILOX_ROUND_A, PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
PHILOX_KEY_A, PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def _f32(hex_literal: str) -> float:
    return float.fromhex(hex_literal)  # every constant below is a float32 value, written exactly


LN2, SQRT2, PI_OVER_4 = _f32("0x1.62e43p-1"), _f32("0x1.6a09e6p+0"), _f32("0x1.921fb6p-1")
LOG_COEFS = [_f32(h) for h in ("0x1.555556p-1", "0x1.99999ap-2", "0x1.24924ap-2", "0x1.c71c72p-3")]  # 2/k
SIN_COEFS = [_f32(h) for h in ("-0x1.555556p-3", "0x1.111112p-7", "-0x1.a01a02p-13", "0x1.71de3ap-19")]
COS_COEFS = [_f32(h) for h in ("-0x1p-1", "0x1.555556p-5", "-0x1.6c16c2p-10", "0x1.a01a02p-16", "-0x1.27e4fcp-22")]


# --------------------------------------------------------------------------------------------------
# step 4: the unit-norm scale (csrc/philox.h: kStreamUnitEps, stream_unit_scale)

UNIT_EPS = 1e-12


def unit_scale_from_sum(sq_sum: Tensor) -> Tensor:
    """s = 1 / (sqrt(S) + UNIT_EPS) from float64 sums of squares S of the normals, rounded to float32 (step 4);
    the one host-side statement of the scale (the reference, the DTensor path; the Triton kernels take UNIT_EPS)."""
    return (1.0 / (sq_sum.sqrt() + UNIT_EPS)).to(torch.float32)
