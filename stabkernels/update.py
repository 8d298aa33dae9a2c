"""Fused optimizer updates shared by the optimizers (SPEC 2.4 and 3.1).

``adam_step_`` and ``sgd_step_`` advance the optimizer state of every parameter in one pass (one launch per
dtype group on GPU, one parallel region on CPU) and can

* write the *unit proposal* u, the step the optimizer would take at lr = 1, into ``updates`` and return
  sum(u^2) per tensor (the radius controller needs ||u|| and the direction u / ||u||), and/or
* apply ``p <- p - lr * step_scale * u`` in the same pass, with ``step_scale`` a 0-d tensor that may live on
  the device (S-Adam's damping), so no host synchronisation is needed.

``apply_update_`` applies a stored proposal with a device-side learning rate (the radius controller's
effective lr), one for all tensors or one per tensor (update clipping, SPEC 7.2).

Every op takes an optional ``skip`` flag (SPEC 7.1): a 0-d tensor on the parameters' device, read by the
kernels themselves; where it is nonzero the op writes nothing (parameters, moments, ``updates`` keep their
bits, a NaN gradient cannot leak in) and returns zero sums. ``adam_step_(clip_stats=True)`` also returns, per
tensor and from the same pass, sum(g^2 / max(v_hat, eps^2)), the square of update clipping's RMS times the
numel (SPEC 7.2; :func:`clip_lrs` turns it into lr / max(1, RMS)); ``clip_stats="only"`` computes just that,
reading g and v and writing nothing, and ``adam_step_``'s ``lr`` may hold one learning rate per tensor, so a
clipped AdamW step is a read of g and v plus one ordinary fused step.

Per-step scalars never make a host round trip: ``step_scale``, ``lr`` and Adam's ``step`` reach the kernels
as 0-d float64 tensors on the parameters' device (:func:`scalar_tensor` makes them without a host-to-device
copy), and Adam's bias corrections are computed from ``step`` by the kernels themselves, so a step can be
captured in a CUDA graph (with ``step`` and ``lr`` device tensors advanced in place) and compiled by
torch.compile without a recompile per step. Arithmetic follows ``torch.optim.Adam``/``AdamW``/``SGD``
(single-tensor implementations) operation by operation, so the results agree with torch to fp32 rounding.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import Tensor

from . import _launch_plan
from . import backend as _backend
from . import distributed
from ._checks import acc_dtype, as_list, check_tensor_list, grouped_acc_dtype
from ._library import define_op



def _sums_fake(params, *args):
    return params[0].new_empty(len(params), dtype=grouped_acc_dtype(params))


def _scale(x) -> Tensor:
    """A 0-d float64 tensor of a 0-d tensor (kept on its device) or a number (the references accept both)."""
    return torch.as_tensor(x, dtype=torch.float64).reshape(())


def _keep(skip) -> Tensor | None:
    """The references' keep mask of an optional skip flag: None (no flag) or a 0-d bool tensor, True where the
    step is taken (read on the device by ``torch.where``, never on the host)."""
    return None if skip is None else skip.reshape(()) == 0


def _store(dst: Tensor, new: Tensor, keep: Tensor | None) -> None:
    """``dst <- new``, or, with a keep mask, ``dst`` selected back where the step is skipped (a select, not a
    multiplication by 0: a NaN in ``new`` cannot leak in)."""
    dst.copy_(new if keep is None else torch.where(keep, new.to(dst.dtype), dst))


def _kept_sum(x: Tensor, keep: Tensor | None) -> Tensor:
    s = x.double().sum()
    return s if keep is None else torch.where(keep, s, torch.zeros_like(s))


def _finish_reference(p, pa, u, i, updates, apply, lr, step_scale, keep) -> Tensor:
    """The common tail of the reference steps: store u, move p by lr * step_scale * u, return sum(u^2)."""
    if updates:
        _store(updates[i], u, keep)
    if apply:
        _store(p, pa - (_scale(lr).to(pa.dtype) * _scale(step_scale).to(pa.dtype)) * u, keep)
    return _kept_sum(u.pow(2), keep)


def _adam_fake(params, *args):
    clip_stats = args[-2]  # (..., skip, clip_stats, backend): 0, 1 (also), 2 (only) or 3 (clipped)
    shape = (2, len(params)) if clip_stats else (len(params),)
    return params[0].new_empty(shape, dtype=grouped_acc_dtype(params))


# --------------------------------------------------------------------------------------------------
# adam_step_

_adam_op = define_op(
    "adam_step_",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] updates, Tensor step_scale, Tensor lr, Tensor step, "
    "float beta1, float beta2, float eps, float weight_decay, bool decoupled, bool amsgrad, bool maximize, "
    "bool apply, bool eps_raw, Tensor? skip, int clip_stats, str backend) -> Tensor",
    _adam_fake,
)


def _lr_of(lr: Tensor, i: int) -> Tensor:
    """Tensor ``i``'s learning rate: ``lr`` itself (one number) or ``lr[i]`` (one per tensor), 0-d float64."""
    lr = torch.as_tensor(lr, dtype=torch.float64)
    return lr.reshape(()) if lr.numel() == 1 else lr.reshape(-1)[i]


