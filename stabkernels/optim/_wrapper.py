"""Base class for optimizers that wrap another ``torch.optim.Optimizer`` (PSS, RadiusController, OrthoGrad).

A wrapper *is* an Optimizer (LR schedulers and ``torch.amp.GradScaler`` accept it) whose ``param_groups``
and ``state`` are the wrapped optimizer's own objects, so a scheduler changing ``lr`` or a scaler unscaling
gradients acts on the one optimizer that steps. ``state_dict()`` holds the wrapped optimizer's state dict
and the wrapper's own state; ``load_state_dict()`` restores both.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class OptimizerWrapper(torch.optim.Optimizer):
    # Names the layout of the wrapper's state; subclasses that share a layout (PSSAdamW, PSS) share it.
    state_kind = "OptimizerWrapper"

    def __init__(self, optimizer: torch.optim.Optimizer):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{type(self).__name__} wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        # Optimizer's hook machinery, without re-registering the parameters (Optimizer.__init__ would copy
        # the groups; we share them).
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    def params(self) -> list[torch.Tensor]:
        """All parameters of the wrapped optimizer, in state-dict order."""
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    # subclasses: their own state, as plain tensors/numbers
    def _wrapper_state(self) -> dict:
        return {}

    def _load_wrapper_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "wrapper": {"kind": self.state_kind, **self._wrapper_state()}}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"optimizer", "wrapper"}:
            raise ValueError(f"{type(self).__name__}.load_state_dict expects the dict its state_dict() returns "
                             f"(keys 'optimizer' and 'wrapper'), got keys {sorted(state_dict)}")
        kind = state_dict["wrapper"].get("kind")
        if kind != self.state_kind:
            raise ValueError(f"state dict of a {kind} wrapper, loaded into a {type(self).__name__}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._load_wrapper_state({k: v for k, v in state_dict["wrapper"].items() if k != "kind"})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"


class ExtraStateMixin:
    """For ``torch.optim.Optimizer`` subclasses whose state goes beyond torch's per-parameter layout (RNG
    counters, the last radius): ``state_dict()`` adds it under ``extra_state_key``, ``load_state_dict()``
    takes it back; a plain torch state dict (without the key) still loads."""

    extra_state_key = "extra"

    def _extra_state(self) -> dict:
        raise NotImplementedError

    def _load_extra_state(self, state: dict) -> None:
        raise NotImplementedError

    def state_dict(self):
        sd = super().state_dict()
        sd[self.extra_state_key] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop(self.extra_state_key, None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self._load_extra_state(extra)
