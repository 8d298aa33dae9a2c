"""Optimizer state set-up shared by the optimizers that keep torch's Adam layout (RadiusController's wrapped
Adam/AdamW, RadiusAdamW, SAdam), so a checkpoint of any of them loads into the others and into torch.optim."""
from __future__ import annotations

import torch

from .. import update


def adam_states(state, params, amsgrad: bool) -> list:
    """The Adam state of each parameter, created on first use: torch's layout (step, exp_avg, exp_avg_sq,
    max_exp_avg_sq), the step counter a float32 0-d tensor on the parameter's device (one kept on the host, e.g.
    by a non-capturable torch optimizer or a loaded checkpoint, moves there once). The caller advances the
    counters (on the device)."""
    states = [state[p] for p in params]
    for p, s in zip(params, states):
        if not s:
            s["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad:
                s["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif s["step"].device != p.device:
            s["step"] = s["step"].to(p.device)
    return states


def advance_steps(states, skip=None, backend: str = "auto") -> None:
    """Advances the step counters of ``states`` by one on their device, or by 0 where the skip flag ``skip`` (a
    0-d device tensor, SPEC 7.1) is nonzero: a skipped step leaves the counters, and so the next step's bias
    corrections, as they were. No host read (:func:`stabkernels.update.advance_steps_`; ``backend``: the
    optimizer's)."""
    update.advance_steps_([s["step"] for s in states], skip, backend=backend)


def sgd_buffers(state, params, momentum: float) -> tuple[list | None, bool]:
    """(momentum buffers, whether this is their first step) in torch.optim.SGD's layout: without momentum
    (None, False); on the first step buffers are created (the step then copies the gradient in, as torch's)."""
    if momentum == 0:
        return None, False
    have = [state[p].get("momentum_buffer") is not None for p in params]
    if any(have) and not all(have):
        raise RuntimeError("some SGD momentum buffers exist and others do not (a partial optimizer state)")
    first = not any(have)
    if first:  # zeros, not empty: a skipped first step (SPEC 7.1) leaves them as they were made
        for p in params:
            state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return [state[p]["momentum_buffer"] for p in params], first
