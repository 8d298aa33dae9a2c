"""Tangent logits of a model along a direction in parameter space (SPEC 2.3).

``tangent_logits`` evaluates a_k(x; v) = grad_theta z_k(x) . v for a batch, by forward-mode AD (one JVP,
about 1.5 forwards) or by finite differences, always functionally: parameters and buffers are never
written. By default the model runs in eval mode (BatchNorm uses, and does not update, its running
statistics; dropout is off); in train mode (``eval=False``) BatchNorm uses batch statistics and updates
copies of its buffers, and every forward replays one RNG state, so dropout draws the same masks each time
(those of the training forward when its state is passed). Every module's train/eval flag, the buffers and
the global RNG are left exactly as they were.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad as fwd_ad
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import distributed

METHODS = ("jvp", "fd")
PROBE_MODES = ("eval", "train")  # the mode probes of a model run in (radius controller, S-Adam)


def check_probe_mode(probe_mode: str) -> None:
    if probe_mode not in PROBE_MODES:
        raise ValueError(f"probe_mode must be one of {PROBE_MODES}, got {probe_mode!r}")


@contextlib.contextmanager
def eval_mode(model: nn.Module, enabled: bool = True):
    """Puts every module in eval mode and restores each module's own flag afterwards (a model in training
    may hold modules deliberately in eval mode, e.g. frozen BatchNorm)."""
    if not enabled:
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def as_direction(model: nn.Module, direction) -> dict[str, Tensor]:
    """``direction`` as {parameter name: tensor}. Accepts such a dict, or a sequence aligned with
    ``model.parameters()`` (None entries: the parameter does not move)."""
    named = dict(model.named_parameters())
    if isinstance(direction, Mapping):
        out = {}
        for name, t in direction.items():
            if name not in named:
                raise ValueError(f"direction names {name!r}, which is not a parameter of the model")
            if t is not None:
                out[name] = t
    else:
        items = list(direction)
        if len(items) != len(named):
            raise ValueError(f"direction has {len(items)} tensors, the model has {len(named)} parameters")
        out = {n: t for n, t in zip(named, items) if t is not None}
    for name, t in out.items():
        p = distributed.local(named[name])  # a DTensor (FSDP2) parameter moves by its local shard's part
        t = distributed.local(t)
        if not isinstance(t, Tensor) or t.shape != p.shape:
            raise ValueError(f"direction[{name!r}] must have the parameter's shape {tuple(p.shape)}, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        out[name] = t
    if not out:
        raise ValueError("direction moves no parameter")
    return out


RngState = tuple  # (CPU generator state, CUDA generator state or None)


def rng_state(device: torch.device) -> RngState:
    """The global RNG states a forward on ``device`` draws from (the CPU's, and the CUDA device's)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def replay_rng(state: RngState | None, device: torch.device):
    """Runs the block from RNG state ``state`` (None: from the current one) and restores the global RNG
    afterwards, so probing never shifts the training run's random stream."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
        if state is not None:
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1], device)
        yield


def as_logits(out, logits_fn: Callable | None) -> Tensor:
    """The model output as (rows, classes) logits: ``logits_fn`` applied (else an output's ``.logits``, as
    Hugging Face ``ModelOutput`` has, or a dict's ``"logits"``), leading dimensions flattened: for (batch, seq, vocab) logits every token
    position is a sample."""
    if logits_fn is not None:
        out = logits_fn(out)
    elif isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        out = out["logits"]
    elif not isinstance(out, Tensor) and isinstance(getattr(out, "logits", None), Tensor):
        out = out.logits
    if not isinstance(out, Tensor):
        raise TypeError(f"the model's output is a {type(out).__name__}; pass logits_fn to extract the logits")
    return out.reshape(-1, out.shape[-1]) if out.dim() != 2 else out


_warned_ops: set[str] = set()


def _warn_no_forward_ad(error: NotImplementedError) -> None:
    """One warning per op that has no forward-mode AD rule, naming it; the probe then uses finite differences."""
    m = re.search(r"forward AD with (\S+)", str(error))
    op = m.group(1).rstrip(".") if m else str(error).splitlines()[0]
    if op not in _warned_ops:
        _warned_ops.add(op)
        warnings.warn(f"stabkernels: {op} has no forward-mode AD rule; the JVP probe falls back to finite "
                      "differences for this model (method='fd' chooses that explicitly)", RuntimeWarning,
                      stacklevel=4)


def _owned_parameters(root: nn.Module, fsdp_type) -> list[tuple[nn.Module, str]]:
    """(module, name) of every parameter that FSDP2 module ``root`` gathers: those of its submodules that no
    nested FSDP2 module owns."""
    owned, stack = [], [root]
    while stack:
        m = stack.pop()
        owned += [(m, n) for n, p in m._parameters.items() if p is not None]
        stack += [c for c in m.children() if not isinstance(c, fsdp_type)]
    return owned


@contextlib.contextmanager
def _dual_parameters(model: nn.Module, tangents: dict[int, Tensor]):
    """Forward-mode AD through FSDP2's own forward, layer by layer: after each FSDP2 module's pre-forward hook
    has gathered its parameters, a hook of ours replaces each of them (for that forward) by a dual tensor whose
    tangent is the gathered tangent shard; FSDP's post-forward frees them as usual. Parameters outside every
    FSDP2 module are made dual for the whole call. ``tangents``: {id(parameter as the model holds it between
    forwards): its local tangent}. Within an active ``fwd_ad.dual_level()``."""
    from torch.distributed.fsdp import FSDPModule

    handles, plain = [], []
    # (module id, name) -> the parameter each FSDP2 module's owned slot holds between forwards (the shard)
    sharded: dict[tuple[int, str], Tensor] = {}
    owned_by: list[tuple[nn.Module, list]] = []
    for root in model.modules():
        if isinstance(root, FSDPModule):
            owned = _owned_parameters(root, FSDPModule)
            owned_by.append((root, owned))
            sharded.update({(id(m), n): m._parameters[n] for m, n in owned})

    def swap(owned):
        done = []
        for m, n in owned:
            shard = sharded[(id(m), n)]
            t = tangents.get(id(shard))
            if t is None:
                continue
            full = m._parameters[n]
            m._parameters[n] = fwd_ad.make_dual(full.detach(), distributed.whole(t, shard).to(full.dtype))
            done.append((m, n, full))
        return done

    for root, owned in owned_by:
        pending: list = []

        def pre(module, args, kwargs, owned=owned, pending=pending):
            pending.append(swap(owned))

        def post(module, args, kwargs, output, pending=pending):
            for m, n, full in pending.pop() if pending else []:
                if fwd_ad.unpack_dual(m._parameters[n]).tangent is not None:  # FSDP left it (the root)
                    m._parameters[n] = full

        handles.append(root.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(root.register_forward_hook(post, with_kwargs=True, always_call=True))
    for m in model.modules():
        for n, p in list(m._parameters.items()):
            if p is not None and (id(m), n) not in sharded and id(p) in tangents:
                m._parameters[n] = fwd_ad.make_dual(p.detach(), tangents[id(p)].to(p.dtype))
                plain.append((m, n, p))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m, n, p in plain:
            m._parameters[n] = p
        distributed.reshard(model)


@contextlib.contextmanager
def _buffers_restored(model: nn.Module, enabled: bool):
    """Every buffer of ``model`` copied back from a saved copy afterwards (train-mode probes on the model's own
    forward, where BatchNorm updates the real buffers)."""
    saved = [(b, b.clone()) for b in model.buffers()] if enabled else []
    try:
        yield
    finally:
        for b, c in saved:
            b.copy_(c)


def _jvp_in_place(model: nn.Module, named: dict[str, Tensor], tangents: dict[str, Tensor], inputs, logits_fn,
                  buffers: bool):
    """The JVP through the model's own forward (FSDP2); with ``buffers``, every buffer is restored after."""
    with _buffers_restored(model, buffers), _dual_parameters(model, {id(named[n]): t for n, t in tangents.items()}):
        return as_logits(_run(model, inputs), logits_fn)


def _run(model: nn.Module, inputs):
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _call_in_place(model: nn.Module, named: dict[str, Tensor], values: dict[str, Tensor], inputs, logits_fn,
                   buffers: bool):
    """The model's own forward (FSDP2 gathers its parameters from the shards) with the local shards of the
    parameters named in ``values`` overwritten by them; shards (and, with ``buffers``, every buffer) are
    copied back from saved copies afterwards, so they end bit-identical."""
    shards = {n: distributed.local(named[n]) for n in values}
    saved = {n: t.clone() for n, t in shards.items()}
    with _buffers_restored(model, buffers):
        try:
            for n, v in values.items():
                shards[n].copy_(v)
            return as_logits(_run(model, inputs), logits_fn)
        finally:
            distributed.reshard(model)  # the next forward gathers the shards again
            for n, t in shards.items():
                t.copy_(saved[n])


def _call(model: nn.Module, params: dict[str, Tensor], inputs, logits_fn):
    if isinstance(inputs, Mapping):
        out = functional_call(model, params, args=(), kwargs=dict(inputs), strict=False)
    elif isinstance(inputs, (tuple, list)):
        out = functional_call(model, params, tuple(inputs), strict=False)
    else:
        out = functional_call(model, params, (inputs,), strict=False)
    return as_logits(out, logits_fn)


def tangent_logits(model: nn.Module, inputs, direction, method: str = "jvp", eps: float = 1e-4,
                   logits_fn: Callable | None = None, *, return_logits: bool = False, eval: bool = True,
                   logits: Tensor | None = None, rng_state: RngState | None = None):
    """The (N, C) tangent logits of ``model`` on ``inputs`` along ``direction`` (SPEC 2.3).

    Args:
        model: any module whose output (after ``logits_fn``) holds logits in its last dimension; leading
            dimensions are flattened into rows (a language model's (B, T, V) becomes (B*T, V)).
        inputs: a tensor, a tuple of positional arguments, or a dict of keyword arguments for the model.
        direction: {parameter name: tensor} or a sequence aligned with ``model.parameters()``; parameters
            not named do not move. Not normalised here: the result is linear in it.
        method: ``"jvp"`` (exact, one forward-mode pass) or ``"fd"``: (f(theta + eps v) - f(theta)) / eps,
            two no-grad forwards; the perturbed parameters are new tensors, the model's are never written.
            (In fp32 a tiny eps v is partly lost to rounding when added to theta; the JVP has no such error.)
        logits_fn: maps the model's output to logits (e.g. ``lambda out: out.logits``).
        return_logits: also return the logits at theta: ``(logits, tangent)``.
        eval: run in eval mode (default, as the paper: BatchNorm statistics untouched, no dropout noise).
            ``False``: train mode, see the module docstring.
        logits: ``"fd"`` only: the logits f(theta) of a forward already run in the same mode on the same
            inputs (e.g. the training forward, with ``rng_state`` the RNG state it started from): then only
            f(theta + eps v) is evaluated, one forward instead of two.
        rng_state: train mode: the RNG state every forward starts from (see :func:`rng_state`); default the
            current one.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "fd" and not isinstance(eps, Tensor) and not eps > 0:  # a tensor eps stays on the device
        raise ValueError(f"eps must be > 0, got {eps}")
    if logits is not None and method != "fd":
        raise ValueError("logits= (the logits at theta, reused) applies to method='fd'")
    named = dict(model.named_parameters())
    dirs = as_direction(model, direction)
    names = list(dirs)
    device = named[names[0]].device
    # train mode: BatchNorm updates copies of the buffers; each forward gets fresh ones
    buffers = {} if eval else dict(model.named_buffers())
    # FSDP2: the model's own forward (functional_call's parameters would be replaced by FSDP's gathered ones):
    # dual parameters swapped in after each gather (JVP), or perturbed shards (finite differences)
    sharded = distributed.any_sharded(named.values())

    def call(params):
        with replay_rng(rng_state, device) if not eval else contextlib.nullcontext():
            if sharded:
                return _call_in_place(model, named, params, inputs, logits_fn, buffers=not eval)
            return _call(model, {**params, **{n: b.clone() for n, b in buffers.items()}}, inputs, logits_fn)

    with eval_mode(model, eval), torch.no_grad():
        primals = tuple(distributed.local(named[n]).detach() for n in names)
        tangents = tuple(dirs[n].detach().to(named[n].dtype) for n in names)
        if method == "jvp":
            # autograd's forward mode directly: torch.func.jvp computes the same numbers about 20% slower on a
            # small CNN (its max_pool2d rule runs the pooling twice). The fused attention kernels (flash,
            # memory-efficient, CPU flash) have no forward-mode rule; the math backend has.
            try:
                with fwd_ad.dual_level(), sdpa_kernel([SDPBackend.MATH]):
                    if sharded:
                        with replay_rng(rng_state, device) if not eval else contextlib.nullcontext():
                            out = _jvp_in_place(model, named, dict(zip(names, tangents)), inputs, logits_fn,
                                                buffers=not eval)
                    else:
                        out = call({n: fwd_ad.make_dual(p, t) for n, p, t in zip(names, primals, tangents)})
                    logits, tangent = fwd_ad.unpack_dual(out)
            except NotImplementedError as e:
                if not re.search(r"forward[ -](mode )?AD", str(e)):
                    raise
                _warn_no_forward_ad(e)
                method = "fd"
                # a step eps along the unit direction: eps / ||direction|| along the given one (no host read)
                sq = distributed.sum_shards(torch.stack([t.double().square().sum() for t in tangents]),
                                            [named[n] for n in names])
                eps = eps / sq.sum().sqrt().clamp_min(1e-30)
            else:
                if tangent is None:  # the logits do not depend on the parameters that move
                    tangent = torch.zeros_like(logits)
        if method == "fd":
            if logits is None:
                logits = call({} if sharded else dict(zip(names, primals)))
            moved = call({n: p + (eps * t).to(p.dtype) for n, p, t in zip(names, primals, tangents)})
            if moved.shape != logits.shape:
                raise ValueError(f"logits has shape {tuple(logits.shape)}, the model gives {tuple(moved.shape)} "
                                 "on these inputs")
            tangent = (moved - logits.to(moved.dtype)) / eps
    logits, tangent = logits.detach(), tangent.detach()
    return (logits, tangent) if return_logits else tangent


@contextlib.contextmanager
def _head_passthrough(head: nn.Module):
    """Makes ``head`` return its input, so the model's output becomes the features entering the head."""
    head.forward = lambda x, *a, **k: x  # instance attribute shadows the class's forward
    try:
        yield
    finally:
        del head.forward


def tangent_features(model: nn.Module, inputs, direction, head: nn.Linear, logits_fn: Callable | None = None, *,
                     eval: bool = True) -> tuple[Tensor, Tensor]:
    """(h, h_dot): the features entering the output layer ``head`` and their tangent along ``direction``
    (JVP), for :func:`stabkernels.tangent_spread_linear`, which then reduces the head's tangent logits
    without materialising them. ``head`` must be the model's last step (its output, after ``logits_fn``, is
    the logits); it is bypassed for this call, so the (N, V) logits are never computed either."""
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head must be an nn.Linear output layer, got {type(head).__name__}")
    with _head_passthrough(head):
        return tangent_logits(model, inputs, direction, "jvp", logits_fn=logits_fn, return_logits=True, eval=eval)


def head_features(model: nn.Module, inputs, head: nn.Linear, logits_fn: Callable | None = None, *,
                  eval: bool = True) -> Tensor:
    """The features entering the output layer ``head`` on ``inputs``: one forward without autograd, the head
    bypassed (its (N, V) logits never computed); parameters, buffers and the RNG left as they were."""
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head must be an nn.Linear output layer, got {type(head).__name__}")
    first = next(iter(model.parameters()))
    with eval_mode(model, eval), torch.no_grad(), _head_passthrough(head), _buffers_restored(model, not eval), \
            replay_rng(None, first.device):
        out = as_logits(_run(model, inputs), logits_fn)
        distributed.reshard(model)
        return out.detach()


def head_direction(model: nn.Module, head: nn.Linear, direction: dict[str, Tensor]):
    """The head's own weight and bias components of a {name: tensor} direction (None where absent)."""
    ids = {id(p): n for n, p in model.named_parameters()}
    w = direction.get(ids.get(id(head.weight)))
    b = direction.get(ids.get(id(head.bias))) if head.bias is not None else None
    return w, b
