"""The radius control loop shared by :class:`~.wrapper.RadiusController` and the fused optimizers
(:mod:`.fused`): the step's report (:class:`RadiusReport`), the control law (``_control_scale``: cap or set the
step at r rho), the measurement schedule (every ``every`` steps, re-measured after capped steps, backed off, within
a budget) and its constants, and the host bookkeeping that stays outside torch.compile's graphs (``_RadiusMixin``).
The constants are read here at call time (``REPROBE_STABLE`` by ``_RadiusMixin._record``): patch them on this
module, not on the package."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ... import update
from ..._checks import acc_dtype
from ..._hostread import DeferredRead, capturing
from .probe import RadiusProbe

MODES = ("cap", "set")
# The defaults (issue 26, bench/radius_cost.py): the radius measured every 16th step (with the probe's default
# method, .probe.DEFAULT_METHOD); every step is capped with the latest radius.
DEFAULT_EVERY = 16
# ... and measured again on the step after one whose step length reached half the latest radius (tau/rho >= 0.5:
# a lagged read, one step late), so a radius that shrank is measured before the stale one stops capping: on the
# lr sweep at width 64 a threshold of 1 left the default 22% more lr-sensitive than the full probe, 0.5 within 2%
# (normal training at the cost bench's lr probes on the schedule alone with either),
DEFAULT_REPROBE_ABOVE = 0.5
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


def _read(flag) -> bool:
    """A trigger flag: a host bool, or a DeferredRead of a one-element device flag (read one step late)."""
    return flag if isinstance(flag, bool) else bool(flag.values()[0])


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
