"""The sustained learning-rate spike protocol on scikit-learn's digits (SPEC 2.5).

MLP 64 -> 128 (ReLU) -> 10, pixels / 16, a stratified 80/20 split (seeded), batch 64, 200 steps; from step 50
on the learning rate is multiplied by 1000 and kept there. One function runs one (method, base lr, seed)
and returns its history; the demo and the reproduction script tabulate many of them. Nothing is downloaded:
the data set ships with scikit-learn.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..optim.radius import RadiusReport


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@functools.lru_cache(maxsize=None)
def load_digits_split(seed: int = 0) -> Split:
    """Digits (8x8 images, 10 classes), pixels scaled to [0, 1], stratified 80/20 train/test split; read once per
    seed and process (the scenarios' worker processes train many runs on it), so the tensors are shared: do not
    modify them in place."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - the demo extra installs it
        raise ImportError("the digits protocol needs scikit-learn (pip install scikit-learn)") from e
    data = load_digits()
    x = data.data.astype("float32") / 16.0
    y = data.target
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    t = lambda a, dt: torch.as_tensor(a, dtype=dt)  # noqa: E731
    return Split(t(xtr, torch.float32), t(ytr, torch.long), t(xte, torch.float32), t(yte, torch.long))


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


@dataclass
class History:
    method: str
    base_lr: float
    seed: int
    loss: list = field(default_factory=list)  # training loss per step (on the batch)
    test_acc: list = field(default_factory=list)  # (step, accuracy) at evaluation steps
    test_loss: list = field(default_factory=list)  # (step, loss) at evaluation steps
    rho: list = field(default_factory=list)  # radius per step (controllers; NaN otherwise)
    step_norm: list = field(default_factory=list)  # ||theta_t+1 - theta_t|| per step

    @property
    def final_test_acc(self) -> float:
        return self.test_acc[-1][1]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    loss = F.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    return (loss if math.isfinite(loss) else float("inf")), acc


# A method builds (optimizer, step function) for a model; the step function is called after backward with
# the batch, the whole training split (the radius controllers' sample set) and the batch loss.
MethodFactory = Callable[[nn.Module, float], tuple[torch.optim.Optimizer, Callable]]


def run(method: str, factory: MethodFactory, base_lr: float, seed: int, split: Split, *, steps: int = 200,
        spike_at: int = 50, spike: float = 1000.0, batch: int = 64, eval_every: int = 10) -> History:
    """Trains one model under the spike protocol and records its history."""
    model = make_mlp(seed)
    opt, step_fn = factory(model, base_lr)
    base_lrs = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(seed)
    hist = History(method, base_lr, seed)
    order = torch.randperm(len(split.x_train), generator=gen)
    pos = 0
    for t in range(steps):
        factor = spike if t >= spike_at else 1.0
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * factor
        if pos + batch > len(order):
            order, pos = torch.randperm(len(split.x_train), generator=gen), 0
        idx = order[pos: pos + batch]
        pos += batch
        x, y = split.x_train[idx], split.y_train[idx]
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        step_fn(x, y, split.x_train, loss)
        hist.loss.append(loss.item())
        hist.step_norm.append(math.sqrt(sum((p.detach() - b).pow(2).sum().item()
                                            for p, b in zip(model.parameters(), before))))
        last = getattr(opt, "last", None)
        hist.rho.append(float(last.rho) if isinstance(last, RadiusReport) else float("nan"))
        if (t + 1) % eval_every == 0 or t + 1 == steps:
            tl, ta = evaluate(model, split.x_test, split.y_test)
            hist.test_loss.append((t + 1, tl))
            hist.test_acc.append((t + 1, ta))
    return hist


def adam_factory(model, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    return opt, lambda x, y, sample_set, loss: opt.step()


def radius_adam_factory(model, lr):
    from ..optim import RadiusController

    opt = RadiusController(torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8), model,
                           capture_inputs=False)
    return opt, lambda x, y, sample_set, loss: opt.step(sample_set)


# The demo's methods: each at its library defaults (weight decay 0.01 where AdamW's default applies), nothing
# tuned to this data set.
def _adamw(params, lr):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def adamw_factory(model, lr):
    opt = _adamw(model.parameters(), lr)
    return opt, lambda x, y, sample_set, loss: opt.step()


def adamw_clip_factory(model, lr):
    opt = _adamw(model.parameters(), lr)

    def step(x, y, sample_set, loss):
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return opt, step


def radius_adamw_factory(model, lr):
    from ..optim import RadiusAdamW

    opt = RadiusAdamW(model.parameters(), lr=lr, weight_decay=1e-2, model=model, capture_inputs=False)
    return opt, lambda x, y, sample_set, loss: opt.step(sample_set)


def pss_adamw_factory(model, lr):
    from ..optim import PSS

    opt = PSS(_adamw(model.parameters(), lr), model)
    return opt, lambda x, y, sample_set, loss: opt.step()


def sadam_factory(model, lr):
    from ..optim import SAdam

    opt = SAdam(model, lr=lr, weight_decay=1e-2, seed=0)
    return opt, lambda x, y, sample_set, loss: opt.step(probe_closure=lambda: F.cross_entropy(model(x), y), loss=loss)


def orthograd_adamw_factory(model, lr):
    from ..optim import OrthoGrad

    opt = OrthoGrad(_adamw(model.parameters(), lr))
    return opt, lambda x, y, sample_set, loss: opt.step()


METHODS: dict[str, MethodFactory] = {
    "AdamW": adamw_factory,
    "AdamW+clip(1.0)": adamw_clip_factory,
    "RadiusController(Adam)": radius_adam_factory,
    "RadiusAdamW": radius_adamw_factory,
    "PSS(AdamW)": pss_adamw_factory,
    "SAdam": sadam_factory,
    "OrthoGrad(AdamW)": orthograd_adamw_factory,
}


def median_and_spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    v = sorted(values)
    n = len(v)
    med = v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])
    return med, v[0], v[-1]
