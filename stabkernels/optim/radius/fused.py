"""The fused radius optimizers (SPEC 2.4): :class:`RadiusAdamW` and :class:`RadiusSGD`, self-contained torch
optimizers with torch's state layout, and the proposals (``_adam_proposal``, ``_sgd_proposal``: one fused pass
advances the moments and writes the unit step u with sum(u^2)) that :class:`~.wrapper.RadiusController` also takes
on the wrapped optimizer's own state. The control loop is :mod:`.control`'s."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ... import update
from .._scratch import ScratchBuffers
from .._state import adam_states, advance_steps, sgd_buffers
from .._wrapper import ExtraStateMixin
from .control import DEFAULT_EVERY, _RadiusMixin


def _adam_proposal(states, group, params, us, decoupled: bool, backend: str, skip: Tensor | None = None,
                   clip: bool = False) -> Tensor:
    """Adam/AdamW's step for one group in torch's state layout (:func:`adam_states`): the moments advance in
    ``states``, the unit proposal goes to ``us``; returns sum(u^2) per tensor ((2, T) with ``clip``: and the
    clip statistics). The step counters live on the parameters' device (as torch's with capturable=True) and
    the kernels compute the bias corrections from them, so a step reads nothing back and a captured graph
    steps on. A nonzero ``skip`` advances nothing, counters included."""
    advance_steps(states, skip, backend)
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
