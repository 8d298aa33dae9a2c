"""The directional family's public functions (SPEC 3.3, 4): validate, pick a backend, build the stream's keys,
call the op (:mod:`.ops`); DTensor arguments go to :mod:`.sharded`."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .. import backend as _backend
from .. import distributed
from .._checks import check_float_tensor, check_tensor_list
from .keys import op_keys, seed_int
from .ops import directional_dots_op, orthograd_op, perturb_op, random_directions_op
from .sharded import dots_sharded, orthograd_sharded, perturb_sharded, sharded_directions


def random_directions(tensors: Sequence[Tensor], seed: int, probe: int, *, backend: str = "auto") -> list[Tensor]:
    """The unit directions d (one per tensor, its shape) of probe ``probe`` of the stream ``seed``: the
    reference definition of the stream (:mod:`stabkernels._stream`). Returns float32 tensors (float64 for float64
    inputs); only the shapes and dtypes of ``tensors`` matter. For DTensors (FSDP2) each rank gets its local
    shard's slice of each direction (plain tensors of the local shape); unit norm is per full tensor."""
    if distributed.any_sharded(tensors):
        return sharded_directions(tensors, seed_int(seed), probe, backend)
    tensors = check_tensor_list(tensors, "tensors")
    b = _backend.resolve("random_directions", backend, tensors[0].device)
    keys = op_keys(seed_int(seed), probe, 1, len(tensors), b, tensors[0].device)[0]
    return list(random_directions_op(tensors, keys, b))


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
        return perturb_sharded(list(params), seed_int(seed), probe, sigma, out, backend)
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
    keys = op_keys(seed_int(seed), probe, 1, len(params), b, params[0].device)[0]
    perturb_op(params, keys, float(sigma), out, b)
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
        return dots_sharded(list(grads), seed_int(seed), range(first_probe, first_probe + num_probes), backend)
    grads = check_tensor_list(grads, "grads")
    b = _backend.resolve("directional_dots", backend, grads[0].device)
    keys = op_keys(seed_int(seed), first_probe, num_probes, len(grads), b, grads[0].device)
    return directional_dots_op(grads, keys, b)


def orthograd_(params: Sequence[Tensor], *, backend: str = "auto") -> None:
    """OrthoGrad (SPEC 4) on ``p.grad`` in place for every parameter with a gradient: the component along
    the weight is removed and the result rescaled to the gradient's norm, per tensor. w.g, w.w and g.g come
    from one fused pass (float64 sums); |g_perp|^2 = g.g - 2c w.g + c^2 w.w follows from them; a second pass
    writes. Zero gradients or weights give no NaN."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    if distributed.any_sharded(params):
        return orthograd_sharded(params)
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
        orthograd_op([p.detach() for p in ps], [p.grad for p in ps], b)