@_backend.register("adam_step_", "torch")
def adam_step_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, updates, step_scale, lr, step,
                        beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, apply, eps_raw, skip=None,
                        clip_stats=0):
    """Reference: torch.optim.Adam/AdamW's single-tensor step, per tensor, math in fp32 (fp64).

    ``step_scale``, ``lr`` and ``step`` are 0-d tensors (float64 on the params' device from the public
    wrapper; ``lr`` may be (T,), one per tensor); the bias corrections bc1 = 1 - beta1^step and
    sqrt(bc2) = sqrt(1 - beta2^step) are computed in float64 from ``step``; ``eps_raw`` uses eps / sqrt(bc2),
    i.e. eps added to sqrt(v) before the correction. ``skip`` (SPEC 7.1): every new value selected back where it
    is nonzero, sums 0. ``clip_stats`` (SPEC 7.2): 1 returns (2, T), the second row sum(g^2 / max(v_hat, eps^2)),
    v_hat = (max v or v) / bc2 unrounded, g the gradient that enters the moments, eps the given one (also with
    ``eps_raw``); 2 the same rows with row 0 zero, nothing written."""
    step = _scale(step)
    keep = _keep(skip)
    only = clip_stats == 2
    write = keep if not only else torch.zeros((), dtype=torch.bool, device=step.device)  # "only": no write
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    bc2_sqrt = bc2.sqrt()
    eps_clip = eps
    if eps_raw:  # a true division (a number / a tensor would multiply by the reciprocal)
        eps = torch.full_like(bc2_sqrt, eps) / bc2_sqrt
    sums, clips = [], []
    for i, p in enumerate(params):
        A = acc_dtype(p.dtype)
        lr_i = _lr_of(lr, i)
        g = grads[i].to(A)
        g = -g if maximize else g
        pa, m, v = p.to(A), exp_avgs[i].to(A), exp_avg_sqs[i].to(A)
        if apply and decoupled:
            pa = pa * (1 - lr_i * weight_decay)
        if not decoupled and weight_decay != 0:
            g = g + pa * weight_decay
        m = m.lerp(g, 1 - beta1)
        v = v * beta2 + g * (1 - beta2) * g
        vh = v
        if amsgrad:
            vh = torch.maximum(max_exp_avg_sqs[i].to(A), v)
            _store(max_exp_avg_sqs[i], vh, write)
        u = (m / bc1) / (vh.sqrt() / bc2_sqrt + eps)
        _store(exp_avgs[i], m, write)
        _store(exp_avg_sqs[i], v, write)
        sums.append(_finish_reference(p, pa, u, i, updates, apply and not only, lr_i, step_scale, write))
        if clip_stats:
            clips.append(_kept_sum(g * g / torch.clamp_min(vh / bc2.to(A), clip_floor(eps_clip, A)), keep))
    if not sums:
        return torch.zeros(0)
    out = torch.stack([torch.stack(sums), torch.stack(clips)]) if clip_stats else torch.stack(sums)
    return out.to(grouped_acc_dtype(params))


_backend.register_kernels("adam_step_", "update")


# --------------------------------------------------------------------------------------------------
# sgd_step_

_sgd_op = define_op(
    "sgd_step_",
    "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] updates, "
    "Tensor step_scale, Tensor lr, float momentum, float dampening, float weight_decay, bool nesterov, "
    "bool maximize, bool first, bool apply, Tensor? skip, str backend) -> Tensor",
    _sums_fake,
)


