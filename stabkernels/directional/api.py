"""Directional family (SPEC 3.3, 4): random directions generated inside the kernels, perturbations with
nothing to undo, K directional derivatives in one read of the gradients, and the OrthoGrad projection.

The direction stream (keys, Philox4x32-10, float32 Box-Muller, per-tensor unit norm) is specified, with its
reference implementation, in :mod:`stabkernels._stream` (docs/spec.md 3.4); its public names are re-exported here.
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
from ._stream import (COS_COEFS, LN2, LOG_COEFS, MASK32, MASK64, PI_OVER_4, SIN_COEFS, SQRT2,  # noqa: F401
                      box_muller, key_table, philox4x32_10, signed64, splitmix64, splitmix64_tensor, stream_key,
                      stream_normals, unit_scale)


# --------------------------------------------------------------------------------------------------
# the stream's keys on the device (the GPU backends')


@torch.compiler.disable  # its inputs are host scalars that change every probe: never baked into a graph
def device_key_table(seed: int, first_probe: int, num_probes: int, count: int, device) -> Tensor:
    """:func:`key_table` for probes first_probe .. first_probe + num_probes - 1, computed on ``device`` from scalar
    arguments only, so no host-to-device copy (the GPU backends' keys; on a CUDA graph replay the scalars are
    those of the capture): one Triton launch where triton is available, else a few elementwise torch ops."""
    seed_hash = signed64(splitmix64(seed & MASK64))
    if _backend.why_unavailable("triton", device) is None:
        from .triton.directional import key_table as triton_key_table
        return triton_key_table(seed_hash, signed64(first_probe & MASK64), num_probes, count, device)
    probes = arange(num_probes, device) + signed64(first_probe & MASK64)
    h = splitmix64_tensor(probes ^ seed_hash)
    return splitmix64_tensor(h[:, None] ^ arange(count, device)[None, :])


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
        out.append((n.to(acc_dtype(t.dtype)) * unit_scale(n, t.dtype)).reshape(t.shape))
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
        d = (n.to(A) * unit_scale(n, p.dtype)).reshape(p.shape)
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
            total = total + (g.reshape(-1).to(torch.float64) @ n.to(torch.float64)) * unit_scale(n, torch.float64)
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
_backend.register_kernels("shard_normals", "directional", cuda=False)  # no CUDA kernel: on CUDA auto picks Triton


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
