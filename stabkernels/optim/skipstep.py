"""Skip-step (OLMo-core's ``SkipStepAdamW`` rule) and update clipping (StableAdamW, Wortsman et al. 2023).

:class:`SkipStep` wraps any ``torch.optim.Optimizer`` (ours too). ``step(loss=...)`` decides on the device,
with no host read, whether this step is a spike: the loss or the gradient norm more than ``sigma_factor``
standard deviations from its mean over the previous ``window`` steps (OLMo-core: ``|x - mean| / std >
sigma_factor``, unbiased std, the current value kept in the window afterwards, the check inactive until
``warmup`` values, including the current one, were seen; a NaN/inf loss or norm is a skip). The decision is a
0-d 0/1 ``keep`` tensor. How it is applied without a host read:

* an optimizer of this package that takes the skip flag (``accepts_skip``: RadiusAdamW, RadiusSGD,
  RadiusController, SAdam, StableAdamW, and PSS/PSSAdamW around an optimizer that skips on the device): the
  flag ``1 - keep`` is handed to its ``step()`` through ``skip_flag`` and folded into the fused kernels
  (SPEC 7.1), which read it on the device and, on a skipped step, write nothing: parameters, moments and step
  counters keep their bits, a NaN gradient cannot leak in, and nothing is copied;
* a torch optimizer with ``fused=True`` (Adam, AdamW, SGD, Adagrad): through its ``found_inf`` input, the way
  ``torch.amp.GradScaler`` skips on the device (weights, moments and step counters stay as they were);
* any other optimizer: the parameters and every tensor of its state are copied before the step and the old
  values selected back where ``keep`` is 0 (``torch.where``, so a NaN gradient cannot leak in). Bit-identical
  to the wrapped optimizer's own step when not skipping; costs one copy of parameters and state per step.

The skip-flag protocol, for any optimizer that wants the first path: a true ``accepts_skip`` attribute, and a
``skip_flag`` attribute (None, or a 0-d tensor on the parameters' device, nonzero meaning "skip") that its
``step()`` reads and passes to the fused updates' ``skip=`` (its step counters advancing by ``skip == 0``). SkipStep sets it for the duration of one ``step()`` and puts the previous value back.

Order with the radius controller and PSS: SkipStep goes outside, ``SkipStep(RadiusAdamW(...))``,
``SkipStep(RadiusController(...))``, ``SkipStep(PSSAdamW(...))``. Its decision comes from the loss and the raw
gradients, before any inner step; passed in as the skip flag, it reaches everything the inner step would
change: the radius controller still probes on its host schedule (the same on every rank, so a resumed run
probes on the same steps) but discards the skipped step's radius and keeps the last one, advances no moment
or counter and applies nothing; PSS neither updates its gradient-norm EMA nor smooths on a skipped step
(a spike SkipStep drops does not trigger a smoothing either) and skips its inner optimizer's step on the
device. The other order does not work: the radius controller and PSS step their inner optimizer themselves,
and a SkipStep inside them would never see the loss (and, inside PSS, PSS's EMA would absorb the spike).

Under DDP/FSDP2 the loss is averaged over ranks and the gradient norm is the global one (``sq_norms`` sums the
shards), so every rank reaches the same decision from the same bits.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import distributed, update
from .._checks import acc_dtype
from ..spectral import sq_norms
from ._state import adam_states, advance_steps
from ._wrapper import OptimizerWrapper

__all__ = ["SkipStep", "SkipStepReport", "StableAdamW", "skip_decision_reference",
           "stable_adamw_reference"]


def skip_decision_reference(history: list[float], x: float, sigma_factor: float) -> bool:
    """OLMo-core's test for one series, on host floats (for tests): True when ``x`` is a spike."""
    h = torch.tensor(history, dtype=torch.float64)
    std, mean = torch.std_mean(h)
    return not bool((torch.tensor(x, dtype=torch.float64) - mean).abs() / std <= sigma_factor)


class SkipStepReport:
    """``skipped``: this step's decision, a 0-d bool device tensor (read it when you log)."""

    def __init__(self, skipped: Tensor):
        self.skipped = skipped


