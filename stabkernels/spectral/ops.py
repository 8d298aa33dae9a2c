"""The spectral family's ops (SPEC 1.1): the schemas, fake kernels and torch references of ``sq_norms`` and
``power_iteration_``, and the public functions ``sq_norms``, ``init_power_vectors``, ``power_iteration_`` and
``stable_rank``. DTensor matrices go to :mod:`.sharded`."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import backend as _backend
from .. import distributed
from .._checks import acc_dtype, check_tensor_list, grouped_acc_dtype
from .._library import define_op
from .matrices import as_matrix, check_matrices
from .sharded import power_iteration_sharded


# --------------------------------------------------------------------------------------------------
# sq_norms: sum of squares of each tensor of a list, one pass (grad norms, Frobenius norms)


def _sq_norms_fake(tensors, backend):
    return tensors[0].new_empty(len(tensors), dtype=grouped_acc_dtype(tensors))


_sq_norms_op = define_op("sq_norms", "(Tensor[] tensors, str backend) -> Tensor", _sq_norms_fake)


@_backend.register("sq_norms", "torch")
def sq_norms_reference(tensors: list[Tensor]) -> Tensor:
    """Reference: ``sum(t.to(acc) ** 2)`` per tensor."""
    dtype = grouped_acc_dtype(tensors)
    return torch.stack([t.to(acc_dtype(t.dtype)).pow(2).sum().to(dtype) for t in tensors])


_backend.register_kernels("sq_norms", "spectral")


def sq_norms(tensors: Sequence[Tensor], *, backend: str = "auto") -> Tensor:
    """Sum of squares of each tensor in ``tensors`` (any shapes, one device), read once, fp32 accumulation
    (fp64 when any tensor is fp64). Returns a (T,) tensor; ``sq_norms(grads).sum().sqrt()`` is the global
    gradient norm that ``clip_grad_norm_`` computes. DTensors (FSDP2): the local shards' sums, summed over the
    shards (one all-reduce of T numbers)."""
    if distributed.any_sharded(tensors):
        return distributed.sum_shards(sq_norms(distributed.locals_(tensors), backend=backend), tensors)
    tensors = check_tensor_list(tensors, "tensors", allow_empty=True)
    if not tensors:
        return torch.zeros(0)
    b = _backend.resolve("sq_norms", backend, tensors[0].device)
    return _sq_norms_op(tensors, b)


# --------------------------------------------------------------------------------------------------
# power_iteration_


def _power_iteration_fake(mats, us, vs, iters, eps, backend):
    return mats[0].new_empty(len(mats), dtype=grouped_acc_dtype(mats))


_power_iteration_op = define_op(
    "power_iteration_",
    "(Tensor[] mats, Tensor(a!)[] us, Tensor(b!)[] vs, int iters, float eps, str backend) -> Tensor",
    _power_iteration_fake,
)


@_backend.register("power_iteration_", "torch")
def power_iteration_reference(mats, us, vs, iters: int, eps: float) -> Tensor:
    """Reference, one matrix at a time. Per iteration: x = W v, y = W^T x, sigma = |y| / |x| (= u^T W v_new),
    u = x / |x|, v = y / |y|. A zero matrix (|x| <= eps) gives sigma 0 and a non-finite one NaN; both leave
    u and v as they were."""
    sigmas = []
    for w, u, v in zip(mats, us, vs):
        w = w.to(u.dtype)
        sigma, u_new, v_new = 0.0, u, v
        for _ in range(iters):
            x = w @ v_new
            y = w.T @ x
            nx, ny = x.norm(), y.norm()
            if not (torch.isfinite(nx) and torch.isfinite(ny)):
                sigma, u_new, v_new = float("nan"), u, v
                break
            if nx <= eps or ny == 0:
                sigma = 0.0
                break
            u_new, v_new, sigma = x / nx, y / ny, (ny / nx).item()
        u.copy_(u_new)
        v.copy_(v_new)
        sigmas.append(sigma)
    return torch.tensor(sigmas, dtype=grouped_acc_dtype(mats), device=mats[0].device)


_backend.register_kernels("power_iteration_", "spectral")


def init_power_vectors(mats: Sequence[Tensor], generator: torch.Generator | None = None):
    """Random normal unit vectors (u, v) for each matrix (SPEC 1.1), in the matrices' math dtype and on
    their device; drawn from ``generator`` (on the CPU) so runs are reproducible."""
    us, vs = [], []
    for w in mats:
        m = as_matrix(w)
        for size, out in ((m.shape[0], us), (m.shape[1], vs)):
            r = torch.randn(size, generator=generator, dtype=torch.float64)
            out.append((r / r.norm().clamp_min(1e-12)).to(device=w.device, dtype=acc_dtype(w.dtype)))
    return us, vs


def power_iteration_(mats: Sequence[Tensor], us: Sequence[Tensor], vs: Sequence[Tensor], iters: int = 1, *,
                     eps: float = 1e-12, check_finite: bool = True, backend: str = "auto") -> Tensor:
    """Power iteration on every matrix of ``mats`` at once; updates ``us``/``vs`` in place (SPEC 1.1).

    Each iteration reads each matrix once: for each block of rows W_b it computes x_b = W_b v and accumulates
    W_b^T x_b while the block is in cache, then sigma_1 = |W^T x| / |x| (equal to u^T W v with the updated
    vectors, the estimate of ``torch.nn.utils.spectral_norm``), u = x / |x|, v = W^T x / |W^T x|.

    Args:
        mats: matrices of any shapes and float dtypes on one device; ndim > 2 is viewed as (shape[0], rest).
        us, vs: unit vectors of sizes (rows,) and (cols,) per matrix, contiguous, in the matrix's math dtype
            (float32, float64 for float64 matrices), e.g. from :func:`init_power_vectors`. Updated in place.
        iters: iterations (about 15 from a random start, 1-2 warm-started).
        eps: a matrix with |W v| <= eps is treated as zero: sigma 0, vectors unchanged.
        check_finite: raise ``ValueError`` naming the matrix when one holds NaN/inf (its vectors are left
            unchanged); this reads the (T,) result on the host.

    Row-sharded DTensor matrices (FSDP2): ``us[i]`` holds the local rows' part of u (a plain tensor of the
    local row count) and ``vs[i]`` the whole v; x = W v stays local and each iteration sums W^T x and |x|^2
    over the shards in one all-reduce for all matrices (then every rank holds the same v and sigma).

    Returns:
        (T,) sigma_1 estimates, float32 (float64 if any matrix is float64).
    """
    if distributed.any_sharded(mats):
        return power_iteration_sharded(list(mats), list(us), list(vs), iters, eps, check_finite)
    mats = check_matrices(mats)
    us, vs = list(us), list(vs)
    if not (len(us) == len(vs) == len(mats)):
        raise ValueError(f"mats, us and vs must have the same length, got {len(mats)}, {len(us)}, {len(vs)}")
    if not mats:
        return torch.zeros(0)
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    views = [as_matrix(w) for w in mats]
    for i, (w, u, v) in enumerate(zip(views, us, vs)):
        want = acc_dtype(w.dtype)
        for name, t, size in (("us", u, w.shape[0]), ("vs", v, w.shape[1])):
            if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() != size:
                raise ValueError(f"{name}[{i}] must be a 1-D tensor of {size} elements for mats[{i}] of shape "
                                 f"{tuple(mats[i].shape)}, got {getattr(t, 'shape', type(t).__name__)}")
            if t.dtype != want or t.device != w.device or not t.is_contiguous():
                raise ValueError(f"{name}[{i}] must be a contiguous {want} tensor on {w.device}, got "
                                 f"{t.dtype} on {t.device}{'' if t.is_contiguous() else ' (non-contiguous)'}")
    b = _backend.resolve("power_iteration_", backend, views[0].device)
    sigmas = _power_iteration_op(views, us, vs, int(iters), float(eps), b)
    if check_finite:
        bad = (~torch.isfinite(sigmas)).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise ValueError(f"mats[{i}] (shape {tuple(mats[i].shape)}) holds non-finite values (NaN or inf); "
                             f"its power-iteration vectors were left unchanged ({len(bad)} such matrices)")
    return sigmas


# --------------------------------------------------------------------------------------------------
# stable rank


def stable_rank(mats: Sequence[Tensor], sigmas: Tensor | None = None, *, iters: int = 30,
                backend: str = "auto") -> Tensor:
    """Stable rank ||W||_F^2 / sigma_1^2 (>= 1) of each matrix; 0 for a zero matrix (SPEC 1.1).

    ``sigmas`` (e.g. from :func:`power_iteration_`) saves the spectral norms' cost; without it they are
    estimated by ``iters`` power iterations from a fixed random start (an estimate from below, so the stable
    rank is an estimate from above, exact once the iteration has converged)."""
    mats = check_matrices(mats)
    if not mats:
        return torch.zeros(0)
    views = [as_matrix(w) for w in mats]
    if sigmas is None:
        us, vs = init_power_vectors(views, torch.Generator().manual_seed(0))
        sigmas = power_iteration_(views, us, vs, iters, backend=backend)
    fro2 = sq_norms(views, backend=backend)
    sigmas = sigmas.to(fro2)
    return torch.where(sigmas > 0, fro2 / sigmas.clamp_min(1e-30) ** 2, torch.zeros_like(fro2))
