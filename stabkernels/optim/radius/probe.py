"""The radius probe (SPEC 2.3, 2.4): :class:`RadiusProbe` measures the softmax convergence radius of one model
along a direction. It captures the training forward (its inputs; in ``probe_mode="train"`` also its RNG state and,
for finite differences, its logits; for ``method="head"`` the features entering the head), cuts the sample set and
computes the tangent logits (JVP, finite differences, or the fused output-head spread). The probe methods and
their defaults live here; the control loop that calls the probe is in :mod:`.control`."""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from ... import distributed, spread, tangent
from ..._checks import acc_dtype
from .._capture import InputCapture

# "head": the zero-probe mode, the spread of the output head's own directional derivative on the training
# forward's features (no trunk forward); "jvp" and "fd" probe the whole model (stabkernels.tangent)
METHODS = tangent.METHODS + ("head",)
# The default (issue 26, bench/radius_cost.py): finite differences that reuse the training forward's logits
# (the schedule's default, DEFAULT_EVERY, is the controller's: .control).
DEFAULT_METHOD = "fd"


class RadiusProbe(InputCapture):
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
        self._in_probe = False
        self._hooks = []
        if capture_inputs:
            self._hooks.append(self._capture_inputs(model))
            if probe_mode == "train" and method == "fd" and samples is None:
                self._hooks.append(model.register_forward_hook(self._capture_logits))
            if method == "head":
                self._hooks.append(head.register_forward_hook(self._capture_features))

    def _on_capture(self) -> None:
        # a new training forward (its inputs are in ``captured``): what the last one left is stale
        self.captured_logits = None
        self.captured_features = None
        if self.probe_mode == "train":
            self.captured_rng = tangent.rng_state(self.device)

    def _capture_logits(self, module, args, output):
        # logits computed under autocast are too coarse to difference against fp32 probe logits; an output
        # that is not logits is left for the probe to report (a hook must not break the user's forward)
        if module.training and not self._in_probe and not _autocast_on():
            try:
                self.captured_logits = tangent.as_logits(output, self.logits_fn).detach()
            except (TypeError, AttributeError, KeyError, IndexError):
                self.captured_logits = None

    def _capture_features(self, module, args, output):
        # the head's input, detached: a (tokens, d) matrix is all the zero-probe mode keeps of the forward
        if module.training and not self._in_probe and args:
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
        self._in_probe = True
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
            self._in_probe = False


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


def _autocast_on() -> bool:
    return any(torch.is_autocast_enabled(t) for t in ("cpu", "cuda"))