@_backend.register("sgd_step_", "torch")
def sgd_step_reference(params, grads, momentum_buffers, updates, step_scale, lr, momentum, dampening,
                       weight_decay, nesterov, maximize, first, apply, skip=None):
    """Reference: torch.optim.SGD's single-tensor step, per tensor (a first step copies g into the buffer);
    ``step_scale`` and ``lr`` are 0-d tensors; ``skip`` as in :func:`adam_step_reference`."""
    keep = _keep(skip)
    sums = []
    for i, p in enumerate(params):
        A = acc_dtype(p.dtype)
        g = grads[i].to(A)
        g = -g if maximize else g
        pa = p.to(A)
        if weight_decay != 0:
            g = g + pa * weight_decay
        u = g
        if momentum != 0:
            b = g if first else momentum_buffers[i].to(A) * momentum + g * (1 - dampening)
            _store(momentum_buffers[i], b, keep)
            u = g + b * momentum if nesterov else b
        sums.append(_finish_reference(p, pa, u, i, updates, apply, lr, step_scale, keep))
    return torch.stack(sums).to(grouped_acc_dtype(params)) if sums else torch.zeros(0)


_backend.register_kernels("sgd_step_", "update")


# --------------------------------------------------------------------------------------------------
# apply_update_

_apply_op = define_op(
    "apply_update_",
    "(Tensor(a!)[] params, Tensor[] updates, Tensor lr, float weight_decay, Tensor? step_scale, Tensor? skip, "
    "str backend) -> ()",
    lambda params, updates, lr, weight_decay, step_scale, skip, backend: None,
)


@_backend.register("apply_update_", "torch")
def apply_update_reference(params, updates, lr, weight_decay, step_scale=None, skip=None):
    """Reference: p <- p * (1 - lr_i * weight_decay) - lr_i * step_scale * u, lr_i = lr (one element) or lr[i]
    (one per tensor); nothing where ``skip`` is nonzero."""
    keep = _keep(skip)
    for i, (p, u) in enumerate(zip(params, updates)):
        A = acc_dtype(p.dtype)
        a = _lr_of(lr, i).to(A)
        s = a if step_scale is None else a * _scale(step_scale).to(A)
        _store(p, p.to(A) * (1 - a * weight_decay) - s * u, keep)


_backend.register_kernels("apply_update_", "update")


# --------------------------------------------------------------------------------------------------
# skip_rule_: SkipStep's decision (SPEC 7.1)

_skip_rule_op = define_op(
    "skip_rule_",
    "(Tensor(a!) history, Tensor(b!) skipped, Tensor loss, Tensor? grad_norm, int count, int warmup, "
    "float sigma_factor, str backend) -> Tensor",
    lambda history, skipped, *args: torch.empty((), dtype=torch.bool, device=history.device),
)


@_backend.register("skip_rule_", "torch")
def skip_rule_reference(history, skipped, loss, grad_norm, count, warmup, sigma_factor):
    """Reference: OLMo-core's rule in torch ops (SPEC 7.1); see :func:`skip_rule_`."""
    x = torch.stack([t.reshape(()).to(torch.float64) for t in (loss, grad_norm) if t is not None])
    window = history.shape[1]
    if count + 1 >= warmup:
        std, mean = torch.std_mean(history[: len(x), : min(count, window)], dim=1)
        keep = ((x - mean).abs() / std <= sigma_factor).all()
    else:
        keep = torch.ones((), dtype=torch.bool, device=history.device)
    history[: len(x), count % window].copy_(x)
    skipped += ~keep
    return keep


_backend.register_kernels("skip_rule_", "update", cuda=False)  # one tiny program: Triton on CUDA


# --------------------------------------------------------------------------------------------------
# advance_steps_: the step counters (SPEC 7.1)

_advance_op = define_op("advance_steps_", "(Tensor(a!)[] steps, Tensor? skip, str backend) -> ()",
                        lambda steps, skip, backend: None)


@_backend.register("advance_steps_", "torch")
def advance_steps_reference(steps, skip=None):
    """Reference (and the GPU path: one multi-tensor launch): every counter + 1, or + 0 where ``skip`` is
    nonzero."""
    if skip is None:
        torch._foreach_add_(steps, 1)
    else:  # a list of 0-d tensors: the tensor-scalar overload reads its scalar on the host (measured on CPU)
        keep = (skip == 0).to(steps[0].dtype)
        torch._foreach_add_(steps, [keep] * len(steps))


_backend.register("advance_steps_", "cpp")(lambda steps, skip: torch.ops.stabkernels_C.advance_steps_(steps, skip))


# --------------------------------------------------------------------------------------------------
# public functions


