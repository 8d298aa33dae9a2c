"""The directional family's ops (SPEC 3.3, 4): the schemas, fake kernels and torch references of
``random_directions``, ``perturb``, ``directional_dots``, ``orthograd_`` and the internal ``shard_normals`` (the
stream of a DTensor shard), and the registration of their compiled kernels. The references generate the stream
with :mod:`.reference`. The public functions that call these ops are in :mod:`.api`."""
from __future__ import annotations

import torch

from .. import backend as _backend
from .._checks import acc_dtype, grouped_acc_dtype
from .._library import define_op
from .._stream import MASK64
from .reference import stream_normals, unit_scale


random_directions_op = define_op(
    "random_directions", "(Tensor[] tensors, Tensor keys, str backend) -> Tensor[]",
    lambda tensors, keys, backend: [torch.empty_like(t, dtype=acc_dtype(t.dtype)) for t in tensors])


@_backend.register("random_directions", "torch")
def random_directions_reference(tensors, keys):
    out = []
    for t, k in zip(tensors, keys.tolist()):
        n = stream_normals(k & MASK64, t.numel(), t.device)
        out.append((n.to(acc_dtype(t.dtype)) * unit_scale(n, t.dtype)).reshape(t.shape))
    return out


perturb_op = define_op(
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


directional_dots_op = define_op(
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


orthograd_op = define_op(
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


shard_normals_op = define_op(
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
