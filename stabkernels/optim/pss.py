"""PSS: spectral smoothing of weight matrices on trigger steps, wrapped around any optimizer (SPEC 1).

Parts of PSS are a reconstruction (the paper's method text is not public): the EMA constant of the trigger,
how k is chosen and the smoothing rules. Each is an option here; see :func:`stabkernels.spectral_smooth_`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from .. import distributed, spectral
from .._checks import acc_dtype
from .._hostread import DeferredRead, capturing
from ._wrapper import OptimizerWrapper
from .skipstep import StableAdamW


def global_grad_norm(params: Iterable[torch.Tensor], backend: str = "auto") -> torch.Tensor:
    """Global L2 norm of the gradients of ``params`` (what ``clip_grad_norm_`` computes), one fused pass per
    device; a 0-d float32 tensor (float64 if a gradient is float64) on the first gradient's device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            g = p.grad
            by_device.setdefault(g.device, []).append(g._values() if g.is_sparse else g)
    if not by_device:
        return torch.zeros(())
    parts = [spectral.sq_norms(gs, backend=backend).sum() for gs in by_device.values()]
    first = parts[0].device
    return torch.stack([p.to(first, torch.float64) for p in parts]).sum().sqrt().to(parts[0].dtype)


_FOUND_INF_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def _is_embedding_weight(module: nn.Module, name: str) -> bool:
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and name == "weight"


@dataclass
class PSSReport:
    """What one :meth:`PSS.step` did."""

    step: int
    grad_norm: torch.Tensor  # 0-d, on the parameters' device
    ema: torch.Tensor  # the EMA the ratio test compared against (before this step's update; NaN: none yet)
    triggered: bool = False  # set when the smoothing this step decided runs (lagged: at the next step)
    reason: str | None = None  # "ratio", "every" or "manual"
    skipped_nonfinite: bool | torch.Tensor = False  # non-finite gradient norm: no smoothing (and no step)
    sigma: torch.Tensor | None = None  # per selected matrix, before smoothing (trigger steps only)
    stable_rank: torch.Tensor | None = None
    k: torch.Tensor | None = None
    sigma_after: torch.Tensor | None = None
    changed: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


