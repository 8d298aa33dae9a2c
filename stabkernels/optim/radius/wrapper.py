"""The radius controller as a wrapper (SPEC 2.4): :class:`RadiusController` takes the step of a
``torch.optim.SGD``/``Adam``/``AdamW`` with the fused proposals (:mod:`.fused`) on that optimizer's own state, at
the learning rate the control loop (:mod:`.control`) sets."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .._scratch import ScratchBuffers
from .._state import adam_states, sgd_buffers
from .._wrapper import OptimizerWrapper
from .control import DEFAULT_EVERY, DEFAULT_REPROBE_ABOVE, DEFAULT_REPROBE_BUDGET, _RadiusMixin
from .fused import _adam_proposal, _sgd_proposal


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
            ``reprobe_above * r`` (default 0.5: the step went half way to the radius), so a radius that shrank,
            a sustained spike or a too-high learning rate is controlled with a fresh radius, while normal
            training probes only on the schedule. While capping persists the re-measurements back off: the gap
            doubles (up to ``every``) each time the new radius is within 25% of the last, and returns to 1 when
            it moved more; ``reprobe_budget`` bounds them. (On the LM demo's lr sweep a threshold of 1, re-measuring
            only after a capped step, left the default 22% more lr-sensitive than the full probe at width 64;
            0.5 is within 2%. At lr 1e-2, where the model trains near its radius, 0.5 probes on 25% of the steps,
            the budget's bound, and 1 on 19%.) The flag is
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
            FSDP's own forward (docs/integrations.md "Distributed training").

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