def _check_lists(op: str, params, named_lists: dict, *, acc_lists: dict = ()) -> None:
    """Validates that every list matches ``params`` tensor by tensor (shape, dtype, device, contiguity)."""
    params = check_tensor_list(params, f"{op}: params")
    device = params[0].device
    for i, p in enumerate(params):
        if not p.is_contiguous():
            raise ValueError(f"{op}: params[{i}] must be contiguous")

    shapes = [p.shape for p in params]

    def check(name, ts, want):
        if len(ts) != len(params):
            raise ValueError(f"{op}: {name} has {len(ts)} tensors for {len(params)} params")
        # one pass that only compares (this runs every step, on every tensor), then the detailed one for the message
        if all(isinstance(t, Tensor) and t.shape == s and t.dtype == d and t.device == device and t.is_contiguous()
               for t, s, d in zip(ts, shapes, want)):
            return
        for i, (t, p, dt) in enumerate(zip(ts, params, want)):
            if not isinstance(t, Tensor) or t.shape != p.shape:
                raise ValueError(f"{op}: {name}[{i}] must have the shape of params[{i}] {tuple(p.shape)}, got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
            if t.dtype != dt or t.device != device or not t.is_contiguous():
                raise ValueError(f"{op}: {name}[{i}] must be a contiguous {dt} tensor on {device}, got {t.dtype} "
                                 f"on {t.device}{'' if t.is_contiguous() else ' (non-contiguous)'}")

    same = [p.dtype for p in params]
    for name, ts in named_lists.items():
        check(name, ts, same)
    acc_lists = dict(acc_lists)
    if acc_lists:
        acc = [acc_dtype(d) for d in same]
        for name, ts in acc_lists.items():
            check(name, ts, acc)


def _params_device(op: str, params: list) -> torch.device:
    """The device of ``params``, checked only as far as finding it needs (the rest is checked by the kernel or
    by :func:`_check_lists`)."""
    if not params or not isinstance(params[0], Tensor):
        check_tensor_list(params, f"{op}: params")  # raises the worded error
    return params[0].device


def _run_checked(op, args: tuple, backend: str, check) -> Tensor | None:
    """Runs ``op(*args, backend)``; ``check()`` validates the lists in Python.

    The compiled kernels validate every list themselves before touching memory (csrc/list_checks.cpp), in
    about 1 us where the Python pass costs about 100 us per step for a ResNet's 62 tensors, so with them the
    Python check runs only when the kernel raised, to word the error the same way on every backend. Under
    torch.compile the Python check runs at trace time, where it costs nothing per step."""
    if backend not in ("cpp", "cuda") or torch.compiler.is_compiling():
        check()
        return op(*args, backend)
    try:
        return op(*args, backend)
    except (TypeError, ValueError, RuntimeError):
        check()  # raises the worded error when a list is at fault; else the kernel's error stands
        raise


def scalar_tensor(x, name: str, device: torch.device) -> Tensor:
    """``x`` (a Python number or a one-element tensor) as the 0-d float64 tensor on ``device`` the kernels read,
    made without a host-to-device copy (which on CUDA would be a blocking copy, and break graph capture):

    * a number: ``torch.full`` on the device (a fill kernel; ``torch.tensor(x, device=cuda)`` would copy);
    * a tensor on ``device``: converted there (``.to(float64)``, a no-op for float64) and viewed as 0-d;
    * a one-element CPU tensor while ``device`` is not the CPU: read on the host (reading a CPU tensor does not
      synchronise the GPU) and filled on the device;
    * anything else: ValueError naming ``name``."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must hold one number, got a tensor of shape {tuple(x.shape)}")
        if x.device == device:
            return x.to(torch.float64).reshape(())
        if x.device.type == "cpu":
            return torch.full((), float(x), dtype=torch.float64, device=device)
        raise ValueError(f"{name} must be a number or a one-element tensor on {device} (or on the CPU), got a "
                         f"tensor on {x.device}")
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a number or a one-element tensor, got {type(x).__name__}")
    return torch.full((), float(x), dtype=torch.float64, device=device)


def _scale_tensor(step_scale, device) -> Tensor:
    """The step scale as a 0-d float64 tensor on ``device`` (1 when None), without a host-to-device copy."""
    if step_scale is None:
        return torch.ones((), dtype=torch.float64, device=device)
    return scalar_tensor(step_scale, "step_scale", device)


def skip_tensor(skip, device: torch.device) -> Tensor | None:
    """The ``skip`` flag of the fused updates (SPEC 7.1) as the kernels read it: None (no flag), or a 0-d float64
    tensor on ``device``, nonzero meaning "skip this step". Takes None, a bool or number, or a one-element tensor
    of any dtype (a bool device tensor is converted on the device: no host read)."""
    if skip is None:
        return None
    if isinstance(skip, bool):
        skip = float(skip)
    return scalar_tensor(skip, "skip", device)


def _sharded_sums(sums: Tensor, params) -> Tensor:
    """The per-tensor sums of local shards summed over the ranks; (T,) or (2, T) (clip statistics)."""
    if sums.dim() == 2:
        return distributed.sum_shards(sums.t(), params).t()
    return distributed.sum_shards(sums, params)


def adam_step_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
               exp_avg_sqs: Sequence[Tensor], *, step: int | Tensor, lr: float | Tensor, betas=(0.9, 0.999),
               eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = True, amsgrad: bool = False,
               maximize: bool = False, max_exp_avg_sqs: Sequence[Tensor] | None = None,
               updates: Sequence[Tensor] | None = None, step_scale: Tensor | float | None = None,
               apply: bool = True, eps_raw: bool = False, skip: Tensor | bool | None = None,
               clip_stats: bool | str = False, backend: str = "auto") -> Tensor:
    """One Adam (``decoupled=False``) or AdamW step over every parameter, fused.

    Moments are advanced once (m, v and, with ``amsgrad``, the running max of v); u = (m / bc1) /
    (sqrt(v_hat) / sqrt(bc2) + eps) is the unit proposal. ``updates`` (same shapes, math dtype) receive u;
    with ``apply`` the parameters move: p <- p (1 - lr wd) [AdamW] - lr * step_scale * u, where
    ``step_scale`` is a 0-d tensor (kept on the device) or a number. Returns sum(u^2) per parameter
    (float32, float64 if a parameter is float64). ``step`` is the step number after this step (>= 1): an int or
    a one-element tensor (a device tensor keeps the step free of host round trips and capturable in a CUDA
    graph; the bias corrections are computed from it by the kernel, in float64). ``lr`` is a number or a
    one-element tensor (the torch.optim way; a device tensor changed in place, e.g. by a scheduler, needs no
    recompile under torch.compile), or a (T,) tensor of one learning rate per tensor on the parameters' device
    (update clipping, SPEC 7.2: the step and the decoupled decay of tensor i use lr[i]). ``eps_raw``: eps is added to sqrt(v) before the bias correction
    (u = (m / bc1) / ((sqrt(v) + eps) / sqrt(bc2)), i.e. eps / sqrt(bc2) in the formula above: S-Adam's
    eps_mode="authors"). A tensor ``step`` below 1 is not checked on CUDA (that would read the device).

    ``skip`` (SPEC 7.1): a one-element tensor (or bool) read by the kernel on the device; nonzero skips the step
    (nothing written, sums 0; ``step`` is then not checked, so a counter left unadvanced by a skip is fine).
    ``clip_stats`` (SPEC 7.2): True returns (2, T), row 0 sum(u^2), row 1 sum(g^2 / max(v_hat, eps^2)) per
    tensor from the same pass (:func:`clip_lrs` makes update clipping's per-tensor learning rates of it);
    ``"only"``: row 1 alone (row 0 zero) from a pass that reads g and v (max v; p for coupled decay) and writes
    nothing: the moments, u and p stay as they are, for the clipped step that follows. ``"clipped"``: the whole
    update-clipped step (StableAdamW): tensor i moves at ``lr_i / max(1, RMS_i)`` (:func:`clip_lrs`), returns
    what True returns: the "only" pass, :func:`clip_lrs` and a step at those rates, which is how the torch
    reference runs it. The kernel backends make it one call: C++ per block of whole tensors of about 2^20
    elements, so that the second pass reads g and v from cache; CUDA and Triton per dtype group, two launches
    whose second forms each tensor's rate from the first's sums itself (clip_lrs' arithmetic in float64, no
    device op between the passes) and leaves row 1 as the first wrote it. Their rates take a correctly rounded
    square root (torch's CPU sqrt is 1 ulp off on about 1% of float64 inputs), so the parameters may differ
    from the composite's in the last place.

    DTensor (FSDP2) lists: each rank steps its local shards; the sums are over the whole tensors (one
    all-reduce of T numbers, 2T with ``clip_stats``)."""
    def clipped_in_two_calls() -> Tensor:
        """clip_stats="clipped" where no kernel fuses it (the torch reference; DTensor shards, whose RMS needs
        the whole tensors' sums: FSDP2 sums the shards): the statistics pass, the per-tensor rates and the step."""
        kw = dict(betas=betas, eps=eps, weight_decay=weight_decay, decoupled=decoupled, amsgrad=amsgrad,
                  maximize=maximize, max_exp_avg_sqs=max_exp_avg_sqs, eps_raw=eps_raw, skip=skip, backend=backend)
        clip_sums = adam_step_(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=1.0, apply=False,
                               clip_stats="only", **kw)[1]
        sums = adam_step_(params, grads, exp_avgs, exp_avg_sqs, step=step, lr=clip_lrs(clip_sums, params, lr),
                          updates=updates, step_scale=step_scale, apply=apply, **kw)
        return torch.stack([sums, clip_sums])

    sharded = distributed.any_sharded(params)
    if sharded and clip_stats == "clipped":
        return clipped_in_two_calls()
    if sharded:  # FSDP2: the step is element-wise, so each rank steps its shards
        L = distributed.locals_
        sums = adam_step_(L(params), L(grads), L(exp_avgs), L(exp_avg_sqs), step=step, lr=lr, betas=betas, eps=eps,
                          weight_decay=weight_decay, decoupled=decoupled, amsgrad=amsgrad, maximize=maximize,
                          max_exp_avg_sqs=None if max_exp_avg_sqs is None else L(max_exp_avg_sqs),
                          updates=None if updates is None else L(updates), step_scale=step_scale, apply=apply,
                          eps_raw=eps_raw, skip=skip, clip_stats=clip_stats, backend=backend)
        return _sharded_sums(sums, params)
    beta1, beta2 = betas
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("adam_step_: amsgrad needs max_exp_avg_sqs")
    if not isinstance(step, Tensor) and step < 1 and skip is None:
        raise ValueError(f"adam_step_: step must be >= 1, got {step}")
    params = as_list(params, "adam_step_: params")
    device = _params_device("adam_step_", params)
    grads, exp_avgs, exp_avg_sqs = list(grads), list(exp_avgs), list(exp_avg_sqs)
    max_exp_avg_sqs, updates = list(max_exp_avg_sqs) if amsgrad else [], list(updates or [])

    def check():
        _check_lists("adam_step_", params, {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs,
                                            **({"max_exp_avg_sqs": max_exp_avg_sqs} if amsgrad else {})},
                     acc_lists={"updates": updates} if updates else {})

    try:
        stats = {False: 0, True: 1, "only": 2, "clipped": 3}.get(clip_stats)
    except TypeError:  # unhashable
        stats = None
    if stats is None:
        raise ValueError(f"adam_step_: clip_stats must be False, True, 'only' or 'clipped', got {clip_stats!r}")
    b = _backend.resolve("adam_step_", backend, device)
    if stats == 3 and b == "torch":
        return clipped_in_two_calls()
    args = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, updates, _scale_tensor(step_scale, device),
            _lr_tensor(lr, len(params), device, "adam_step_"), scalar_tensor(step, "step", device), float(beta1),
            float(beta2), float(eps), float(weight_decay), bool(decoupled), bool(amsgrad), bool(maximize),
            bool(apply), bool(eps_raw), skip_tensor(skip, device), stats)
    return _run_checked(_adam_op, args, b, check)


def sgd_step_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor] | None, *,
              lr: float | Tensor, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
              nesterov: bool = False, maximize: bool = False, first: bool = False,
              updates: Sequence[Tensor] | None = None, step_scale: Tensor | float | None = None,
              apply: bool = True, skip: Tensor | bool | None = None, backend: str = "auto") -> Tensor:
    """One SGD step (torch.optim.SGD semantics) over every parameter, fused.

    g' = g + wd p; with momentum b = g' on the ``first`` step, else mu b + (1 - dampening) g';
    u = g' + mu b (Nesterov) or b (or g' without momentum). ``updates`` receive u; with ``apply``,
    p <- p - lr * step_scale * u. Returns sum(u^2) per parameter. ``lr`` is a number or a one-element tensor
    (kept on the device: no host round trip). ``skip``: as in :func:`adam_step_` (SPEC 7.1)."""
    if distributed.any_sharded(params):  # FSDP2: element-wise, each rank steps its shards
        L = distributed.locals_
        sums = sgd_step_(L(params), L(grads), None if momentum_buffers is None else L(momentum_buffers), lr=lr,
                         momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                         maximize=maximize, first=first, updates=None if updates is None else L(updates),
                         step_scale=step_scale, apply=apply, skip=skip, backend=backend)
        return distributed.sum_shards(sums, params)
    if momentum != 0 and momentum_buffers is None:
        raise ValueError("sgd_step_: momentum needs momentum_buffers")
    params = as_list(params, "sgd_step_: params")
    device = _params_device("sgd_step_", params)
    grads, bufs, updates = list(grads), list(momentum_buffers) if momentum != 0 else [], list(updates or [])

    def check():
        _check_lists("sgd_step_", params, {"grads": grads, **({"momentum_buffers": bufs} if momentum != 0 else {})},
                     acc_lists={"updates": updates} if updates else {})

    b = _backend.resolve("sgd_step_", backend, device)
    args = (params, grads, bufs, updates, _scale_tensor(step_scale, device), scalar_tensor(lr, "lr", device),
            float(momentum), float(dampening), float(weight_decay), bool(nesterov), bool(maximize), bool(first),
            bool(apply), skip_tensor(skip, device))
    return _run_checked(_sgd_op, args, b, check)


def _lr_tensor(lr, n: int, device: torch.device, op: str) -> Tensor:
    """The learning rate of adam_step_/apply_update_: a 0-d float64 tensor (one for all), or (n,) float64 on
    ``device`` (one per tensor, n > 1), converted on the device."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        if lr.numel() != n or lr.dim() != 1:
            raise ValueError(f"{op}: lr must hold one number or one per tensor ({n}), got a tensor of "
                             f"shape {tuple(lr.shape)}")
        if lr.device != device:
            raise ValueError(f"{op}: per-tensor lr must be on {device}, got {lr.device}")
        return lr.to(torch.float64).contiguous()
    return scalar_tensor(lr, "lr", device)


def apply_update_(params: Sequence[Tensor], updates: Sequence[Tensor], lr: Tensor | float,
                  weight_decay: float = 0.0, *, step_scale: Tensor | float | None = None,
                  skip: Tensor | bool | None = None, backend: str = "auto") -> None:
    """p <- p (1 - lr_i * weight_decay) - lr_i * step_scale * u for every parameter, fused. ``lr`` is a number, a
    one-element tensor (e.g. the radius controller's effective learning rate on the device) or a (T,) tensor
    of one learning rate per tensor (update clipping, SPEC 7.2); ``step_scale`` (default 1) scales the step but
    not the decay (S-Adam's damping); ``skip`` as in :func:`adam_step_`. No host synchronisation."""
    if distributed.any_sharded(params):
        params, updates = distributed.locals_(params), distributed.locals_(updates)
    params, updates = as_list(params, "apply_update_: params"), list(updates)
    device = _params_device("apply_update_", params)
    b = _backend.resolve("apply_update_", backend, device)
    args = (params, updates, _lr_tensor(lr, len(params), device, "apply_update_"), float(weight_decay),
            None if step_scale is None else scalar_tensor(step_scale, "step_scale", device),
            skip_tensor(skip, device))
    _run_checked(_apply_op, args, b, lambda: _check_lists("apply_update_", params, {}, acc_lists={"updates": updates}))


def advance_steps_(steps: Sequence[Tensor], skip: Tensor | None = None, *, backend: str = "auto") -> None:
    """Advances the optimizers' step counters (one-element tensors on one device) by 1, or by 0 where ``skip`` (a
    0-d tensor on their device, SPEC 7.1) is nonzero. No host read. On CPU one C++ call (float32/float64
    counters): torch's ``_foreach_add_`` is one dispatched ``add_`` per tensor there, ~0.2 ms a step for a
    ResNet's 62 counters; on CUDA (and for ``backend`` "triton" or "cuda", the optimizers' GPU paths) torch's
    ``_foreach_add_``, one launch."""
    steps = list(steps)
    if not steps:
        return
    b = "torch" if backend in ("triton", "cuda") else _backend.resolve("advance_steps_", backend, steps[0].device)
    if b == "cpp" and all(t.dtype in (torch.float32, torch.float64) for t in steps):
        _advance_op(steps, skip, b)
    else:  # called directly, not through the op: under torch.compile Inductor fuses the adds
        advance_steps_reference(steps, skip)


def skip_rule_backend(backend: str, device: torch.device) -> str:
    """The backend that runs :func:`skip_rule_` for ``backend`` (an optimizer's backend name) on ``device``:
    "cuda" runs the Triton kernel, the rule having no CUDA C++ kernel."""
    return _backend.resolve("skip_rule_", "triton" if backend == "cuda" else backend, device)


def skip_rule_(history: Tensor, skipped: Tensor, loss: Tensor, grad_norm: Tensor | None = None, *, count: int,
               warmup: int, sigma_factor: float, backend: str = "auto") -> Tensor:
    """SkipStep's decision (OLMo-core's rule, SPEC 7.1) in one kernel, on the device: returns ``keep``, a 0-d bool
    tensor. ``history`` (2, window) float64 holds the earlier losses (row 0) and gradient norms (row 1), the
    value of step k in column k % window; ``count`` is the number of values recorded so far (a host int: it
    depends on no data). Once ``count + 1 >= warmup``, this step's ``loss`` (and ``grad_norm``, if given:
    one-element tensors of any float dtype on ``history``'s device) fails when it lies more than
    ``sigma_factor`` unbiased standard deviations from the mean of the previous min(count, window) values of its
    row, or is NaN/inf (so does a window of equal values: its std is 0; and fewer than two earlier values, when
    ``warmup`` < 3); keep is true when nothing fails. Then the values are written into column ``count % window``
    and ``skipped`` (one-element int64) grows by 1 - keep. No host read on CUDA."""
    if not (isinstance(history, Tensor) and history.dtype == torch.float64 and history.dim() == 2
            and history.shape[0] == 2 and history.shape[1] >= 2 and history.is_contiguous()):
        raise ValueError("skip_rule_: history must be a contiguous (2, window >= 2) float64 tensor, got "
                         + (f"{history.dtype} of shape {tuple(history.shape)}" if isinstance(history, Tensor)
                            else type(history).__name__))
    device = history.device
    if not (isinstance(skipped, Tensor) and skipped.dtype == torch.int64 and skipped.numel() == 1
            and skipped.device == device):
        raise ValueError(f"skip_rule_: skipped must be a one-element int64 tensor on {device}")
    for name, t in (("loss", loss), ("grad_norm", grad_norm)):
        if (t is not None or name == "loss") and not (isinstance(t, Tensor) and t.numel() == 1
                                                      and t.device == device and t.dtype.is_floating_point):
            raise ValueError(f"skip_rule_: {name} must be a one-element float tensor on {device}, got "
                             + (f"{t.dtype} of shape {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor)
                                else type(t).__name__))
    for name, n, low in (("count", count, 0), ("warmup", warmup, 1)):
        if isinstance(n, bool) or not isinstance(n, int) or n < low:
            raise ValueError(f"skip_rule_: {name} must be an int >= {low}, got {n!r}")
    if isinstance(sigma_factor, bool) or not isinstance(sigma_factor, numbers.Real) or not sigma_factor > 0:
        raise ValueError(f"skip_rule_: sigma_factor must be a number > 0, got {sigma_factor!r}")
    return _skip_rule_op(history, skipped, loss.detach(), None if grad_norm is None else grad_norm.detach(),
                         count, warmup, float(sigma_factor), skip_rule_backend(backend, device))


@torch.compiler.disable  # a cache lookup traced by dynamo would guard on the cache's contents: a recompile
def _numels(params, device: torch.device) -> Tensor:
    """The numels of ``params`` (whole tensors: a DTensor's global numel) as float64 on ``device``, cached by
    the numels (one upload on a miss, none in a steady state)."""
    numels = tuple(p.numel() for p in params)
    return _launch_plan.cached(("numels", device, numels),
                               lambda: _launch_plan.upload(numels, device, torch.float64))


def clip_floor(eps: float, dtype: torch.dtype) -> float:
    """The floor of v_hat in update clipping's statistic: eps^2 rounded to ``dtype`` (the math type), but at least
    its smallest normal number, since a tiny eps (1e-25) squares to 0 in float32 and a 0 gradient over a 0 v
    would make the RMS 0 / 0."""
    return max(float(torch.tensor(eps * eps, dtype=dtype)), torch.finfo(dtype).tiny)


def clip_lrs(clip_sums: Tensor, params: Sequence[Tensor], lr) -> Tensor:
    """Update clipping's per-tensor learning rates (SPEC 7.2): lr / max(1, RMS_i), RMS_i = sqrt(clip_sums[i] /
    numel_i), with ``clip_sums`` row 1 of ``adam_step_(clip_stats=True)``. A (T,) float64 tensor on the sums'
    device (device ops only); ``lr`` a number, a one-element tensor or one per tensor ((T,))."""
    device = clip_sums.device
    rms = (clip_sums.to(torch.float64) / _numels(params, device)).sqrt()
    return _lr_tensor(lr, len(params), device, "clip_lrs") / rms.clamp_min(1.0)