class PSS(OptimizerWrapper):
    """Parametric Singularity Smoothing around any ``torch.optim`` optimizer (SPEC 1).

    After each ``step()`` of the wrapped optimizer, the ratio test G_t > trigger * EMA_{t-1} on the global
    gradient norm G_t (SPEC 1.2; the EMA is not updated on a triggered step, and no ratio trigger fires in the
    first ``warmup`` steps) decides whether to smooth the top singular values of the selected weight
    matrices in place (:func:`stabkernels.spectral_smooth_`). ``every=N`` also smooths every N steps;
    :meth:`smooth_now` smooths on demand. Untriggered steps cost one fused pass over the gradients (pass a norm
    you already have, e.g. from ``clip_grad_norm_``, as ``step(grad_norm=...)`` to skip even that).

    No host synchronisation: the norm, the EMA and the ratio test stay on the device, and their outcome is read
    back through a non-blocking copy one step later (``lagged=True``, default): a smoothing decided at step t
    is applied when step t + 1 begins, before its update, so it smooths the same weights; t + 1's gradient was
    computed before it. :meth:`flush` applies a pending smoothing at once (before evaluating or saving after
    the last step); ``lagged=False`` decides within the step at the cost of one host read. ``last.triggered``
    of step t becomes True when its smoothing runs.

    A non-finite gradient norm never smooths; with ``skip_nonfinite=True`` (default) the wrapped optimizer's
    step is skipped as well, so weights and optimizer state stay untouched; ``last.skipped_nonfinite`` says so
    (a 0-d bool tensor). torch's fused optimizers (``fused=True``: Adam, AdamW, SGD, Adagrad; PSSAdamW's
    default) skip on a device-side flag, as under GradScaler; any other wrapped optimizer needs one host read
    per step for the skip (``skip_nonfinite=False`` avoids it). Under CUDA graph capture the step records
    only device work; a smoothing it decides waits for the next eager ``step()`` or :meth:`flush`.

    Skip flag (SPEC 7.1): where the wrapped optimizer skips on the device (torch's fused ones, or one of ours
    with ``accepts_skip``: StableAdamW, PSSAdamW(update_clip=True)), PSS takes a skip flag too
    (``accepts_skip``; :class:`~stabkernels.optim.SkipStep` sets ``skip_flag``): on a skipped step the
    wrapped optimizer's step is skipped on the device (with a non-finite norm's skip, whichever says so),
    the gradient-norm EMA is left as it was and no smoothing is decided (neither by the ratio test nor by
    ``every``), so a step SkipStep drops leaves PSS's state as it was; only the step count advances (host).

    Args:
        optimizer: any torch optimizer (its param_groups and state are shared, so LR schedulers and
            GradScaler work on the wrapper).
        params: which matrices to smooth: None (every parameter of the optimizer with ndim >= 2), an
            ``nn.Module`` (its ndim >= 2 parameters except embedding weights), an iterable of tensors, or a
            callable ``param -> bool`` filtering the optimizer's parameters.
        trigger: tau of the ratio test (2.5, the paper's). ``None`` disables the ratio test.
        ema: alpha of the gradient-norm EMA (0.1; reconstruction).
        warmup: steps without ratio trigger while the EMA forms.
        every: also smooth every ``every`` steps (None: never).
        rule, max_rank, min_rank, cap, window: the smoothing rule (:func:`stabkernels.spectral_smooth_`).
        power_iters: warm-started power iterations per smoothing (15 from a random start the first time).
        oversample, subspace_iters: the randomized SVD's sketch (:func:`stabkernels.top_singular`).
        warm_subspace: start each sketch from the previous trigger's singular vectors.
        seed: the generator for random starts and sketches (saved in the state dict).
    """

    state_kind = "PSS"

    def __init__(self, optimizer: torch.optim.Optimizer, params=None, trigger: float | None = 2.5,
                 ema: float = 0.1, warmup: int = 10, every: int | None = None, rule: str = "clip",
                 max_rank: int = 8, power_iters: int = 1, *, min_rank: int = 1, cap: float | None = None,
                 window: int = 3, oversample: int = 8, subspace_iters: int = 2, warmup_iters: int = 15,
                 warm_subspace: bool = True, skip_nonfinite: bool = True, seed: int = 0, lagged: bool = True,
                 backend: str = "auto"):
        super().__init__(optimizer)
        if trigger is not None and not trigger > 0:
            raise ValueError(f"trigger must be > 0 or None, got {trigger}")
        if not 0 < ema <= 1:
            raise ValueError(f"ema must be in (0, 1], got {ema}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        if every is not None and every < 1:
            raise ValueError(f"every must be >= 1 or None, got {every}")
        if rule not in spectral.RULES:
            raise ValueError(f"rule must be one of {spectral.RULES}, got {rule!r}")
        if rule == "cap" and cap is None:
            raise ValueError("rule='cap' needs cap=<absolute value>")
        if power_iters < 1:
            raise ValueError(f"power_iters must be >= 1, got {power_iters}")
        self.trigger, self.ema_alpha, self.warmup, self.every = trigger, ema, warmup, every
        self.smooth_options = dict(rule=rule, max_rank=max_rank, min_rank=min_rank, cap=cap, window=window,
                                   oversample=oversample, iters=subspace_iters, power_iters=power_iters)
        self.warmup_iters, self.warm_subspace = warmup_iters, warm_subspace
        self.skip_nonfinite, self.backend = skip_nonfinite, backend
        self.matrices = self._select(params)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.lagged = lagged
        self._ema = torch.full((), math.nan, dtype=torch.float64, device=self._device())
        self._pending: tuple[DeferredRead, PSSReport] | None = None  # the last step's undecided smoothing
        self.trigger_count = 0
        self._vectors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._subspace: dict[int, torch.Tensor] = {}
        self.last: PSSReport | None = None

    def _device(self) -> torch.device:
        params = self.params()
        return params[0].device if params else torch.device("cpu")

    def _select(self, params) -> list[torch.Tensor]:
        owned = self.params()
        owned_ids = {id(p) for p in owned}
        if params is None:
            chosen = [p for p in owned if p.dim() >= 2]
        elif isinstance(params, nn.Module):
            skip = {id(p) for mod in params.modules() for n, p in mod.named_parameters(recurse=False)
                    if _is_embedding_weight(mod, n)}
            wanted = {id(p) for p in params.parameters() if p.dim() >= 2 and id(p) not in skip}
            chosen = [p for p in owned if id(p) in wanted]
        elif callable(params) and not isinstance(params, torch.Tensor):
            chosen = [p for p in owned if p.dim() >= 2 and params(p)]
        else:
            chosen = list(params)
            for i, p in enumerate(chosen):
                if not isinstance(p, torch.Tensor) or p.dim() < 2:
                    raise ValueError(f"params[{i}] must be a tensor with ndim >= 2, got "
                                     f"{getattr(p, 'shape', type(p).__name__)}")
                if id(p) not in owned_ids:
                    raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of the wrapped "
                                     "optimizer")
        return chosen

    # ----------------------------------------------------------------------------------------------
    @property
    def ema(self) -> float | None:
        """The gradient-norm EMA as a number (reads the device; None before the first finite step)."""
        v = float(self._ema)
        return None if math.isnan(v) else v

    def _device_skip(self) -> bool:
        """Whether the wrapped optimizer skips its own step on a device-side flag (torch's fused Adam, AdamW,
        SGD and Adagrad read ``found_inf``, as they do under GradScaler), so no host read is needed."""
        return (isinstance(self.optimizer, _FOUND_INF_OPTIMIZERS)
                and all(g.get("fused") for g in self.optimizer.param_groups))

    def _inner_accepts_skip(self) -> bool:
        """Whether the wrapped optimizer takes the skip flag of this package's optimizers (SPEC 7.1)."""
        return bool(getattr(self.optimizer, "accepts_skip", False))

    @property
    def accepts_skip(self) -> bool:
        """Whether this PSS takes a skip flag (``skip_flag``, SPEC 7.1): when its wrapped optimizer can skip on
        the device."""
        return self._device_skip() or self._inner_accepts_skip()

    skip_flag: torch.Tensor | None = None

    def _norm(self, grad_norm) -> torch.Tensor:
        params = self.params()
        g = global_grad_norm(params, self.backend) if grad_norm is None else torch.as_tensor(grad_norm)
        return g.detach().to(device=params[0].device if params else g.device, dtype=torch.float64).reshape(())

    @torch.no_grad()
    def step(self, closure: Callable | None = None, *, grad_norm: float | torch.Tensor | None = None):
        """Runs the wrapped optimizer's step and the trigger test; smooths when it fires.

        With ``lagged=True`` (default) the test runs on the device and its outcome is read back without a
        synchronisation: a smoothing it decides is applied at the start of the next ``step()`` (before that
        step's update, so the smoothed weights are the same; only one backward ran at unsmoothed weights),
        or by :meth:`flush`. With ``lagged=False`` it is applied here, at the cost of one host read."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._begin_step()
        g = self._norm(grad_norm)
        if self._ema.device != g.device:  # the model moved after construction
            self._ema = self._ema.to(g.device)
        finite = torch.isfinite(g)
        ema_before = self._ema.clone()
        keep = None if self.skip_flag is None else self.skip_flag.reshape(()).to(g.device) == 0
        skip = None  # what skips the wrapped optimizer's step: a non-finite norm and/or the skip flag
        if self.skip_nonfinite:
            skip = ~finite
        if keep is not None:
            skip = ~keep if skip is None else skip | ~keep
        if skip is None:
            self.optimizer.step()
        elif self._device_skip():
            self._step_unless(skip.to(torch.float32))
        elif self._inner_accepts_skip():
            self._step_flagged(skip.to(torch.float64))
        elif not bool(skip):  # a wrapped optimizer that cannot skip on the device: one host read
            self.optimizer.step()
        self._end_step(g, ema_before, finite, keep)
        return loss

    # Host bookkeeping runs outside torch.compile's graphs: dynamo dropped these attribute updates of the
    # wrapper (measured: steps stayed 0, the EMA kept its first value and no smoothing ran under
    # torch.compile(opt.step)), and a step counter read inside a graph would make dynamo recompile every step.
    @torch.compiler.disable  # an attribute set on the wrapped optimizer inside a graph: refused by torch 2.11's dynamo
    def _step_unless(self, found_inf: torch.Tensor) -> None:
        """The wrapped fused optimizer's step, skipped on the device where ``found_inf`` is 1 (as under
        GradScaler); its own ``found_inf`` attribute, if any, is put back."""
        saved = self.optimizer.__dict__.get("found_inf")
        self.optimizer.found_inf = found_inf
        try:
            self.optimizer.step()
        finally:
            self.optimizer.found_inf = saved

    @torch.compiler.disable  # an attribute set on the wrapped optimizer inside a graph
    def _step_flagged(self, skip: torch.Tensor) -> None:
        """The wrapped optimizer's step with its skip flag (SPEC 7.1) set to ``skip``, put back afterwards."""
        saved = self.optimizer.skip_flag
        self.optimizer.skip_flag = skip
        try:
            self.optimizer.step()
        finally:
            self.optimizer.skip_flag = saved

    @torch.compiler.disable
    def _begin_step(self) -> None:
        """Applies a pending smoothing and counts the step."""
        if not capturing():
            self.flush()
        self.steps += 1

    @torch.compiler.disable  # host flags (armed, every) decide tensor ops here, never guards of a graph
    def _end_step(self, g, ema_before, finite, keep=None) -> None:
        armed = self.trigger is not None and self.steps > self.warmup
        every = self.every is not None and self.steps % self.every == 0
        have_ema = ~torch.isnan(self._ema)
        if armed:
            fired = finite & have_ema & (g > self.trigger * self._ema)
        else:
            fired = torch.zeros_like(finite)
        # a skipped step (skip flag) neither fires nor smooths nor moves the average
        counts = finite if keep is None else finite & keep
        fired = fired & counts
        # a spike stays out of the average, and so does a non-finite norm
        blended = torch.where(have_ema, (1 - self.ema_alpha) * self._ema + self.ema_alpha * g, g)
        self._ema.copy_(torch.where(counts & ~fired, blended, self._ema))
        decision = torch.stack([fired | (counts & every), fired])
        self.last = report = PSSReport(step=self.steps, grad_norm=g, ema=ema_before, skipped_nonfinite=~finite)
        if capturing():  # a captured step cannot hand its decision to the host: it never smooths (docs/gpu.md)
            return
        self._pending = (DeferredRead(decision), report)  # [smooth?, by the ratio test?]
        if not self.lagged:
            self.flush()

    @torch.no_grad()
    def flush(self) -> bool:
        """Applies a smoothing that the last step decided on the device but has not applied yet (reads that
        decision, waiting for the device if it is not there yet). Returns whether it smoothed. ``step()``
        calls it first; call it yourself before evaluating or saving the model after the last step."""
        if self._pending is None:
            return False
        decision, report = self._pending
        self._pending = None
        want, fired = decision.values()
        if want:
            self._smooth(report, "ratio" if fired else "every")
        return bool(want)

    @torch.no_grad()
    def smooth_now(self) -> PSSReport:
        """Smooths the selected matrices now, whatever the trigger says; returns (and stores) the report."""
        nan = torch.full((), math.nan, dtype=torch.float64)
        report = PSSReport(step=self.steps, grad_norm=nan, ema=self._ema.clone())
        self._smooth(report, "manual")
        self.last = report
        return report

    # rare and host-driven (generator draws, per-matrix ranks): never traced by torch.compile, which would
    # replay the generator differently
    @torch.compiler.disable
    def _smooth(self, report: PSSReport, reason: str) -> None:
        report.triggered, report.reason = True, reason
        self.trigger_count += 1
        if not self.matrices:
            return
        n = len(self.matrices)
        sigma = torch.zeros(n, dtype=torch.float64)
        sr, sigma_after = torch.zeros_like(sigma), torch.zeros_like(sigma)
        k, changed = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.bool)
        by_device: dict[torch.device, list[int]] = {}
        for i, w in enumerate(self.matrices):
            by_device.setdefault(w.device, []).append(i)
        for idx in by_device.values():
            mats = [_whole(self.matrices[i]) for i in idx]
            self._ensure_vectors(idx, mats)
            us = [self._vectors[i][0] for i in idx]
            vs = [self._vectors[i][1] for i in idx]
            init = [self._subspace.get(i) for i in idx] if self.warm_subspace else None
            rep = spectral.spectral_smooth_(mats, us, vs, generator=self.generator, init=init,
                                            backend=self.backend, **self.smooth_options)
            for i, whole in zip(idx, mats):
                _write_shard(self.matrices[i], whole)
            if self.warm_subspace:
                for i, V in zip(idx, rep.V):
                    if V is not None:
                        self._subspace[i] = V
            sigma[idx] = rep.sigma_before.double().cpu()
            sr[idx] = rep.stable_rank.double().cpu()
            sigma_after[idx] = rep.sigma_after.double().cpu()
            k[idx], changed[idx] = rep.k, rep.changed
        report.sigma, report.stable_rank, report.k = sigma, sr, k
        report.sigma_after, report.changed = sigma_after, changed

    def _ensure_vectors(self, idx: list[int], mats: list[torch.Tensor]) -> None:
        new = [i for i in idx if i not in self._vectors]
        if not new:
            return
        mats = [m for i, m in zip(idx, mats) if i in new]
        us, vs = spectral.init_power_vectors(mats, self.generator)
        spectral.power_iteration_(mats, us, vs, self.warmup_iters, backend=self.backend)
        for i, u, v in zip(new, us, vs):
            self._vectors[i] = (u, v)

    # ----------------------------------------------------------------------------------------------
    def _wrapper_state(self) -> dict:
        return {
            "steps": self.steps, "ema": self.ema, "trigger_count": self.trigger_count,
            # a smoothing decided by the last step and not applied yet: the resumed run applies it first
            "pending": None if self._pending is None else self._pending[0].values(),
            "generator": self.generator.get_state(),
            "vectors": {i: (u.clone(), v.clone()) for i, (u, v) in self._vectors.items()},
            "subspace": {i: V.clone() for i, V in self._subspace.items()},
            "num_matrices": len(self.matrices),
        }

    def _load_wrapper_state(self, state: dict) -> None:
        if state["num_matrices"] != len(self.matrices):
            raise ValueError(f"state dict is for {state['num_matrices']} smoothed matrices, this PSS selects "
                             f"{len(self.matrices)}")
        self.steps, self.trigger_count = state["steps"], state["trigger_count"]
        self._ema.fill_(math.nan if state["ema"] is None else state["ema"])
        pending = state.get("pending")
        self._pending = None
        if pending is not None:
            report = PSSReport(step=self.steps, grad_norm=torch.full((), math.nan), ema=self._ema.clone())
            self._pending = (DeferredRead(torch.tensor(pending, dtype=torch.bool)), report)
        self.generator.set_state(state["generator"])
        self._vectors = {}
        for i, (u, v) in state["vectors"].items():
            w = self.matrices[int(i)]
            acc = acc_dtype(w.dtype)
            self._vectors[int(i)] = (u.to(w.device, acc).clone(), v.to(w.device, acc).clone())
        self._subspace = {int(i): V.to(self.matrices[int(i)].device) for i, V in state["subspace"].items()}

    def __repr__(self) -> str:
        return (f"PSS({self.optimizer!r}, matrices={len(self.matrices)}, trigger={self.trigger}, "
                f"ema={self.ema_alpha}, warmup={self.warmup}, every={self.every}, {self.smooth_options})")


