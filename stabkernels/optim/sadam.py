"""S-Adam ("Singularity-aware Adam", SPEC 3.1): AdamW whose step is damped where random-direction probes
find the loss locally unstable."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from .. import directional, distributed, update
from .._hostread import DeferredRead
from ..tangent import check_probe_mode, eval_mode
from ._capture import InputCapture
from ._scratch import ScratchBuffers
from ._state import adam_states, advance_steps
from ._wrapper import ExtraStateMixin

EPS_MODES = ("torch", "authors")


def lgi(D: Tensor) -> Tensor:
    """Local geometric instability of finite-difference slopes D (SPEC 3.1 step 3): the unbiased variance
    over mean(D^2) + 1e-6, over the finite entries; 0 with fewer than two. Lies in [0, k / (k - 1)]."""
    valid = torch.isfinite(D)
    k = valid.sum()
    d = torch.where(valid, D, torch.zeros_like(D))
    kf = k.to(D.dtype)
    mean = d.sum() / kf.clamp_min(1)
    var = (torch.where(valid, d - mean, torch.zeros_like(d)) ** 2).sum() / (kf - 1).clamp_min(1)
    rho = var / ((d ** 2).sum() / kf.clamp_min(1) + 1e-6)
    return torch.where(k >= 2, rho, torch.zeros_like(rho))


def damping_factor(rho: Tensor, damping: float) -> Tensor:
    """alpha = exp(-lambda * min(rho, 10)) (SPEC 3.1 step 4)."""
    return torch.exp(-damping * rho.clamp_max(10.0))


@dataclass
class SAdamReport:
    """One step, per parameter group: rho, alpha and dropped (0-d tensors), D (the k slopes, NaN where a
    probe loss was not finite), the loss at theta."""

    loss: Tensor
    rho: list
    alpha: list
    D: list
    dropped: list


class SAdam(InputCapture, ExtraStateMixin, torch.optim.Optimizer):
    """S-Adam (SPEC 3.1): AdamW with the step multiplied by alpha = exp(-damping * min(rho, 10)), where rho is
    the local geometric instability of k finite-difference slopes D_i = (L(theta + sigma d_i) - L_0) / sigma
    along random unit-per-tensor directions d_i.

    Usage::

        opt = SAdam(model, lr=1e-3, loss_fn=lambda out, x, y: F.cross_entropy(out, y))
        loss = F.cross_entropy(model(x, y), y)       # the training forward (inputs captured)
        opt.zero_grad(); loss.backward()
        opt.step()                                   # or opt.step(probe_closure=lambda: F.cross_entropy(model(x), y))

    ``step(closure=None, *, loss=None, probe_closure=None)``:

    - ``closure`` follows torch.optim's convention (LBFGS, Lightning): called once, with gradients enabled, to
      run the forward and the backward; its loss is returned. (A closure that only returns the loss raises a
      ``TypeError`` that points to ``probe_closure``: earlier versions took the probe function here.)
    - The probe losses at the perturbed points come from ``probe_closure`` when given (the batch loss at the
      current parameters, no backward; called under ``no_grad``); else from the last training-mode forward
      of ``model``, captured by a forward pre-hook (``capture_inputs=True``) and re-run at each perturbed
      point: its output's ``.loss`` when that call computed one (Hugging Face models given labels), else
      ``loss_fn(output, *args, **kwargs)`` of the captured arguments. So ``SAdam(model)`` + ``opt.step()``
      works under HF Trainer, accelerate and Lightning.
    - ``loss`` is the loss already computed at theta (else the probe function is evaluated there once more).
      In ``probe_mode="eval"`` a model in training mode makes that loss a training-mode one (BatchNorm batch
      statistics, dropout), which the eval-mode probes must not be compared with, so the loss at theta is then
      evaluated again in eval mode (one more forward).

    The perturbed points are written into scratch tensors (:func:`stabkernels.perturb`) that the parameters
    point to while the probe function runs; the parameters' own storage is never written, so after the probes
    parameters, buffers (restored from a copy) and every module's train/eval flag are bit-identical to before.

    Directions: probe i of step t uses probe number ``probe_counter`` of the stream ``seed`` (the counter
    advances by one per probe); both are saved in the state dict, so a resumed run draws the same directions.
    A probe whose loss is not finite is dropped (with a warning) and never reaches rho or the weights; fewer
    than two finite probes give rho = 0. ``probes=0`` or ``damping=0`` is ``torch.optim.AdamW``.

    Args:
        params: parameters or param groups (each group may override every hyper-parameter), or the model.
        probes, sigma, damping: k, the probe step and lambda (the authors' defaults 8, 0.01, 2.0).
        probe_mode: ``"eval"`` (default: BatchNorm statistics and dropout off during probes; needs the
            model) or ``"train"`` (the authors' code, for fidelity).
        seed: the direction stream (None: derived from ``torch.initial_seed()``, so ``torch.manual_seed`` makes
            it reproducible; nothing is drawn from the global generator, whose stream dropout and data order use).
        model: the module the probes evaluate (implied when ``params`` is a module).
        eps_mode: ``"torch"`` (torch.optim.AdamW's eps placement) or ``"authors"`` (eps added to the
            uncorrected sqrt(v), as the authors' code does; about 1e-5 relative difference).
        loss_fn: ``loss_fn(output, *args, **kwargs)`` gives the probe loss from a re-run of the captured
            training forward whose output has no ``.loss``.
        capture_inputs: capture the inputs of each training-mode forward of ``model`` (a forward pre-hook;
            ``remove_hook()`` removes it).
        process_group: under torch.distributed (DDP), the group whose ranks share the step (default: the
            world): the losses at theta and at the perturbed points are averaged over it (two all-reduces of
            k + 1 numbers), so every rank computes the global batch's slopes; the seed is rank 0's. ``model``
            may be DDP-wrapped; probes run the inner module. Under FSDP2 (DTensor parameters) the perturbed
            points are written into the shards and copied back afterwards.
        warn_nonfinite: warn when probes are dropped; the count is read back without a synchronisation, so the
            warning comes from the next ``step()`` (``last.dropped`` holds it at once, on the device).
        update_clip: StableAdamW's update clipping (SPEC 7.2): each tensor's learning rate is
            lr / max(1, RMS), RMS = sqrt(mean(g^2 / max(v_hat, eps^2))) (eps as given, in both eps modes), from
            a pass that reads g and v before the step; the damping alpha then scales the step, not the decay
            (as without clipping). Costs a read of g and v.

    Skip flag (SPEC 7.1; ``accepts_skip``): a nonzero 0-d device tensor in ``skip_flag`` (set by
    :class:`~stabkernels.optim.SkipStep` around ``step()``) makes the fused kernels write nothing: no moment, no
    step counter, no parameter moves. The probes still run (their counter advances, so the directions of the
    later steps are those of a run without the skip's decision: resumes stay bit-identical).
    """

    accepts_skip = True
    skip_flag: Tensor | None = None

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 probes: int = 8, sigma: float = 0.01, damping: float = 2.0, probe_mode: str = "eval",
                 seed: int | None = None, *, model: nn.Module | None = None, eps_mode: str = "torch",
                 loss_fn: Callable | None = None, capture_inputs: bool = True, warn_nonfinite: bool = True,
                 process_group=None, backend: str = "auto", update_clip: bool = False):
        if isinstance(params, nn.Module):
            model = params if model is None else model
            params = params.parameters()
        model = None if model is None else distributed.unwrap(model)
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW hyper-parameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        check_probe_mode(probe_mode)
        if eps_mode not in EPS_MODES:
            raise ValueError(f"eps_mode must be one of {EPS_MODES}, got {eps_mode!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, probes=probes, sigma=sigma,
                        damping=damping)
        super().__init__(params, defaults)
        for g in self.param_groups:
            if int(g["probes"]) != g["probes"] or g["probes"] < 0:
                raise ValueError(f"probes must be an integer >= 0, got {g['probes']}")
            if not g["sigma"] > 0 or not math.isfinite(g["sigma"]):
                raise ValueError(f"sigma must be finite and > 0, got {g['sigma']}")
            if not g["damping"] >= 0:
                raise ValueError(f"damping must be >= 0, got {g['damping']}")
        if probe_mode == "eval" and model is None and self._probing():
            raise ValueError("probe_mode='eval' needs the model (to switch BatchNorm/dropout to eval and protect "
                             "buffers during the probes): pass SAdam(model, ...) or model=..., or use "
                             "probe_mode='train'")
        self.model, self.probe_mode, self.eps_mode, self.loss_fn = model, probe_mode, eps_mode, loss_fn
        self.process_group = process_group
        self._seed_agreed = False
        self.captured = None  # (args, kwargs) of the model's last training-mode forward
        self._in_probe = False
        self._hook = self._capture_inputs(model) if model is not None and capture_inputs else None
        self.warn_nonfinite, self.backend = warn_nonfinite, backend
        self.seed = directional.splitmix64(torch.initial_seed()) >> 2 if seed is None else int(seed)
        self.probe_counter = 0
        self._step_count = 0
        self._dropped: tuple[int, DeferredRead] | None = None  # the last probing step's dropped count
        self._scratch = ScratchBuffers()
        self.update_clip = bool(update_clip)
        self.last: SAdamReport | None = None

    def _probing(self) -> bool:
        return any(g["probes"] > 0 and g["damping"] != 0 for g in self.param_groups)

    # ----------------------------------------------------------------------------------------------
    # Not traced by torch.compile: the probe counter advances every call (dynamo recompiled the step each time,
    # measured 39x slower than eager), and the probes call the model anyway.
    @torch.compiler.disable
    def _probe(self, params: list[Tensor], k: int, sigma: float, closure: Callable, loss0: Tensor) -> Tensor:
        """The k slopes D_i for the parameters ``params`` perturbed together; NaN for non-finite probes."""
        probe = self._probe_shards if distributed.any_sharded(params) else self._probe_scratch
        values = probe(params, k, sigma, closure)
        losses = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()).to(loss0.device) for v in values])
        D = (distributed.mean(losses, self.process_group) - loss0) / sigma
        return torch.where(torch.isfinite(D), D, torch.full_like(D, float("nan")))

    def _probe_scratch(self, params: list[Tensor], k: int, sigma: float, closure: Callable) -> list:
        """The k probe losses, the perturbed points written into scratch tensors the parameters point to while
        the closure runs."""
        scratch = [self._scratch.like(p) for p in params]
        originals = [p.data for p in params]
        values = []
        for _ in range(k):
            directional.perturb(originals, self.seed, self.probe_counter, sigma, out=scratch, backend=self.backend)
            self.probe_counter += 1
            for p, s in zip(params, scratch):
                p.data = s
            try:
                values.append(closure())
            finally:
                for p, o in zip(params, originals):
                    p.data = o
        return values

    def _probe_shards(self, params: list[Tensor], k: int, sigma: float, closure: Callable) -> list:
        """FSDP2: the perturbed points are written into the parameters' local shards (FSDP's forward gathers
        from them) and the shards are copied back from a saved copy afterwards: bit-identical, as with the
        scratch tensors."""
        if self.model is None:
            raise ValueError("SAdam on FSDP2 (DTensor) parameters needs the model (SAdam(model, ...) or model=...): "
                             "its gathered parameters are freed after each probe forward")
        shards = distributed.locals_(params)
        saved = [s.clone() for s in shards]
        losses = []
        try:
            for _ in range(k):
                directions = directional.random_directions(params, self.seed, self.probe_counter,
                                                           backend=self.backend)
                self.probe_counter += 1
                distributed.reshard(self.model)  # each probe forward gathers the perturbed shards
                for s, s0, d in zip(shards, saved, directions):
                    s.copy_(s0.to(d.dtype) + torch.tensor(sigma, dtype=d.dtype) * d)
                losses.append(closure())
        finally:
            distributed.reshard(self.model)
            for s, s0 in zip(shards, saved):
                s.copy_(s0)
        return losses

    def remove_hook(self) -> None:
        """Stops capturing the model's forward inputs (then ``step`` needs ``probe_closure``)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _captured_probe(self) -> Callable:
        """The probe function that re-runs the captured training forward: its ``.loss``, else ``loss_fn``."""
        if self.captured is None:
            raise ValueError(
                "SAdam.step needs the probe losses: pass step(probe_closure=...) (the batch loss, no backward), or "
                "construct SAdam(model, ...) and run a training forward of the model before step() (its output's "
                ".loss, or loss_fn=..., gives the loss); or use probes=0 / damping=0")
        args, kwargs = self.captured

        def probe():
            out = self.model(*args, **kwargs)
            loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
            if loss is not None:
                return loss
            if self.loss_fn is None:
                raise ValueError(f"SAdam: the captured forward's output ({type(out).__name__}) has no .loss; pass "
                                 "SAdam(..., loss_fn=lambda output, *args, **kwargs: ...) or step(probe_closure=...)")
            return self.loss_fn(out, *args, **kwargs)

        return probe

    def _grad_versions(self) -> list:
        return [None if p.grad is None else (id(p.grad), p.grad._version)
                for g in self.param_groups for p in g["params"]]

    def _run_training_closure(self, closure: Callable):
        before = self._grad_versions()
        with torch.enable_grad():
            out = closure()
        if self._grad_versions() == before and isinstance(out, Tensor) and out.requires_grad:
            raise TypeError(
                "SAdam.step(closure): the closure follows torch.optim's convention and must run the forward and the "
                "backward (it ran once and changed no gradient). A closure that only returns the batch loss for the "
                "probes goes in step(probe_closure=...)")
        return out

    @torch.no_grad()
    def step(self, closure: Callable | None = None, *, loss: Tensor | float | None = None,
             probe_closure: Callable | None = None):
        """One S-Adam step; see the class docstring for ``closure``, ``loss`` and ``probe_closure``."""
        train_loss = self._run_training_closure(closure) if closure is not None else None
        if loss is None and train_loss is not None:
            loss = train_loss.detach() if isinstance(train_loss, Tensor) else train_loss
        probing = self._probing()
        if probing:
            probe_fn = probe_closure if probe_closure is not None else self._captured_probe()
            self._agree_seed()
        self._begin_step()
        groups = [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]
        groups = [(g, ps) for g, ps in groups if ps]
        if not groups:
            return train_loss if closure is not None else loss
        device = groups[0][1][0].device
        skip = update.skip_tensor(self.skip_flag, device)
        report = SAdamReport(loss=torch.full((), math.nan, device=device), rho=[], alpha=[], D=[], dropped=[])
        alphas = [torch.ones((), dtype=torch.float64, device=device) for _ in groups]
        if probing:
            self._run_probes(groups, alphas, report, loss, probe_fn, device)
        for (g, params), alpha, states in zip(groups, alphas, self._adam_states(groups)):
            report.alpha.append(alpha)
            self._adamw(g, params, alpha, states, skip)
        self._record(report)
        if closure is not None:
            return train_loss
        return report.loss if probing else loss

    @torch.compiler.disable  # the probes run the model k times with host-side bookkeeping (graph breaks anyway)
    def _run_probes(self, groups, alphas, report, loss, probe_fn, device) -> None:
        """Probes every bundle of groups that damps; writes each group's alpha into ``alphas`` and the probe
        figures into ``report``."""
        in_eval = self.model is not None and self.probe_mode == "eval"
        if in_eval and any(m.training for m in self.model.modules()):
            loss = None  # a training-mode loss; the probes compare against the loss in eval mode
        buffers = [b.clone() for b in self.model.buffers()] if self.model is not None else []
        self._in_probe = True
        try:
            with eval_mode(self.model, in_eval):
                loss0 = probe_fn() if loss is None else loss
                loss0 = torch.as_tensor(loss0).detach().to(device=device, dtype=torch.float64).reshape(())
                loss0 = distributed.mean(loss0, self.process_group)  # the global batch's loss
                report.loss = loss0
                # groups with the same probe settings are probed together: one rho for the bundle
                bundles: dict[tuple, list[int]] = {}
                for i, (g, _) in enumerate(groups):
                    if g["probes"] > 0 and g["damping"] != 0:
                        bundles.setdefault((int(g["probes"]), float(g["sigma"])), []).append(i)
                for (k, sigma), members in bundles.items():
                    params = [p for i in members for p in groups[i][1]]
                    D = self._probe(params, k, sigma, probe_fn, loss0)
                    rho = lgi(D)
                    for i in members:
                        alphas[i] = damping_factor(rho, groups[i][0]["damping"])
                        report.D.append(D)
                        report.rho.append(rho)
                        report.dropped.append((~torch.isfinite(D)).sum())
        finally:
            self._in_probe = False
            for b, saved in zip(self.model.buffers() if self.model is not None else [], buffers):
                b.copy_(saved)
        if self.warn_nonfinite and report.dropped:
            self._keep_dropped(torch.stack(report.dropped).sum())

    # Host bookkeeping outside torch.compile's graphs: a counter or object that changes every step would make
    # dynamo recompile the step each time (measured), and it dropped such attribute updates in other optimizers.
    @torch.compiler.disable
    def _agree_seed(self) -> None:
        """Every rank draws rank 0's directions (once; a host integer)."""
        if not self._seed_agreed:
            self.seed, self._seed_agreed = distributed.broadcast_int(self.seed, self.process_group), True

    @torch.compiler.disable
    def _begin_step(self) -> None:
        self._warn_dropped()
        self._step_count += 1

    @torch.compiler.disable
    def _keep_dropped(self, count: Tensor) -> None:
        self._dropped = (self._step_count, DeferredRead(count))

    @torch.compiler.disable
    def _record(self, report: SAdamReport) -> None:
        self.last = report

    def _warn_dropped(self) -> None:
        """Warns about an earlier step's dropped probes once its count has reached the host (read back without
        a synchronisation, so the warning comes a step late)."""
        if self._dropped is None or not self._dropped[1].ready():
            return
        step, count = self._dropped
        self._dropped = None
        if count.values()[0] > 0:
            warnings.warn(f"SAdam: step {step} dropped probes whose loss was not finite (see opt.last.dropped)",
                          RuntimeWarning, stacklevel=3)

    @torch.compiler.disable  # state created inside a graph would change its guards: the next step would recompile
    def _adam_states(self, groups) -> list:
        return [adam_states(self.state, params, amsgrad=False) for _, params in groups]

    def _adamw(self, group, params, alpha: Tensor, states, skip: Tensor | None = None) -> None:
        advance_steps(states, skip, self.backend)
        # update_clip: lr / max(1, RMS) per tensor, the statistics pass fused with the step (SPEC 7.2)
        update.adam_step_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                          [s["exp_avg_sq"] for s in states], step=states[0]["step"], lr=group["lr"],
                          betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"], decoupled=True,
                          step_scale=alpha, eps_raw=self.eps_mode == "authors", skip=skip,
                          clip_stats="clipped" if self.update_clip else False, backend=self.backend)

    # ----------------------------------------------------------------------------------------------
    extra_state_key = "sadam"

    def _extra_state(self) -> dict:
        return {"seed": self.seed, "probe_counter": self.probe_counter}

    def _load_extra_state(self, state: dict) -> None:
        self.seed, self.probe_counter = int(state["seed"]), int(state["probe_counter"])
