"""Directional family (SPEC 3.3, 4): random directions generated inside the kernels, perturbations with
nothing to undo, K directional derivatives in one read of the gradients, and the OrthoGrad projection.

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

from . import backend as _backend
from . import distributed
from ._checks import acc_dtype, check_float_tensor, check_tensor_list, grouped_acc_dtype
from ._launch_plan import arange
from ._library import define_op

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


def _signed(k: int) -> int:
    return k - (1 << 64) if k >= 1 << 63 else k


@torch.compiler.disable  # plain host integer arithmetic: traced symbolically, its 64-bit constants overflow inductor
def key_table(seed: int, probes: Sequence[int], count: int, device=None) -> Tensor:
    """(len(probes), count) int64 tensor of keys (bit patterns of the unsigned keys)."""
    return torch.tensor([[_signed(stream_key(seed, p, t)) for t in range(count)] for p in probes],
                        dtype=torch.int64, device=device)


_SPLITMIX = tuple(_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _srl(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64_tensor(x: Tensor) -> Tensor:
    """:func:`splitmix64` on int64 bit patterns (two's-complement wrap-around is arithmetic mod 2^64)."""
    x = x + _SPLITMIX[0]
    z = (x ^ _srl(x, 30)) * _SPLITMIX[1]
    z = (z ^ _srl(z, 27)) * _SPLITMIX[2]
    return z ^ _srl(z, 31)


@torch.compiler.disable  # its inputs are host scalars that change every probe: never baked into a graph
def device_key_table(seed: int, first_probe: int, num_probes: int, count: int, device) -> Tensor:
    """:func:`key_table` for probes first_probe .. first_probe + num_probes - 1, computed on ``device`` from scalar
    arguments only, so no host-to-device copy (the GPU backends' keys; on a CUDA graph replay the scalars are
    those of the capture): one Triton launch where triton is available, else a few elementwise torch ops."""
    seed_hash = _signed(splitmix64(seed & MASK64))
    if _backend.why_unavailable("triton", device) is None:
        from .triton.directional import key_table as triton_key_table
        return triton_key_table(seed_hash, _signed(first_probe & MASK64), num_probes, count, device)
    probes = arange(num_probes, device) + _signed(first_probe & MASK64)
    h = _splitmix64_tensor(probes ^ seed_hash)
    return _splitmix64_tensor(h[:, None] ^ arange(count, device)[None, :])


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


def _sqrt_rn(x: Tensor) -> Tensor:
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
    r = _sqrt_rn(-2.0 * ln_u)
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


def _unit_scale(n: Tensor, dtype: torch.dtype) -> Tensor:
    """s = 1 / (sqrt(sum n^2) + 1e-12), the sum in float64, s rounded to float32, then held in the math dtype
    of ``dtype`` (step 4)."""
    s = 1.0 / (n.to(torch.float64).pow(2).sum().sqrt() + 1e-12)
    return s.to(torch.float32).to(acc_dtype(dtype))


# --------------------------------------------------------------------------------------------------
# ops


_random_directions_op = define_op(
    "random_directions", "(Tensor[] tensors, Tensor keys, str backend) -> Tensor[]",
    lambda tensors, keys, backend: [torch.empty_like(t, dtype=acc_dtype(t.dtype)) for t in tensors])


@_backend.register("random_directions", "torch")
def random_directions_reference(tensors, keys):
    out = []
    for t, k in zip(tensors, keys.tolist()):
        n = stream_normals(k & MASK64, t.numel(), t.device)
        out.append((n.to(acc_dtype(t.dtype)) * _unit_scale(n, t.dtype)).reshape(t.shape))
    return out


_perturb_op = define_op(
    "perturb", "(Tensor[] params, Tensor keys, float sigma, Tensor(a!)[] out, str backend) -> ()",
    lambda params, keys, sigma, out, backend: None)


@_backend.register("perturb", "torch")
def perturb_reference(params, keys, sigma, out):
    """out = theta + sigma * d, math in fp32 (fp64): d = n * s, then theta + sigma * d, rounded once."""
    for p, k, o in zip(params, keys.tolist(), out):
        A = acc_dtype(p.dtype)
        n = stream_normals(k & MASK64, p.numel(), p.device)
        d = (n.to(A) * _unit_scale(n, p.dtype)).reshape(p.shape)
        o.copy_(p.to(A) + torch.tensor(sigma, dtype=A) * d)


_dots_op = define_op(
    "directional_dots", "(Tensor[] grads, Tensor keys, str backend) -> Tensor",
    lambda grads, keys, backend: grads[0].new_empty(keys.shape[0], dtype=grouped_acc_dtype(grads)))


@_backend.register("directional_dots", "torch")
def directional_dots_reference(grads, keys):
    """Reference: out[k] = sum_t g_t . d_{t,k} = sum_t (g_t . n_{t,k}) s_{t,k}, each direction materialised."""
    dtype = grouped_acc_dtype(grads)
    out = []
    for row in keys.tolist():
        total = torch.zeros((), dtype=torch.float64, device=grads[0].device)
        for g, k in zip(grads, row):
            n = stream_normals(k & MASK64, g.numel(), g.device)
            total = total + (g.reshape(-1).to(torch.float64) @ n.to(torch.float64)) * _unit_scale(n, torch.float64)
        out.append(total)
    return torch.stack(out).to(dtype)


_orthograd_op = define_op(
    "orthograd_", "(Tensor[] params, Tensor(a!)[] grads, str backend) -> ()",
    lambda params, grads, backend: None)


@_backend.register("orthograd_", "torch")
def orthograd_reference(params, grads):
    """Reference (SPEC 4): g_perp = g - (w.g / (w.w + 1e-30)) w; g <- g_perp |g| / (|g_perp| + 1e-30)."""
    for w, g in zip(params, grads):
        w64, g64 = w.to(torch.float64), g.to(torch.float64)
        c = (w64 * g64).sum() / ((w64 * w64).sum() + 1e-30)
        perp = g64 - c * w64
        g.copy_(perp * (g64.norm() / (perp.norm() + 1e-30)))


_shard_normals_op = define_op(
    "shard_normals", "(Tensor(a!)[] out, Tensor keys, int[] offsets, str backend) -> Tensor",
    lambda out, keys, offsets, backend: out[0].new_empty(len(out), dtype=torch.float64))


@_backend.register("shard_normals", "torch")
def shard_normals_reference(out, keys, offsets):
    """Reference: the float32 normals of elements [offset, offset + numel) of each stream into ``out``; their
    sums of squares (float64)."""
    sums = []
    for o, k, off in zip(out, keys.tolist(), offsets):
        n = stream_normals(k & MASK64, o.numel(), o.device, start=off)
        o.copy_(n.reshape(o.shape))
        sums.append(n.to(torch.float64).pow(2).sum())
    return torch.stack(sums)


for _op in ("random_directions", "perturb", "directional_dots", "orthograd_"):
    _backend.register_kernels(_op, "directional")
# CPU kernel and Triton only (no CUDA kernel: on CUDA tensors auto picks Triton)
_backend.register("shard_normals", "cpp")(lambda *a: torch.ops.stabkernels_C.shard_normals(*a))
_backend.register("shard_normals", "triton")(
    lambda *a: __import__("stabkernels.triton.directional", fromlist=["shard_normals"]).shard_normals(*a))


# --------------------------------------------------------------------------------------------------
# DTensor (FSDP2) shards: each rank generates the stream of its own elements, keyed by their global index
# (the shard_normals op), so a shard holds exactly its slice of the unsharded direction; the unit-norm sums S
# are summed over the shards (one all-reduce of T numbers per probe).


def _shard_normals(tensors, seed: int, probe: int, backend: str = "auto") -> tuple[list[Tensor], Tensor]:
    """The local shards' normals (flat float32) and the per-tensor float32 scales s of step 4, over the whole
    tensors."""
    shards = distributed.locals_(tensors)
    normals = [torch.empty(t.numel(), dtype=torch.float32, device=t.device) for t in shards]
    b = _backend.resolve("shard_normals", backend, shards[0].device)
    keys = _keys(seed, probe, 1, len(tensors), b, shards[0].device)[0]
    sums = _shard_normals_op(normals, keys, [distributed.layout(t).offset for t in tensors], b)
    S = distributed.sum_shards(sums.to(shards[0].device), tensors)
    return normals, (1.0 / (S.sqrt() + 1e-12)).to(torch.float32)


def _sharded_directions(tensors, seed: int, probe: int, backend: str = "auto") -> list[Tensor]:
    normals, scales = _shard_normals(tensors, seed, probe, backend)
    out = []
    for t, n, s in zip(tensors, normals, scales):
        A = acc_dtype(t.dtype)
        out.append((n.to(A) * s.to(A)).reshape(distributed.local(t).shape))
    return out


# --------------------------------------------------------------------------------------------------
# public functions


def _seed_int(seed) -> int:
    if isinstance(seed, Tensor):
        seed = int(seed)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return seed & MASK64


def _keys(seed: int, first_probe: int, num_probes: int, count: int, backend: str, device) -> Tensor:
    """The (num_probes, count) key table where ``backend`` reads it: built on the device for the GPU backends
    (no host-to-device copy in a step), on the host for the others."""
    if backend in ("triton", "cuda"):
        return device_key_table(seed, first_probe, num_probes, count, device)
    return key_table(seed, range(first_probe, first_probe + num_probes), count)


def random_directions(tensors: Sequence[Tensor], seed: int, probe: int, *, backend: str = "auto") -> list[Tensor]:
    """The unit directions d (one per tensor, its shape) of probe ``probe`` of the stream ``seed``: the
    reference definition of the stream (module docstring). Returns float32 tensors (float64 for float64
    inputs); only the shapes and dtypes of ``tensors`` matter. For DTensors (FSDP2) each rank gets its local
    shard's slice of each direction (plain tensors of the local shape); unit norm is per full tensor."""
    if distributed.any_sharded(tensors):
        return _sharded_directions(tensors, _seed_int(seed), probe, backend)
    tensors = check_tensor_list(tensors, "tensors")
    b = _backend.resolve("random_directions", backend, tensors[0].device)
    keys = _keys(_seed_int(seed), probe, 1, len(tensors), b, tensors[0].device)[0]
    return list(_random_directions_op(tensors, keys, b))


def perturb(params: Sequence[Tensor], seed: int, probe: int, sigma: float, out: Sequence[Tensor] | None = None, *,
            backend: str = "auto") -> list[Tensor]:
    """theta + sigma * d for every tensor, written into ``out`` (allocated when None; reuse it across probes).

    ``params`` are only read: evaluate the model at the perturbed point with the outputs (e.g. through
    ``torch.func.functional_call``), and there is nothing to undo. (Adding sigma * d in place and subtracting
    it afterwards is not bit-exact in floating point; that is how the reference S-Adam code drifts.) Math in
    float32 (float64 for float64), rounded once into the parameter's dtype. DTensor (FSDP2) ``params``: ``out``
    (DTensors or local-shape tensors) receives the local shards (see :func:`random_directions`)."""
    if not math.isfinite(sigma):
        raise ValueError(f"sigma must be finite, got {sigma}")
    if distributed.any_sharded(params) or (out is not None and distributed.any_sharded(out)):
        return _perturb_sharded(list(params), _seed_int(seed), probe, sigma, out, backend)
    params = check_tensor_list(params, "params")
    if out is None:
        out = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
    else:
        out = list(out)
        if len(out) != len(params):
            raise ValueError(f"out has {len(out)} tensors for {len(params)} params")
        for i, (o, p) in enumerate(zip(out, params)):
            if o.shape != p.shape or o.dtype != p.dtype or o.device != p.device or not o.is_contiguous():
                raise ValueError(f"out[{i}] must be a contiguous {p.dtype} tensor of shape {tuple(p.shape)} on "
                                 f"{p.device}")
            if o.data_ptr() == p.data_ptr():
                raise ValueError(f"out[{i}] aliases params[{i}]: perturb never writes the parameters")
    params = [p.contiguous() for p in params]
    b = _backend.resolve("perturb", backend, params[0].device)
    keys = _keys(_seed_int(seed), probe, 1, len(params), b, params[0].device)[0]
    _perturb_op(params, keys, float(sigma), out, b)
    return out


def _perturb_sharded(params, seed: int, probe: int, sigma: float, out, backend: str) -> list:
    if out is None:
        out = [torch.empty_like(p) for p in params]
    out = list(out)
    if len(out) != len(params):
        raise ValueError(f"out has {len(out)} tensors for {len(params)} params")
    for i, (p, o, d) in enumerate(zip(params, out, _sharded_directions(params, seed, probe, backend))):
        pl, ol = distributed.local(p), distributed.local(o)
        if ol.shape != pl.shape or ol.dtype != pl.dtype:
            raise ValueError(f"out[{i}] must be a {pl.dtype} tensor of the local shard's shape {tuple(pl.shape)}")
        if ol.data_ptr() == pl.data_ptr() and pl.numel():
            raise ValueError(f"out[{i}] aliases params[{i}]: perturb never writes the parameters")
        A = d.dtype
        ol.copy_(pl.to(A) + torch.tensor(sigma, dtype=A) * d)
    return out


def directional_dots(grads: Sequence[Tensor], seed: int, num_probes: int, *, first_probe: int = 0,
                     backend: str = "auto") -> Tensor:
    """The K = ``num_probes`` exact directional derivatives g . d_i for probes first_probe .. first_probe + K - 1,
    in one read of the gradients (each block of g stays in cache while the K directions are generated for
    it). Returns a (K,) float32 tensor (float64 if a gradient is float64). With finite-difference slopes D_i,
    D_i - g . d_i isolates the non-smooth and curvature part."""
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    if distributed.any_sharded(grads):
        return _dots_sharded(list(grads), _seed_int(seed), range(first_probe, first_probe + num_probes), backend)
    grads = check_tensor_list(grads, "grads")
    b = _backend.resolve("directional_dots", backend, grads[0].device)
    keys = _keys(_seed_int(seed), first_probe, num_probes, len(grads), b, grads[0].device)
    return _dots_op(grads, keys, b)


def _dots_sharded(grads, seed: int, probes, backend: str) -> Tensor:
    """Per probe: sum_t (g_t . n_t) s_t, with the shard dot products and S summed over the shards."""
    out = []
    for probe in probes:
        normals, scales = _shard_normals(grads, seed, probe, backend)
        dots = torch.stack([distributed.local(g).reshape(-1).to(torch.float64) @ n.to(torch.float64)
                            for g, n in zip(grads, normals)])
        out.append((distributed.sum_shards(dots, grads) * scales.to(torch.float64)).sum())
    return torch.stack(out).to(grouped_acc_dtype(grads))


def _orthograd_sharded(params) -> None:
    """OrthoGrad on DTensor shards: w.g, w.w and g.g per tensor from the local shards, summed over the shards
    (one all-reduce of 3T numbers), then each rank writes its shard of g (the kernels' formula, float64)."""
    W = [distributed.local(p.detach()) for p in params]
    G = [distributed.local(p.grad) for p in params]
    partial = torch.stack([torch.stack([(w.double() * g.double()).sum(), w.double().square().sum(),
                                        g.double().square().sum()]) for w, g in zip(W, G)])
    wg, ww, gg = distributed.sum_shards(partial, params).unbind(1)
    c = wg / (ww + 1e-30)
    perp_sq = (gg - 2 * c * wg + c * c * ww).clamp_min(0)
    scale = gg.sqrt() / (perp_sq.sqrt() + 1e-30)
    for w, g, ci, si in zip(W, G, c, scale):
        g.copy_((g.double() - ci * w.double()) * si)


def orthograd_(params: Sequence[Tensor], *, backend: str = "auto") -> None:
    """OrthoGrad (SPEC 4) on ``p.grad`` in place for every parameter with a gradient: the component along
    the weight is removed and the result rescaled to the gradient's norm, per tensor. w.g, w.w and g.g come
    from one fused pass (float64 sums); |g_perp|^2 = g.g - 2c w.g + c^2 w.w follows from them; a second pass
    writes. Zero gradients or weights give no NaN."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    if distributed.any_sharded(params):
        return _orthograd_sharded(params)
    for i, p in enumerate(params):
        check_float_tensor(p, f"params[{i}]")
        if p.grad.is_sparse or p.grad.shape != p.shape or p.grad.dtype != p.dtype:
            raise ValueError(f"params[{i}].grad must be a dense {p.dtype} tensor of the parameter's shape")
        if not (p.is_contiguous() and p.grad.is_contiguous()):
            raise ValueError(f"params[{i}] and its grad must be contiguous")
    by_device: dict[torch.device, list[Tensor]] = {}
    for p in params:
        by_device.setdefault(p.device, []).append(p)
    for device, ps in by_device.items():
        b = _backend.resolve("orthograd_", backend, device)
        _orthograd_op([p.detach() for p in ps], [p.grad for p in ps], b)
