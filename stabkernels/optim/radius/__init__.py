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

Layout (one job a module; every name below is re-exported here, so ``from stabkernels.optim.radius import X``
works as before):

- :mod:`.probe`: :class:`RadiusProbe` (the training forward's capture, the sample set, the tangent logits and the
  spread), ``METHODS``, ``DEFAULT_METHOD``, ``default_method``, ``default_probe_mode``.
- :mod:`.control`: :class:`RadiusReport`, the control law ``_control_scale``, the argument checks, the shared
  control loop ``_RadiusMixin`` (schedule, re-measurement, back-off, budget, state dict) and its constants
  ``MODES``, ``DEFAULT_EVERY``, ``DEFAULT_REPROBE_ABOVE``, ``DEFAULT_REPROBE_BUDGET``, ``REPROBE_STABLE``.
- :mod:`.wrapper`: :class:`RadiusController`.
- :mod:`.fused`: the fused proposals ``_adam_proposal``/``_sgd_proposal``, :class:`RadiusAdamW`, :class:`RadiusSGD`.

A constant is read at call time by the module that defines it (``REPROBE_STABLE`` by ``control._RadiusMixin``,
``DEFAULT_METHOD`` by ``probe.default_method``): to change one, patch it there (``radius.control.REPROBE_STABLE``);
the names re-exported here are copies. (The ``DEFAULT_*`` defaults of the constructors' signatures are bound when
the classes are defined.)
"""
from .control import (DEFAULT_EVERY, DEFAULT_REPROBE_ABOVE, DEFAULT_REPROBE_BUDGET, MODES, REPROBE_STABLE,
                      RadiusReport, _check_controller_args, _control_scale, _RadiusMixin, _read, _zero_lr)
from .fused import RadiusAdamW, RadiusSGD, _adam_proposal, _FusedRadiusOptimizer, _sgd_proposal
from .probe import DEFAULT_METHOD, METHODS, RadiusProbe, _autocast_on, default_method, default_probe_mode
from .wrapper import RadiusController

__all__ = ["DEFAULT_EVERY", "DEFAULT_METHOD", "DEFAULT_REPROBE_ABOVE", "DEFAULT_REPROBE_BUDGET", "METHODS", "MODES",
           "REPROBE_STABLE", "RadiusAdamW", "RadiusController", "RadiusProbe", "RadiusReport", "RadiusSGD",
           "default_method", "default_probe_mode"]