def _whole(w: torch.Tensor) -> torch.Tensor:
    """The matrix to smooth: ``w`` itself, or for a DTensor (FSDP2) shard the whole matrix, gathered (smoothing
    runs on trigger steps only; every rank then smooths the same matrix and keeps its own rows)."""
    return w.full_tensor() if distributed.is_sharded(w) else w


def _write_shard(w: torch.Tensor, whole: torch.Tensor) -> None:
    """Copies a DTensor's rows back from the smoothed whole matrix (nothing to do for a plain tensor)."""
    if whole is w:
        return
    shard, at = distributed.local(w), distributed.layout(w).offset
    shard.copy_(whole.reshape(-1)[at: at + shard.numel()].view(shard.shape))


class PSSAdamW(PSS):
    """``torch.optim.AdamW`` wrapped in :class:`PSS`, for one-line use::

        opt = PSSAdamW(model, lr=3e-4, weight_decay=0.1)      # a module: embeddings are not smoothed
        opt = PSSAdamW(model.parameters(), lr=3e-4)           # or parameters: every ndim >= 2 one

    AdamW's arguments (lr, betas, eps, weight_decay, amsgrad, foreach, fused, ...) go to AdamW, everything
    else to :class:`PSS`. AdamW is fused (``fused=True``) unless ``fused`` or ``foreach`` is given or a
    parameter is on a device or of a dtype torch's fused AdamW does not take: the fused step skips itself on a
    non-finite gradient norm without a host read.

    ``update_clip=True``: the wrapped optimizer is :class:`~stabkernels.optim.StableAdamW` (AdamW with update
    clipping, SPEC 7.2, on this package's fused kernels; ``backend`` picks them too), which takes lr, betas,
    eps and weight_decay only, and skips on the device through the skip flag (SPEC 7.1).
    """

    _ADAMW_ARGS = ("betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                   "differentiable", "fused")
    _STABLE_ARGS = ("betas", "eps", "weight_decay")

    def __init__(self, params, lr: float = 1e-3, *, update_clip: bool = False, **kwargs):
        adamw_kwargs = {k: kwargs.pop(k) for k in self._ADAMW_ARGS if k in kwargs}
        select = kwargs.pop("select", None)
        if isinstance(params, nn.Module):
            select = params if select is None else select
            params = params.parameters()
        params = list(params)
        if update_clip:
            other = sorted(set(adamw_kwargs) - set(self._STABLE_ARGS))
            if other:
                raise ValueError(f"PSSAdamW(update_clip=True) steps StableAdamW, which takes lr, betas, eps and "
                                 f"weight_decay only; got {other}")
            inner = StableAdamW(params, lr=lr, backend=kwargs.get("backend", "auto"), **adamw_kwargs)
            super().__init__(inner, select, **kwargs)
            return
        if "fused" not in adamw_kwargs and "foreach" not in adamw_kwargs and _fused_adamw_takes(params):
            adamw_kwargs["fused"] = True
            # step counters on the device, so the step can be captured in a CUDA graph (torch allows it there)
            if "capturable" not in adamw_kwargs and _on_cuda(params):
                adamw_kwargs["capturable"] = True
        super().__init__(torch.optim.AdamW(params, lr=lr, **adamw_kwargs), select, **kwargs)


def _tensors(params) -> list:
    return [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]


def _on_cuda(params) -> bool:
    return all(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in _tensors(params))


def _fused_adamw_takes(params) -> bool:
    tensors = _tensors(params)
    return bool(tensors) and all(isinstance(t, torch.Tensor) and t.device.type in ("cpu", "cuda")
                                 and t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
                                 for t in tensors)
