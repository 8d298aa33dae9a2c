"""The softmax convergence-radius step controller ("Ghosts of Softmax", SPEC 2.4).

Every step, the update the optimizer proposes is measured against the radius rho of the cross-entropy's
Taylor expansion along that update's own direction, and its length is capped at r * rho:
``cap`` mode (the paper's): eta_eff = min(eta, r rho / ||u||); ``set`` mode: eta_eff = r rho / ||u||.
The moments advance once; only the step length changes.

- :class:`RadiusController` wraps ``torch.optim.SGD``, ``Adam`` or ``AdamW`` and takes their step with fused
  kernels on their own state (exp_avg, exp_avg_sq, step / momentum_buffer), so the wrapped optimizer, a
  checkpoint of it and LR schedulers see exactly what its own step would have left, at lr = eta_eff.
- :class:`RadiusAdamW` and :class:`RadiusSGD` are the same as self-contained optimizers.
Both: one pass advances the moments and writes u with its norm, a second applies the step; rho, ||u|| and
eta_eff stay 0-d device tensors (no host read in a step).

Skip flag (SPEC 7.1; ``accepts_skip``): when ``skip_flag`` holds a nonzero 0-d device tensor (set by
:class:`~stabkernels.optim.SkipStep` around ``step()``), the fused kernels write nothing (no moment, no counter,
no parameter moves) and the radius is probed as usual (the schedule is the host's, the same on every rank) but
discarded: the last rho is kept, and the re-measurement flag is set, so the radius is measured again at the
next step the backed-off gap allows (a skipped measurement resets that gap; with ``reprobe_above=None`` the fixed
schedule only).
``RadiusAdamW(update_clip=True)`` clips each tensor's proposal to lr / max(1, RMS) (SPEC 7.2) before the
radius is measured along it: the control sees the step that is taken.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .. import distributed, spread, tangent, update
from .._checks import acc_dtype
from .._hostread import DeferredRead, capturing
from ._scratch import ScratchBuffers
from ._state import adam_states, advance_steps, sgd_buffers
from ._wrapper import ExtraStateMixin, OptimizerWrapper

MODES = ("cap", "set")
# "head": the zero-probe mode, the spread of the output head's own directional derivative on the training
# forward's features (no trunk forward); "jvp" and "fd" probe the whole model (stabkernels.tangent)
METHODS = tangent.METHODS + ("head",)
# The defaults (issue 26, bench/radius_cost.py): finite differences that reuse the training forward's logits,
# measured every 16th step; every step is capped with the latest radius.
DEFAULT_METHOD, DEFAULT_EVERY = "fd", 16
# ... and measured again on the step after a capped one (tau/rho reached 1: a lagged read, one step late),
DEFAULT_REPROBE_ABOVE = 1.0
# ... at most 3 times between two scheduled measurements: at most 4 measurements per 16 steps, whatever the
# run does (AdamW at lr 1e-3 on a fresh GPT-2 steps ~65x past the radius and re-measured on 69% of its steps
# without a budget; on the LM sweep's capped plateau, d=64, a budget of 3 kept the final loss of the full probe).
DEFAULT_REPROBE_BUDGET = 3
# a re-measured radius within this relative change of the last one lets the gap between re-measurements of a
# capped run double (persistent capping, e.g. AdamW at lr 1e-3 on a fresh GPT-2, ratio ~65, pays ~1/every)
REPROBE_STABLE = 0.25


@dataclass
class RadiusReport:
    """One controller step. Tensors are 0-d (on the parameters' device for the fused optimizers)."""

    step: int
    rho: Tensor  # radius along the step direction (inf: zero proposal)
    unit_norm: Tensor  # ||u||, the proposal at lr = 1 (all groups)
    tau: Tensor  # length of the proposed step at the groups' lr: || (lr_g u_g)_g ||
    ratio: Tensor  # tau / rho, the normalised step before control (the paper's r)
    scale: Tensor  # eta_eff / eta, the same for every group
    lr: list  # effective lr per group
    recomputed: bool  # the radius was measured this step (else the last rho was reused: every > 1)

    def as_floats(self) -> dict:
        """The numbers as Python floats (reads the device)."""
        f = lambda t: float(t) if isinstance(t, Tensor) else t  # noqa: E731
        return {"step": self.step, "rho": f(self.rho), "unit_norm": f(self.unit_norm), "tau": f(self.tau),
                "ratio": f(self.ratio), "scale": f(self.scale), "lr": [f(x) for x in self.lr]}


class RadiusProbe:
    """Measures the radius along a direction for one model: captures the last training forward (its inputs,
    so ``step()`` without arguments works under Trainer-style loops; in ``probe_mode="train"`` also its RNG
    state and logits, which the finite-difference probe reuses), selects the sample set and computes the
    tangent logits (JVP, finite differences, or the fused output-head spread)."""

    def __init__(self, model: nn.Module, method: str | None = None, samples: int | None = None,
                 logits_fn: Callable | None = None, *, reduce="max", eps: float = 1e-4, head: nn.Linear | None = None,
                 capture_inputs: bool = True, probe_mode: str | None = None, process_group=None,
                 backend: str = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        model = distributed.unwrap(model)
        self.process_group = process_group
        method = default_method(head) if method is None else method
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if head is not None and not isinstance(head, nn.Linear):
            raise TypeError(f"head must be the model's nn.Linear output layer, got {type(head).__name__}")
        if head is not None and method == "fd":
            raise ValueError("head=... takes method='jvp' (the fused output-head spread of a trunk JVP) or "
                             "method='head' (the head alone, no probe forward); got method='fd'")
        if method == "head" and head is None:
            raise ValueError("method='head' needs head=<the model's nn.Linear output layer>")
        if samples is not None and samples < 1:
            raise ValueError(f"samples must be >= 1 or None, got {samples}")
        probe_mode = default_probe_mode(method) if probe_mode is None else probe_mode
        tangent.check_probe_mode(probe_mode)
        spread.check_reduce(reduce)
        if reduce == "none":
            raise ValueError("reduce must aggregate over samples: 'max' or a quantile")
        self.model, self.method, self.samples, self.logits_fn = model, method, samples, logits_fn
        self.reduce, self.eps, self.head, self.backend = reduce, eps, head, backend
        self.probe_mode = probe_mode
        self.names = {id(p): n for n, p in model.named_parameters()}
        first = next(iter(model.parameters()), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.captured = None  # (args, kwargs) of the last training forward
        self.captured_rng = None  # train mode: the RNG state that forward started from
        self.captured_logits = None  # train mode, fd: its logits, or None when they cannot be reused
        self.captured_features = None  # method "head": the features entering the head in that forward
        self._sample_of_capture = False
        self._probing = False
        self._hooks = []
        if capture_inputs:
            self._hooks.append(model.register_forward_pre_hook(self._capture, with_kwargs=True))
            if probe_mode == "train" and method == "fd" and samples is None:
                self._hooks.append(model.register_forward_hook(self._capture_logits))
            if method == "head":
                self._hooks.append(head.register_forward_hook(self._capture_features))

    def _capture(self, module, args, kwargs):
        if module.training and not self._probing:
            self.captured = (args, kwargs)
            self.captured_logits = None
            self.captured_features = None
            if self.probe_mode == "train":
                self.captured_rng = tangent.rng_state(self.device)

    def _capture_logits(self, module, args, output):
        # logits computed under autocast are too coarse to difference against fp32 probe logits; an output
        # that is not logits is left for the probe to report (a hook must not break the user's forward)
        if module.training and not self._probing and not _autocast_on():
            try:
                self.captured_logits = tangent.as_logits(output, self.logits_fn).detach()
            except (TypeError, AttributeError, KeyError, IndexError):
                self.captured_logits = None

    def _capture_features(self, module, args, output):
        # the head's input, detached: a (tokens, d) matrix is all the zero-probe mode keeps of the forward
        if module.training and not self._probing and args:
            self.captured_features = args[0].detach()

    def remove_hook(self) -> None:
        """Stops capturing forward inputs (then ``step(inputs)`` must be given the sample set)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _captured_inputs(self):
        """The captured forward's inputs in the form ``tangent_logits`` takes (its own objects). A ``labels``
        keyword is left out: the radius needs the logits only, and a Hugging Face model given labels would also
        compute its loss (on the head's input features, with ``head=``, where it fails)."""
        args, kwargs = self.captured
        kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
        return kwargs if kwargs else (args[0] if len(args) == 1 else args)

    def sample_set(self, inputs):
        # whether the sample set is cut from the captured training forward's inputs (method "head" then takes
        # that forward's features)
        self._sample_of_capture = inputs is None or self._is_captured(inputs)
        if inputs is None:
            if self.captured is None:
                raise RuntimeError("no inputs: pass the batch to step(inputs), or run a training forward of the "
                                   "model first (its inputs are captured)")
            inputs = self._captured_inputs()
        if self.samples is None:
            return inputs
        take = lambda t: t[: self.samples] if isinstance(t, Tensor) and t.dim() > 0 else t  # noqa: E731
        if isinstance(inputs, dict):
            return {k: take(v) for k, v in inputs.items()}
        if isinstance(inputs, (tuple, list)):
            return type(inputs)(take(v) for v in inputs)
        return take(inputs)

    def _is_captured(self, inputs) -> bool:
        """Whether ``inputs`` (the sample set) are the captured training forward's own objects."""
        if self.captured is None:
            return False
        c = self._captured_inputs()
        if inputs is c:
            return True
        if isinstance(c, dict):
            return isinstance(inputs, dict) and inputs.keys() == c.keys() and all(inputs[k] is c[k] for k in c)
        return (isinstance(c, tuple) and isinstance(inputs, (tuple, list)) and len(inputs) == len(c)
                and all(a is b for a, b in zip(inputs, c)))

    def _global_spread(self, spreads: Tensor) -> Tensor:
        """The spread over the global sample set: the max over ranks of the local max (any split), or the
        quantile of every rank's per-sample spreads (equal per-rank counts)."""
        if self.reduce == "max":
            return distributed.max_(spread.reduce_spreads(spreads, "max"), self.process_group)
        return spread.reduce_spreads(distributed.gather_rows(spreads, self.process_group), self.reduce)

    def radius(self, inputs, direction: dict[int, Tensor], scale: Tensor) -> Tensor:
        """rho along the unit direction ``direction * scale`` ({id(param): tensor}); 0-d tensor."""
        named = {self.names[i]: t for i, t in direction.items() if i in self.names}
        if not named:
            raise ValueError("none of the optimizer's parameters belongs to the model")
        self._probing = True
        try:
            if self.method == "head":
                return self._head_radius(inputs, named, scale)
            if self.head is not None:
                h, h_dot = tangent.tangent_features(self.model, inputs, named, self.head, self.logits_fn,
                                                    eval=self.probe_mode == "eval")
                w_dot, b_dot = tangent.head_direction(self.model, self.head, named)
                # FSDP2: the head's weight and its direction whole (gathered; the features are whole already)
                weight = self.head.weight.detach()
                w_dot = None if w_dot is None else distributed.whole(w_dot, weight)
                b_dot = None if b_dot is None else distributed.whole(b_dot, self.head.bias)
                weight = weight.full_tensor() if distributed.is_sharded(weight) else weight
                acc = h_dot.dtype
                spreads = spread.tangent_spread_linear(
                    h.to(acc), h_dot, weight.to(acc),
                    None if w_dot is None else w_dot.to(acc), None if b_dot is None else b_dot.to(acc),
                    "none", backend=self.backend)
                return math.pi / (self._global_spread(spreads) * scale).clamp_min(spread.RADIUS_GUARD)
            # the unit direction is scale * u, so a step eps along it is a step eps * scale along u
            eps = self.eps * scale if self.method == "fd" else self.eps
            train = self.probe_mode == "train"
            same = train and self._is_captured(inputs)  # the training forward's dropout masks and logits
            a = tangent.tangent_logits(self.model, inputs, named, self.method, eps, self.logits_fn, eval=not train,
                                       logits=self.captured_logits if same and self.method == "fd" else None,
                                       rng_state=self.captured_rng if same else None)
            # softmax_radius's bound, pi / spread, with the spread taken over every rank's samples
            spreads = spread.row_spread(a * scale, "none", backend=self.backend)
            return math.pi / self._global_spread(spreads).clamp_min(spread.RADIUS_GUARD)
        finally:
            self._probing = False


    def _head_radius(self, inputs, named: dict[str, Tensor], scale: Tensor) -> Tensor:
        """The zero-probe radius: the spread of h dW^T + db, the head's own directional derivative with the
        features h held fixed (the trunk's share of the tangent is left out). h comes from the training forward
        when ``inputs`` are its own (no forward at all), else from one forward without autograd."""
        w_dot, b_dot = tangent.head_direction(self.model, self.head, named)
        if w_dot is None:
            raise ValueError("method='head' needs the head's weight among the optimizer's parameters")
        if self.captured_features is not None and self._sample_of_capture:
            h = self.captured_features if self.samples is None else self.captured_features[: self.samples]
        else:
            h = tangent.head_features(self.model, inputs, self.head, self.logits_fn, eval=self.probe_mode == "eval")
        w_dot = distributed.whole(w_dot, self.head.weight)
        b_dot = None if b_dot is None else distributed.whole(b_dot, self.head.bias)
        acc = acc_dtype(h.dtype)
        h = h.reshape(-1, h.shape[-1]).to(acc)
        # z' = h W'^T + b': tangent_spread_linear's h_dot @ weight^T term with (h_dot, weight) = (h, W')
        spreads = spread.tangent_spread_linear(h, h, w_dot.to(acc), None, None if b_dot is None else b_dot.to(acc),
                                               "none", backend=self.backend)
        return math.pi / (self._global_spread(spreads) * scale).clamp_min(spread.RADIUS_GUARD)


def default_method(head) -> str:
    """The probe method when none is given: finite differences (one extra forward without autograd, reusing
    the training forward's logits); with ``head=``, the fused output-head spread of a JVP."""
    return "jvp" if head is not None else DEFAULT_METHOD


def default_probe_mode(method: str) -> str:
    """The probe mode when none is given: JVP in eval mode (SPEC 2.3: BatchNorm running statistics untouched),
    finite differences in train mode (SPEC 2.3 has the difference restore BatchNorm buffers, which only a
    train-mode forward moves): the training-mode function, whose own forward then supplies f(theta)."""
    return "train" if method == "fd" else "eval"


def _read(flag) -> bool:
    """A trigger flag: a host bool, or a DeferredRead of a one-element device flag (read one step late)."""
    return flag if isinstance(flag, bool) else bool(flag.values()[0])


def _autocast_on() -> bool:
    return any(torch.is_autocast_enabled(t) for t in ("cpu", "cuda"))


def _zero_lr(lr) -> bool:
    """A float lr of 0 skips its group; a tensor lr is never read on the host (it would wait for the device)."""
    return not isinstance(lr, Tensor) and lr == 0


def _control_scale(rho: Tensor, tau: Tensor, r: float, mode: str) -> Tensor:
    """eta_eff / eta: min(1, r rho / tau) (cap) or r rho / tau (set); 1 for a zero step; 0 (no move) when
    rho is not finite, e.g. NaN logits."""
    ratio = r * rho / tau.clamp_min(1e-30)
    scale = ratio.clamp_max(1.0) if mode == "cap" else ratio
    scale = torch.where(tau > 0, scale, torch.ones_like(scale))
    return torch.where(torch.isnan(rho), torch.zeros_like(scale), scale)


def _check_controller_args(r, mode, every, reprobe_above, reprobe_budget):
    if not r > 0:
        raise ValueError(f"r must be > 0, got {r}")
    if reprobe_above is not None and not reprobe_above >= 0:
        raise ValueError(f"reprobe_above must be >= 0 or None, got {reprobe_above}")
    if reprobe_budget is not None and not (isinstance(reprobe_budget, int) and reprobe_budget >= 0):
        raise ValueError(f"reprobe_budget must be an int >= 0 or None, got {reprobe_budget!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")


class _RadiusMixin:
    """The control loop shared by the wrapper and the fused optimizers."""

    def _init_radius(self, model, r, mode, method, samples, every, logits_fn, reprobe_above=DEFAULT_REPROBE_ABOVE,
                     reprobe_budget=DEFAULT_REPROBE_BUDGET, **probe_kwargs):
        _check_controller_args(r, mode, every, reprobe_above, reprobe_budget)
        self.r, self.mode, self.every, self.reprobe_above = r, mode, every, reprobe_above
        self.reprobe_budget = reprobe_budget
        self.probe = RadiusProbe(model, method, samples, logits_fn, **probe_kwargs)
        self.steps = 0
        self._rho: Tensor | None = None
        # whether the last step's tau/rho passed reprobe_above * r (or rho was NaN): a DeferredRead of the
        # device flag, read on the next step (one step late, never waiting on the step that computed it)
        self._reprobe: DeferredRead | bool = False
        # Back-off while capping persists: the step after a capped one re-measures once ``_gap`` steps have
        # passed since the last measurement; the gap doubles (up to ``every``) each time the new radius is within
        # REPROBE_STABLE of the one before (the ``_changed`` flag of the last measurement, read one step late)
        # and falls back to 1 when it moved more, or when a step is not capped.
        self._gap, self._last_probe = 1, 0
        self._reprobes = 0  # re-measurements since the last scheduled one (at most reprobe_budget)
        self._changed: DeferredRead | bool | None = None
        self._recomputed = False  # whether the step being taken measured rho (set in _radius_along)
        self.last: RadiusReport | None = None

    def _measure(self, inputs, proposals, group_lrs, sums, skip=None) -> tuple[Tensor, Tensor, Tensor]:
        """(rho, tau, unit_norm) for per-group proposals (ids, us, clip factors or None), lrs and sum(u^2) per
        group (of the clipped proposals); a skipped step (``skip`` != 0) keeps the last rho."""
        sq = torch.stack([s.sum().double() for s in sums])
        lrs = torch.stack([update.scalar_tensor(lr, "lr", sq.device) for lr in group_lrs])
        tau = (lrs.square() * sq).sum().sqrt()
        unit_norm = sq.sum().sqrt()
        return self._radius_along(inputs, proposals, group_lrs, lrs, tau, skip), tau, unit_norm

    # Outside torch.compile's graphs: whether this step measures is a host decision, and a host bool inside the
    # compiled step would make dynamo compile one variant of the step per outcome (measured with torch 2.11: the
    # first reused-rho step compiled new graphs). Here the compiled step sees one tensor, rho, either way.
    @torch.compiler.disable
    def _radius_along(self, inputs, proposals, group_lrs, lrs, tau, skip) -> Tensor:
        """rho along this step's proposal: measured when ``_probe_now`` says so (``self._recomputed``), else the
        last one."""
        self._recomputed = self._probe_now()
        if not self._recomputed:
            return self._rho
        # one lr for all: the direction is u itself (no scaled copy); tensor lrs are compared by identity
        same_lr = all(lr is group_lrs[0] or (not isinstance(lr, Tensor) and lr == group_lrs[0])
                      for lr in group_lrs)
        direction = {}
        for (ids, us, clip), lr in zip(proposals, group_lrs):
            for k, (i, u) in enumerate(zip(ids, us)):
                d = u if clip is None else u * clip[k].to(u.dtype)  # update clipping: the step's direction
                direction[i] = d if same_lr else d * lr
        scale = (lrs[0] if same_lr else torch.ones((), dtype=torch.float64, device=tau.device)) / tau
        scale = torch.where(tau > 0, scale, torch.zeros_like(scale))
        with torch.no_grad():
            rho = self.probe.radius(self.probe.sample_set(inputs), direction, scale.float())
        rho = torch.where(tau > 0, rho.double(), torch.full_like(rho.double(), math.inf))
        if skip is not None and self._rho is not None:  # a skipped step's radius is discarded
            rho = torch.where(skip != 0, self._rho.to(rho.dtype), rho)
        return rho

    def _setup_state(self, group, params):
        """Creates the optimizer state of ``params`` (one group) on first use; returns what ``_propose`` needs."""
        raise NotImplementedError

    def _propose(self, group, params, us, state, skip) -> Tensor:
        """Advances the optimizer state of ``params`` (one group) as its step would, writes the unit proposal
        (the step at lr = 1, without decoupled decay) into ``us`` and returns sum(u^2) per tensor; with update
        clipping (2, T), the second row the clip statistics (SPEC 7.2). Nothing advances where ``skip`` (this
        step's skip flag, a 0-d device tensor or None) is nonzero."""
        raise NotImplementedError

    # the skip-flag protocol (SPEC 7.1): SkipStep sets skip_flag around step()
    accepts_skip = True
    skip_flag: Tensor | None = None

    def _decoupled_decay(self, group) -> float:
        return 0.0

    def _control_step(self, inputs, closure):
        """The controlled step: proposal, radius along it, the step at eta_eff (a device tensor). With a skip
        flag set, the kernels write nothing and the measured radius is discarded (the last one is kept)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live = self._prepare()
        if not live:
            return loss
        # passed down, not set on self: torch 2.11's dynamo refuses attribute writes inside the compiled step
        skip = update.skip_tensor(self.skip_flag, live[0][1][0].device)
        raw = [self._propose(g, ps, us, state, skip) for g, ps, us, state in live]
        sums, clips = [], []
        for (_, ps, _, _), s in zip(live, raw):
            if s.dim() == 2:  # update clipping: u_i scaled by 1 / max(1, RMS_i), so sum(u_i^2) by its square
                c = update.clip_lrs(s[1], ps, 1.0)
                s = s[0] * c.square().to(s.dtype)  # in the sums' dtype: c = 1 leaves them (and tau) bit for bit
            else:
                c = None
            sums.append(s)
            clips.append(c)
        rho, tau, unit_norm = self._measure(
            inputs, [([id(p) for p in ps], us, c) for (_, ps, us, _), c in zip(live, clips)],
            [g["lr"] for g, *_ in live], sums, skip)
        scale = _control_scale(rho, tau, self.r, self.mode)
        lrs = []
        for (g, ps, us, _), c in zip(live, clips):
            lr_eff = scale * update.scalar_tensor(g["lr"], "lr", scale.device)
            update.apply_update_(ps, us, lr_eff if c is None else lr_eff * c, self._decoupled_decay(g), skip=skip,
                                 backend=self.backend)
            lrs.append(lr_eff)
        self._record(rho, unit_norm, tau, scale, lrs, skip)
        return loss

    # Host bookkeeping runs outside torch.compile's graphs: dynamo dropped these attribute updates of the
    # optimizer object (measured: steps and last stayed at their initial values under torch.compile(opt.step)),
    # and state created or counters read inside a graph change its guards, so the next step would recompile.
    @torch.compiler.disable
    def _prepare(self) -> list:
        """Counts the step; returns (group, params with gradients, scratch proposals, set-up state) for every
        group that steps (a float lr of 0 skips its group; a tensor lr is never read)."""
        self.steps += 1
        live = []
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if params and not _zero_lr(g["lr"]):
                live.append((g, params, [self._scratch.like(p, acc_dtype(p.dtype)) for p in params],
                             self._setup_state(g, params)))
        return live

    @torch.compiler.disable
    def _probe_now(self) -> bool:
        """Whether this step measures the radius (else the last rho is reused): on the first step, every
        ``every``-th step, and on the step after one whose tau/rho passed ``reprobe_above * r`` (backed off, at
        most ``reprobe_budget`` times between two scheduled measurements). Decided on the host, outside
        torch.compile's graphs (the counter must not become a guard that recompiles every step), from the step
        counter and the previous step's flag: the same on every rank, whose rho and tau agree."""
        if self._rho is None or self.steps % self.every == 0:
            self._reprobes = 0
            return self._probing_now()
        if not _read(self._reprobe):
            self._gap = 1
            return False
        if self.steps - self._last_probe < self._gap:
            return False
        if self.reprobe_budget is not None and self._reprobes >= self.reprobe_budget:
            return False
        self._reprobes += 1
        return self._probing_now()

    def _probing_now(self) -> bool:
        if self._changed is not None:  # the last measurement's change sets the next gap
            self._gap = 1 if _read(self._changed) else min(2 * self._gap, self.every)
        self._last_probe = self.steps
        return True

    @torch.compiler.disable
    def _record(self, rho, unit_norm, tau, scale, lrs, skip=None) -> None:
        previous, recomputed = self._rho, self._recomputed
        self._rho = rho
        ratio = tau / rho
        self.last = RadiusReport(self.steps, rho, unit_norm, tau, ratio, scale, lrs, recomputed)
        if self.reprobe_above is not None and not capturing():  # a captured graph keeps the fixed schedule
            reprobe = (ratio >= self.reprobe_above * self.r) | torch.isnan(rho)
            changed = None
            if recomputed and previous is not None:
                changed = ~((rho / previous - 1).abs() <= REPROBE_STABLE)  # NaN: changed
            if skip is not None:
                # a skipped step kept the last rho and discarded its own measurement (SPEC 7.1): measure again
                # on the next step, with the backed-off gap reset (no news is not "rho held")
                reprobe = reprobe | (skip != 0)
                if changed is not None:
                    changed = changed | (skip != 0)
            self._reprobe = DeferredRead(reprobe)
            if changed is not None:
                self._changed = DeferredRead(changed)

    def _radius_state(self) -> dict:
        return {"steps": self.steps, "rho": None if self._rho is None else self._rho.detach().cpu(),
                "reprobe": _read(self._reprobe), "gap": self._gap, "last_probe": self._last_probe,
                "reprobes": self._reprobes,
                "changed": None if self._changed is None else _read(self._changed)}

    def _load_radius_state(self, state: dict, device) -> None:
        self.steps = state["steps"]
        self._rho = None if state["rho"] is None else state["rho"].to(device)
        self._reprobe = bool(state.get("reprobe", False))
        self._gap, self._last_probe = state.get("gap", 1), state.get("last_probe", 0)
        self._reprobes = state.get("reprobes", 0)
        self._changed = state.get("changed")


def _adam_proposal(states, group, params, us, decoupled: bool, backend: str, skip: Tensor | None = None,
                   clip: bool = False) -> Tensor:
    """Adam/AdamW's step for one group in torch's state layout (:func:`adam_states`): the moments advance in
    ``states``, the unit proposal goes to ``us``; returns sum(u^2) per tensor ((2, T) with ``clip``: and the
    clip statistics). The step counters live on the parameters' device (as torch's with capturable=True) and
    the kernels compute the bias corrections from them, so a step reads nothing back and a captured graph
    steps on. A nonzero ``skip`` advances nothing, counters included."""
    advance_steps(states, skip)
    return update.adam_step_(
        params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
        step=states[0]["step"], lr=1.0, betas=group["betas"], eps=group["eps"],
        weight_decay=group["weight_decay"], decoupled=decoupled, amsgrad=group["amsgrad"],
        maximize=group["maximize"], max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states] if group["amsgrad"]
        else None, updates=us, apply=False, skip=skip, clip_stats=clip, backend=backend)


def _sgd_proposal(buffers, group, params, us, backend: str, skip: Tensor | None = None) -> Tensor:
    """SGD's step for one group in torch's state layout (:func:`sgd_buffers`): the momentum buffers advance, the
    unit proposal goes to ``us``; returns sum(u^2) per tensor. A nonzero ``skip`` advances nothing (a skipped
    first step leaves the new buffers at 0: the next step is then mu * 0 + (1 - dampening) g, which is torch's
    first step g exactly when dampening is 0)."""
    bufs, first = buffers
    return update.sgd_step_(params, [p.grad for p in params], bufs, lr=1.0, momentum=group["momentum"],
                            dampening=group["dampening"], weight_decay=group["weight_decay"],
                            nesterov=group["nesterov"], maximize=group["maximize"], first=first, updates=us,
                            apply=False, skip=skip, backend=backend)


class RadiusController(_RadiusMixin, OptimizerWrapper):
    """Caps every step of a ``torch.optim.SGD``/``Adam``/``AdamW`` at r times the softmax convergence radius
    along the step (SPEC 2.4)::

        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        ctrl = RadiusController(opt, model)
        for x, y in loader:
            ctrl.zero_grad()
            F.cross_entropy(model(x), y).backward()
            ctrl.step(x)            # or ctrl.step(): the last training forward's inputs are captured

    Args:
        optimizer: SGD (momentum, dampening, Nesterov, weight decay, maximize), Adam or AdamW (amsgrad,
            maximize). Anything else raises ``TypeError``.
        model: the module whose logits define the radius (evaluated functionally; parameters, buffers,
            train/eval flags and the global RNG are left exactly as they were).
        r: the normalised step bound (1: the paper's).
        mode: ``"cap"`` (eta_eff = min(eta, r rho / ||u||)) or ``"set"`` (eta_eff = r rho / ||u||).
        method: how the radius is measured. ``"fd"`` (default without ``head``): finite differences, ``eps``
            along the unit direction; in train mode on the captured training forward its logits are f(theta),
            so a probe is one forward without autograd. ``"jvp"`` (default with ``head``): exact, forward-mode
            AD (about 1.5 steps' worth of work). ``"head"``: the zero-probe mode, the spread of the output
            head's own directional derivative on the training forward's features (needs ``head``; no trunk
            forward, leaves out the trunk's share of the tangent).
        samples: radius from the first ``samples`` rows of the inputs (None: all).
        every: measure the radius every ``every`` steps (default 16); every step in between is still capped,
            with the latest rho against the step's own length, so a learning-rate spike is capped at once.
            ``every=1`` is the paper's full probe. The schedule is the step counter's, the same on every rank;
            see ``reprobe_above`` for the data-dependent trigger.
        reprobe_above: also measure on the step after one whose tau/rho (against the reused rho) reached
            ``reprobe_above * r`` (default 1: after a capped step), so a sustained spike or a too-high learning
            rate is controlled with a fresh radius, while normal training probes only on the schedule. While
            capping persists the re-measurements back off: the gap doubles (up to ``every``) each time the new
            radius is within 25% of the last, and returns to 1 when it moved more. (A threshold of 0.5 made the
            LM demo at its best lr 1e-2 probe on 45% of its steps, 1 on 17%, at the same learning-rate
            sensitivity.) The flag is
            read one step late from pinned memory (``stabkernels._hostread.DeferredRead``: the host never waits
            on the step that computed it; the same flag on every rank). ``None``: the fixed schedule only, no
            read at all (CUDA-graph capture keeps to it by itself).
        reprobe_budget: at most this many of those re-measurements between two scheduled ones (default 3: at
            most 4 measurements in ``every`` = 16 steps, which bounds the probe's cost when capping persists, e.g.
            a too-high learning rate; the first re-measurement after a spike is always in the budget unless
            capping already persisted). ``None``: no budget.
        logits_fn: maps the model's output to logits.
        reduce: ``"max"`` spread (the paper's) or a quantile q of the per-sample spreads.
        head: the model's final ``nn.Linear``: with ``method="jvp"``, the fused output-head spread of a trunk
            JVP, never building the (N, V) tangent (large vocabularies); with ``method="head"``, the head alone.
        capture_inputs: capture the inputs of each training-mode forward of ``model`` for ``step()`` without
            arguments (a forward pre-hook; ``remove_hook()`` turns it off).
        probe_mode: which function the radius is measured on. ``"eval"``: the eval-mode function (BatchNorm
            running statistics, no dropout). ``"train"``: the training-mode function, the one the step
            minimises (batch statistics on copies of the buffers, the training forward's dropout masks). With
            ``method="fd"``, ``samples=None`` and the captured training forward (``step()`` or ``step(x)``
            with that forward's own ``x``), its logits are f(theta): one extra forward per step instead of two.
            Logits computed under autocast are not reused. Default (None): ``"eval"`` for ``"jvp"`` (SPEC 2.3),
            ``"train"`` for ``"fd"`` (SPEC 2.3's difference restores BatchNorm buffers: a train-mode forward).
            Both agree on models without BatchNorm or dropout.
        process_group: under torch.distributed (DDP), the group whose ranks share the step (default: the
            world). The radius is then the global sample set's: one all-reduce MAX of the spread per step
            (a quantile ``reduce`` all-gathers the per-sample spreads; equal per-rank counts). ``model`` may be
            the DDP-wrapped module or the inner one; probes run the inner one, never DDP's forward. Under
            FSDP2 (DTensor parameters) the sums over a tensor's shards run over its mesh, and the probes run
            FSDP's own forward (README "Distributed training").

    ``last`` holds the step's :class:`RadiusReport`. A NaN radius (NaN logits) gives a zero-length step (the
    moments still advance); a zero proposal steps normally.
    """

    state_kind = "RadiusController"

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, r: float = 1.0, mode: str = "cap",
                 method: str | None = None, samples: int | None = None, every: int = DEFAULT_EVERY, logits_fn: Callable | None = None,
                 *, reduce="max", eps: float = 1e-4, head: nn.Linear | None = None, capture_inputs: bool = True,
                 probe_mode: str | None = None, process_group=None, backend: str = "auto",
                 reprobe_above: float | None = DEFAULT_REPROBE_ABOVE,
                 reprobe_budget: int | None = DEFAULT_REPROBE_BUDGET):
        super().__init__(optimizer)
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            self.kind = "adam"
        elif isinstance(optimizer, torch.optim.SGD):
            self.kind = "sgd"
        else:
            raise TypeError(f"RadiusController supports torch.optim.SGD, Adam and AdamW, got "
                            f"{type(optimizer).__name__}")
        for g in optimizer.param_groups:
            if g.get("differentiable"):
                raise ValueError("RadiusController needs differentiable=False")
        self.backend = backend
        self._scratch = ScratchBuffers()
        self._init_radius(model, r, mode, method, samples, every, logits_fn, reprobe_above, reprobe_budget,
                          reduce=reduce, eps=eps,
                          head=head, capture_inputs=capture_inputs, probe_mode=probe_mode,
                          process_group=process_group, backend=backend)

    def remove_hook(self) -> None:
        self.probe.remove_hook()

    # -- the wrapped optimizer's own step, fused: the moments advance in its state, u goes to scratch
    def _setup_state(self, group, params):
        if self.kind == "adam":
            return adam_states(self.optimizer.state, params, group["amsgrad"])
        return sgd_buffers(self.optimizer.state, params, group["momentum"])

    def _propose(self, group, params, us, state, skip) -> Tensor:
        if self.kind == "adam":
            return _adam_proposal(state, group, params, us, self._decoupled(group), self.backend, skip)
        return _sgd_proposal(state, group, params, us, self.backend, skip)

    def _decoupled_decay(self, group) -> float:
        return group["weight_decay"] if self.kind == "adam" and self._decoupled(group) else 0.0

    def _decoupled(self, group) -> bool:
        return isinstance(self.optimizer, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay", False))

    @torch.no_grad()
    def step(self, inputs=None, closure: Callable | None = None):
        """Measures the radius along this step's proposal on ``inputs`` (or the captured ones) and takes the
        wrapped optimizer's step with each group's lr scaled to eta_eff (a device tensor: no host read). The
        moments advance in the wrapped optimizer's own state; its ``step()`` itself is not called."""
        return self._control_step(inputs, closure)

    def _wrapper_state(self) -> dict:
        return self._radius_state()

    def _load_wrapper_state(self, state: dict) -> None:
        self._load_radius_state(state, self.params()[0].device)


class _FusedRadiusOptimizer(_RadiusMixin, ExtraStateMixin, torch.optim.Optimizer):
    """Base of RadiusAdamW / RadiusSGD: a torch Optimizer whose state layout matches torch's own optimizer
    (exp_avg, exp_avg_sq, step / momentum_buffer), plus scratch buffers for the proposal."""

    def __init__(self, params, defaults, model, r, mode, method, samples, every, logits_fn, probe_kwargs):
        super().__init__(params, defaults)
        self.backend = probe_kwargs.get("backend", "auto")
        self._init_radius(model, r, mode, method, samples, every, logits_fn, **probe_kwargs)  # reprobe_above too
        self._scratch = ScratchBuffers()

    def remove_hook(self) -> None:
        self.probe.remove_hook()

    @torch.no_grad()
    def step(self, inputs=None, closure: Callable | None = None):
        return self._control_step(inputs, closure)

    extra_state_key = "radius"

    def _extra_state(self) -> dict:
        return self._radius_state()

    def _load_extra_state(self, state: dict) -> None:
        self._load_radius_state(state, self.param_groups[0]["params"][0].device)


class RadiusAdamW(_FusedRadiusOptimizer):
    """AdamW with the radius controller, fused (SPEC 2.4): pass 1 advances the moments and writes the unit
    proposal u with sum(u^2); the radius is measured along u; pass 2 applies
    p <- p (1 - eta_eff wd) - eta_eff u with eta_eff a device tensor. Same numbers as
    ``RadiusController(torch.optim.AdamW(...))`` to fp32 rounding; its state dict has AdamW's layout.

    ``model``, ``r``, ``mode``, ``method``, ``samples``, ``every``, ``logits_fn`` and the keyword options are
    :class:`RadiusController`'s. Memory: one fp32 buffer per parameter for u (scratch, not checkpointed).

    ``update_clip=True``: StableAdamW's update clipping (SPEC 7.2): each tensor's u is scaled by
    1 / max(1, RMS), RMS = sqrt(mean(g^2 / max(v_hat, eps^2))), computed in the pass that advances the moments;
    the radius is measured along the clipped proposal and the clipped learning rate also scales the decay, so
    with the control inactive (rho large) the step is StableAdamW's."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, model: nn.Module, r: float = 1.0, mode: str = "cap", method: str | None = None,
                 samples: int | None = None, every: int = DEFAULT_EVERY, logits_fn: Callable | None = None, maximize: bool = False,
                 update_clip: bool = False, **probe_kwargs):
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW hyper-parameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize)
        self.update_clip = bool(update_clip)
        super().__init__(params, defaults, model, r, mode, method, samples, every, logits_fn, probe_kwargs)

    def _setup_state(self, group, params):
        return adam_states(self.state, params, group["amsgrad"])

    def _propose(self, group, params, us, state, skip):
        return _adam_proposal(state, group, params, us, True, self.backend, skip, self.update_clip)

    def _decoupled_decay(self, group) -> float:
        return group["weight_decay"]


class RadiusSGD(_FusedRadiusOptimizer):
    """SGD (momentum, dampening, Nesterov, coupled weight decay) with the radius controller, fused; state
    layout of ``torch.optim.SGD`` (momentum_buffer). See :class:`RadiusAdamW`."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, model: nn.Module, r: float = 1.0,
                 mode: str = "cap", method: str | None = None, samples: int | None = None, every: int = DEFAULT_EVERY,
                 logits_fn: Callable | None = None, maximize: bool = False, **probe_kwargs):
        if not lr >= 0 or not momentum >= 0 or not weight_decay >= 0:
            raise ValueError(f"invalid SGD hyper-parameters lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize)
        super().__init__(params, defaults, model, r, mode, method, samples, every, logits_fn, probe_kwargs)

    def _setup_state(self, group, params):
        return sgd_buffers(self.state, params, group["momentum"])

    def _propose(self, group, params, us, state, skip):
        return _sgd_proposal(state, group, params, us, self.backend, skip)