class SkipStep(OptimizerWrapper):
    """Skips a step on a loss or gradient-norm spike, decided on the device (see the module docstring)::

        opt = SkipStep(torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True))
        loss = model(x).loss; loss.backward(); opt.step(loss=loss)

    ``grad_norm=``: this step's global gradient norm if already computed (e.g. by ``clip_grad_norm_``, called
    before ``step``); else it is computed with ``sq_norms`` over the gradients. ``use_grad_norm=False`` tests the
    loss alone. ``last.skipped`` (device) and :meth:`skipped_steps` (a device count; ``int()`` it to read).
    The rule runs as one kernel (:func:`stabkernels.update.skip_rule_`; ``backend`` picks it, default the best
    here)."""

    state_kind = "SkipStep"

    def __init__(self, optimizer: torch.optim.Optimizer, window: int = 128, sigma_factor: float = 6.0,
                 warmup: int | None = None, *, use_grad_norm: bool = True, process_group=None,
                 backend: str = "auto"):
        super().__init__(optimizer)
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"SkipStep: window must be an int >= 2, got {window!r}")
        if not (isinstance(sigma_factor, (int, float)) and math.isfinite(sigma_factor) and sigma_factor > 0):
            raise ValueError(f"SkipStep: sigma_factor must be a finite number > 0, got {sigma_factor!r}")
        warmup = max(20, window // 2) if warmup is None else warmup
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 3:
            raise ValueError(f"SkipStep: warmup must be an int >= 3 (a std needs two earlier values), got {warmup!r}")
        self.window, self.sigma_factor, self.warmup = window, float(sigma_factor), warmup
        self.use_grad_norm, self.process_group = use_grad_norm, process_group
        # resolved once (an unknown or unusable backend fails here): the rule's call below skips
        # update.skip_rule_'s checks, which SkipStep's own inputs pass
        self.backend = backend
        self._rule_backend = update.skip_rule_backend(backend, self._device())
        self._count = 0  # values recorded so far (host: it depends on no data)
        self._hist: Tensor | None = None  # (2, window) float64 on the params' device: losses, grad norms
        self._skipped: Tensor | None = None  # int64 count of skipped steps
        self.last: SkipStepReport | None = None

    # ------------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return next(p for g in self.param_groups for p in g["params"]).device

    def _ensure(self, device) -> None:
        if self._hist is None:
            self._hist = torch.zeros(2, self.window, dtype=torch.float64, device=device)
            self._skipped = torch.zeros((), dtype=torch.int64, device=device)

    @staticmethod
    def _as_value(x, name: str, device) -> Tensor:
        """``x`` as a one-element float tensor on ``device``, without a host-to-device copy (a CPU tensor beside
        device parameters is read on the host, which does not synchronise the device, and filled there)."""
        if isinstance(x, Tensor):
            if x.numel() != 1:
                raise ValueError(f"SkipStep: {name} must be a one-element tensor, got shape {tuple(x.shape)}")
            if hasattr(x, "full_tensor"):  # a DTensor (clip_grad_norm_'s norm under FSDP2): its whole value
                x = x.full_tensor()
            if x.device != device:
                if x.device.type != "cpu":
                    raise ValueError(f"SkipStep: {name} is on {x.device}, the parameters on {device}")
                return torch.full((), float(x), dtype=torch.float64, device=device)
            return x.detach() if x.dtype.is_floating_point else x.detach().double()
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise ValueError(f"SkipStep: {name} must be a number or a one-element tensor, got {type(x).__name__}")
        return torch.full((), float(x), dtype=torch.float64, device=device)

    def _global_grad_norm(self) -> Tensor:
        """The global gradient norm (``sq_norms`` sums the shards of DTensors): the same on every rank."""
        grads = [p.grad for p in self.params() if p.grad is not None]
        if not grads:
            raise ValueError("SkipStep: no parameter has a gradient (call backward() before step())")
        return sq_norms(grads).double().sum().sqrt()

    @torch.compiler.disable
    def decide(self, loss, grad_norm=None) -> Tensor:
        """Records this step's loss (and gradient norm) and returns ``keep``, a 0-d bool device tensor."""
        device = self._device()
        self._ensure(device)
        loss = self._as_value(loss, "loss", device)
        gn = None
        if self.use_grad_norm:
            gn = self._global_grad_norm() if grad_norm is None else self._as_value(grad_norm, "grad_norm", device)
        if distributed.group(self.process_group) is not None:
            # the mean loss over ranks, and the mean of a given norm (a computed one is global already; a DTensor
            # one was made whole above): one collective for both
            given = grad_norm is not None and gn is not None
            x = torch.stack([loss.reshape(()).double()] + ([gn.reshape(()).double()] if given else []))
            x = distributed.mean(x, self.process_group)
            loss, gn = x[0], (x[1] if given else gn)
        # one kernel: the test against the window, the window's new column and the skip count (SPEC 7.1)
        keep = torch.ops.stabkernels.skip_rule_(self._hist, self._skipped, loss, gn, self._count, self.warmup,
                                                self.sigma_factor, self._rule_backend)
        self._count += 1
        self.last = SkipStepReport(~keep)
        return keep

    def skipped_steps(self) -> Tensor:
        """The number of skipped steps so far, a 0-d int64 device tensor (``int()`` reads it)."""
        self._ensure(self._device())
        return self._skipped

    # ------------------------------------------------------------------------------------------------
    def _fused(self) -> bool:
        o = self.optimizer
        return type(o).__module__.startswith("torch.optim") and all(g.get("fused") for g in o.param_groups)

    @torch.compiler.disable
    def _snapshot(self) -> list[tuple[Tensor, Tensor]]:
        out = []  # DTensors (FSDP2) by their local shards: the select is element-wise
        L = distributed.local
        for p in self.params():
            out.append((L(p.detach()), L(p.detach()).clone()))
            for v in self.state.get(p, {}).values() if p in self.state else ():
                if isinstance(v, Tensor):
                    out.append((L(v), L(v).clone()))
        return out

    @torch.compiler.disable
    def _restore(self, saved, keep: Tensor) -> None:
        with torch.no_grad():
            for t, old in saved:
                t.copy_(torch.where(keep.to(t.device), t, old))

    def step(self, closure=None, *, loss=None, grad_norm=None):
        if loss is None and closure is not None:
            with torch.enable_grad():
                loss = closure()
        if loss is None:
            raise ValueError("SkipStep.step needs this step's loss: step(loss=loss) or step(closure)")
        keep = self.decide(loss, grad_norm)
        o = self.optimizer
        if getattr(o, "accepts_skip", False):  # the flag folded into the inner optimizer's fused kernels
            self._step_with_flag((~keep).to(torch.float64))
            return loss
        if self._fused():
            skip = (~keep).to(torch.float32)
            prior = getattr(o, "found_inf", None)  # a GradScaler's own found_inf: skip on either
            o.found_inf = skip if prior is None else torch.maximum(prior.reshape(()).to(skip.device), skip)
            try:
                o.step()
            finally:
                if prior is None:
                    del o.found_inf
                else:
                    o.found_inf = prior
            return loss
        saved = self._snapshot() if any(p in self.state for p in self.params()) else None
        if saved is None:  # no state yet: the first steps are inside the warm-up, always kept
            o.step()
            return loss
        o.step()
        self._restore(saved, keep)
        return loss

    @torch.compiler.disable  # an attribute set on the wrapped optimizer inside a graph
    def _step_with_flag(self, skip: Tensor) -> None:
        """The inner optimizer's step with its ``skip_flag`` set to ``skip`` (or to the larger of ``skip`` and a
        flag already set there, e.g. by an outer SkipStep), put back afterwards."""
        o = self.optimizer
        prior = o.skip_flag
        o.skip_flag = skip if prior is None else torch.maximum(prior.reshape(()).to(skip), skip)
        try:
            o.step()
        finally:
            o.skip_flag = prior

    def _wrapper_state(self) -> dict:
        self._ensure(self._device())
        return {"window": self.window, "sigma_factor": self.sigma_factor, "warmup": self.warmup,
                "count": self._count, "history": self._hist.clone(), "skipped": self._skipped.clone()}

    def _load_wrapper_state(self, state: dict) -> None:
        if state.get("window") != self.window:
            raise ValueError(f"SkipStep.load_state_dict: window {state.get('window')} in the state dict, "
                             f"{self.window} here")
        device = self._device()
        self.sigma_factor, self.warmup, self._count = state["sigma_factor"], state["warmup"], state["count"]
        self._hist = state["history"].to(device=device, dtype=torch.float64).clone()
        self._skipped = state["skipped"].to(device).clone()


# ----------------------------------------------------------------------------------------------------
# StableAdamW


def stable_adamw_reference(p, g, m, v, step: int, lr, betas, eps, weight_decay) -> None:
    """Plain-torch StableAdamW (Wortsman et al. 2023) on one tensor, in place: AdamW with the learning rate
    lr / max(1, RMS), RMS = sqrt(mean(g^2 / max(v_hat, eps^2))), v_hat the bias-corrected v of this step (eps^2
    at least the dtype's smallest normal number: :func:`stabkernels.update.clip_floor`); the decoupled decay uses
    the clipped learning rate too."""
    b1, b2 = betas
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    rms = (g * g / torch.clamp_min(v / bc2, update.clip_floor(eps, acc_dtype(v.dtype)))).mean().sqrt()
    lr_t = lr / torch.clamp_min(rms, 1.0)
    p.mul_(1 - lr_t * weight_decay)
    p.sub_(lr_t * ((m / bc1) / (v.sqrt() / math.sqrt(bc2) + eps)))


class StableAdamW(torch.optim.Optimizer):
    """AdamW with update clipping (StableAdamW, SPEC 7.2): per tensor the learning rate is lr / max(1, RMS), with
    RMS = sqrt(mean(g^2 / max(v_hat, eps^2))) of this step (v_hat the bias-corrected v, unrounded), the
    clipped learning rate also scaling the decoupled decay. ``adam_step_(clip_stats="clipped")``, no host read:
    a pass that reads g and v and sums g^2 / max(v_hat, eps^2) per tensor (writing nothing), then one ordinary
    fused AdamW step at the learning rates lr / max(1, RMS). g and v are read twice: 9 element-passes against
    AdamW's 7, no extra buffer; on CPU the two passes run per block of about a million elements, so that the
    second finds part of g and v in cache; on CUDA (CUDA or Triton kernels) they are two launches whose second
    forms the rates itself. State in torch's Adam layout (step, exp_avg, exp_avg_sq).

    Takes the skip flag (SPEC 7.1, ``accepts_skip``/``skip_flag``; :class:`SkipStep` sets it): a skipped step
    writes nothing, counters included. ``backend`` picks the fused kernels' backend (default: the best here)."""

    accepts_skip = True
    skip_flag: Tensor | None = None

    def __init__(self, params, lr: float | Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, backend: str = "auto"):
        if not (isinstance(lr, Tensor) or lr >= 0):
            raise ValueError(f"StableAdamW: lr must be >= 0, got {lr}")
        if not all(0 <= b < 1 for b in betas) or len(betas) != 2:
            raise ValueError(f"StableAdamW: betas must be two numbers in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"StableAdamW: eps must be > 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"StableAdamW: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.backend = backend

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise ValueError("StableAdamW does not support sparse gradients")
            self._step_group(group, params)
        return loss

    @torch.compiler.disable  # state created inside a graph would change its guards: the next step would recompile
    def _states(self, params) -> list:
        return adam_states(self.state, params, amsgrad=False)

    def _step_group(self, group, params) -> None:
        states = self._states(params)
        skip = update.skip_tensor(self.skip_flag, params[0].device)
        advance_steps(states, skip, self.backend)
        # tensor i at lr_i = lr / max(1, RMS_i), its decay too: the statistics pass and the step, fused
        update.adam_step_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                          [s["exp_avg_sq"] for s in states], step=states[0]["step"], lr=group["lr"],
                          betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"], skip=skip,
                          clip_stats="clipped", backend=self.backend)
