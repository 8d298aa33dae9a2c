"""The training forward's input capture, shared by the optimizers that run the model again after the backward
(:class:`~stabkernels.optim.SAdam`'s probe losses, the radius probe of :mod:`stabkernels.optim.radius`): a forward
pre-hook (with kwargs) keeps the ``(args, kwargs)`` of the model's last training-mode forward, leaving out the
forwards the optimizer runs itself (while its ``_in_probe`` is set). What each does with them stays with it: SAdam
re-runs the forward for its loss; the radius probe cuts a sample set and reuses that forward's RNG state, logits
and features. (QKClip's hooks are no input capture: they measure q and k inside the forward.)"""
from __future__ import annotations

from torch import nn


class InputCapture:
    """Mixin: :meth:`_capture_inputs` registers the hook on ``model`` and returns its handle. The hook is a bound
    method, so a model with it pickles and deep-copies as with the owner's own. Each captured forward sets
    ``captured`` and then calls :meth:`_on_capture`."""

    captured = None  # (args, kwargs) of the model's last training-mode forward
    _in_probe = False  # set while the owner runs its own forwards of the model: those are not captured

    def _capture_inputs(self, model: nn.Module):
        return model.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        if module.training and not self._in_probe:
            self.captured = (args, kwargs)
            self._on_capture()

    def _on_capture(self) -> None:
        """What else to keep of the captured forward (none here)."""
