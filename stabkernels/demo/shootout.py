"""The stability shoot-out (``python -m stabkernels demo --scenario shootout``): every failure mode (rows) against
every defense (columns), each failure on the smallest model that shows it, each defense at its library defaults.

Models (tasks):

- ``mlp``: scikit-learn's digits, MLP 64-128-10, batch 64, AdamW lr 1e-2 (betas 0.9/0.999, weight decay 0.01);
  outcome: final test accuracy.
- ``transformer``: the LM scenario's byte-level transformer (:mod:`stabkernels.demo.lm`) at width 32, 2 layers,
  4 heads, 32-byte context, batch 8, AdamW lr 3e-3 (betas 0.9/0.95, weight decay 0.1); outcome: final
  validation loss in nats per byte, the negative log-likelihood of the model's own distribution (softmax, or
  StableMax's normalisation for the StableMax column).
- ``grokking``: modular addition mod 31 in the grokking paper's setting (Prieto et al.: MLP 2P-200-200-P without
  biases on the one-hot (a, b), 40% of the pairs, full batch, float32, AdamW lr 1e-2, betas 0.9/0.999, eps 1e-25,
  no weight decay), a smaller modulus and far fewer steps than theirs (their 80,000-100,000-step runs are
  ``bench/proxies/grokking.py --authors``); outcome: the share of training rows in softmax collapse at the
  end (float32 loss exactly 0, so their gradient vanished). With plain AdamW the first rows collapse near step
  1000 and about 70% by step 8000 (measured), the default budget; nothing generalises that early.

Failures start at step ``steps // 2`` (100 of 200): after SkipStep's 64-step warm-up, so that its rule is armed.
Each cell is the median over seeds of the damage: how much worse the outcome is than the same model trained by
plain AdamW without the failure (accuracy: (ref - acc) / ref; loss: (loss - ref) / ref; 0 = unharmed, negative
= better than the undisturbed AdamW run); the softmax-collapse row is the collapsed share itself. The rows
"none" are the defenses without any failure: what they cost in quality when nothing goes wrong. The last row is
each defense's step time on the transformer against AdamW's, measured in the same runs.

Writes ``<out>/shootout/summary.csv`` (one line per run), ``summary.md`` (the table) and ``heatmap.png``.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .._csv import write_rows

# --------------------------------------------------------------------------------------------------
# tasks: a model, its batches, its outcome


@dataclass(frozen=True)
class Task:
    name: str
    lr: float
    betas: tuple
    weight_decay: float
    eps: float = 1e-8
    higher_is_better: bool = False  # the outcome is an accuracy


TASKS = {
    "mlp": Task("mlp", 1e-2, (0.9, 0.999), 1e-2, higher_is_better=True),
    "transformer": Task("transformer", 3e-3, (0.9, 0.95), 0.1),
    "grokking": Task("grokking", 1e-2, (0.9, 0.999), 0.0, eps=1e-25),
}
GROK_P = 31


class ModAddMLP(nn.Module):
    """Prieto et al.'s MLP without biases, Linear(2P, 200) -> ReLU -> Linear(200, 200) -> ReLU -> Linear(200, P),
    on the one-hot concatenation of (a, b) (the first layer applied as the sum of two of its columns)."""

    def __init__(self, p: int = GROK_P, width: int = 200):
        super().__init__()
        self.p = p
        self.layers = nn.ModuleList([nn.Linear(2 * p, width, bias=False), nn.Linear(width, width, bias=False),
                                     nn.Linear(width, p, bias=False)])

    def forward(self, x):
        w = self.layers[0].weight.t()
        h = F.embedding(x[:, 0], w) + F.embedding(x[:, 1] + self.p, w)
        return self.layers[2](F.relu(self.layers[1](F.relu(h))))


def mod_add_split(p: int = GROK_P, seed: int = 0, train_frac: float = 0.4):
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    x, y = torch.stack([a.flatten(), b.flatten()], 1), (a + b).flatten() % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n = int(train_frac * p * p)
    return x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]


class _Data:
    """The task's model, one batch per step (seeded) and the evaluation."""

    def __init__(self, task: str, seed: int, qk_norm: bool):
        self.task = task
        gen = torch.Generator().manual_seed(1000 + seed)
        torch.manual_seed(seed)
        if task == "mlp":
            from . import digits

            s = digits.load_digits_split(seed)
            self.model = digits.make_mlp(seed)
            self.train, self.test = (s.x_train, s.y_train), (s.x_test, s.y_test)
            order, pos = torch.empty(0, dtype=torch.long), 0

            def batch():  # shuffled epochs of 64-row batches
                nonlocal order, pos
                if pos + 64 > len(order):
                    order, pos = torch.randperm(len(s.x_train), generator=gen), 0
                pos += 64
                return s.x_train[order[pos - 64:pos]], s.y_train[order[pos - 64:pos]]
        elif task == "transformer":
            from . import lm

            corpus, ctx = lm.cached_corpus(), 32
            self.model = lm.ByteLM(d=32, layers=2, heads=4, context=ctx, qk_norm=qk_norm)
            self.test = lm.windows(corpus.val, torch.linspace(0, len(corpus.val) - ctx - 2, 64).long(), ctx)

            def batch():
                return lm.windows(corpus.train, torch.randint(0, len(corpus.train) - ctx - 1, (8,), generator=gen),
                                  ctx)
        else:
            xtr, ytr, xte, yte = mod_add_split(seed=seed)
            self.model = ModAddMLP()
            self.train, self.test = (xtr, ytr), (xte, yte)

            def batch():
                return xtr, ytr
        self.batch = batch

    @torch.no_grad()
    def outcome(self, stablemax: bool) -> dict:
        self.model.eval()
        try:
            x, y = self.test
            logits = self.model(x).flatten(0, -2).float()
            y = y.flatten()
            if self.task == "mlp":
                return {"outcome": (logits.argmax(1) == y).float().mean().item()}
            if self.task == "transformer":
                loss = _nll(logits, y, stablemax).item()
                return {"outcome": loss if math.isfinite(loss) else math.inf}
            # grokking: the share of training rows whose float32 loss is exactly 0, and the test accuracy
            tx, ty = self.train
            rows = _nll(self.model(tx).float(), ty, stablemax, reduction="none")
            return {"outcome": (rows == 0).float().mean().item(), "test_acc": (logits.argmax(1) == y).float().mean().item()}
        finally:
            self.model.train()


def _nll(logits, y, stablemax: bool, reduction: str = "mean"):
    """The negative log-likelihood under the model's own distribution."""
    if stablemax:
        from ..losses import stablemax_cross_entropy

        return stablemax_cross_entropy(logits, y, reduction)
    return F.cross_entropy(logits, y, reduction=reduction)


# --------------------------------------------------------------------------------------------------
# defenses: (optimizer, step function) for a model; the loss; whether the model gets QK-LayerNorm


def _adamw(params, task: Task, lr: float, wd: float):
    return torch.optim.AdamW(params, lr=lr, betas=task.betas, eps=task.eps, weight_decay=wd)


def _plain(opt):
    return opt, lambda batch, loss, closure: opt.step()


def _clip(opt, model):
    def step(batch, loss, closure):
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return opt, step


def _build_adamw(model, task, lr, wd):
    return _plain(_adamw(model.parameters(), task, lr, wd))


def _build_clip(model, task, lr, wd):
    return _clip(_adamw(model.parameters(), task, lr, wd), model)


def _build_qkclip(model, task, lr, wd):
    from ..optim import QKClip

    return _plain(QKClip(model).wrap(_adamw(model.parameters(), task, lr, wd)))


def _build_skipstep(model, task, lr, wd):
    from ..optim import SkipStep

    opt = SkipStep(_adamw(model.parameters(), task, lr, wd))
    return opt, lambda batch, loss, closure: opt.step(loss=loss)


def _build_stable_adamw(model, task, lr, wd):
    from ..optim import StableAdamW

    return _plain(StableAdamW(model.parameters(), lr=lr, betas=task.betas, eps=task.eps, weight_decay=wd))


def _build_radius(model, task, lr, wd):
    from ..optim import RadiusAdamW

    return _plain(RadiusAdamW(model.parameters(), lr=lr, betas=task.betas, eps=task.eps, weight_decay=wd,
                              model=model))


def _build_pss(model, task, lr, wd):
    from ..optim import PSSAdamW

    return _plain(PSSAdamW(model, lr=lr, betas=task.betas, eps=task.eps, weight_decay=wd))


def _build_sadam(model, task, lr, wd):
    from ..optim import SAdam

    opt = SAdam(model, lr=lr, betas=task.betas, eps=task.eps, weight_decay=wd, seed=0)
    return opt, lambda batch, loss, closure: opt.step(probe_closure=closure, loss=loss)


def _build_orthograd(model, task, lr, wd):
    from ..optim import OrthoGrad

    return _plain(OrthoGrad(_adamw(model.parameters(), task, lr, wd)))


def _build_radius_clip(model, task, lr, wd):
    from ..optim import RadiusAdamW

    return _clip(RadiusAdamW(model.parameters(), lr=lr, betas=task.betas, eps=task.eps, weight_decay=wd,
                             model=model), model)


@dataclass(frozen=True)
class Defense:
    build: Callable
    loss: str = "softmax"  # "softmax", "z-loss" or "stablemax"
    qk_norm: bool = False
    attention_only: bool = False  # acts on attention logits: not applicable to the MLP tasks

    def applies(self, task: str) -> bool:
        return task == "transformer" or not self.attention_only


DEFENSES = {
    "AdamW": Defense(_build_adamw),
    "AdamW+clip": Defense(_build_clip),
    "AdamW+z-loss": Defense(_build_adamw, loss="z-loss"),
    "AdamW+QK-LN": Defense(_build_adamw, qk_norm=True, attention_only=True),
    "QK-clip": Defense(_build_qkclip, attention_only=True),
    "SkipStep": Defense(_build_skipstep),
    "StableAdamW": Defense(_build_stable_adamw),
    "RadiusAdamW": Defense(_build_radius),
    "PSSAdamW": Defense(_build_pss),
    "SAdam": Defense(_build_sadam),
    "OrthoGrad": Defense(_build_orthograd),
    "StableMax": Defense(_build_adamw, loss="stablemax"),
    # combinations: the recipe of Wortsman et al. and OLMo (both logit defenses), and the radius cap with the
    # gradient clipping every stack already has (the cap bounds the step along the update, clipping the gradient's
    # size before Adam normalises it: they act on different things)
    "z-loss+QK-LN": Defense(_build_adamw, loss="z-loss", qk_norm=True, attention_only=True),
    "RadiusAdamW+clip": Defense(_build_radius_clip),
}


def _loss_fn(kind: str):
    if kind == "z-loss":
        from ..losses import cross_entropy_z_loss

        return lambda logits, y: cross_entropy_z_loss(logits, y, z_coef=1e-4)[0]
    if kind == "stablemax":
        from ..losses import stablemax_cross_entropy

        return stablemax_cross_entropy
    return F.cross_entropy


# --------------------------------------------------------------------------------------------------
# failure modes


@dataclass(frozen=True)
class Failure:
    task: str
    what: str
    lr_factor: Callable = lambda t, at: 1.0
    corrupt: bool = False  # one batch at step ``at``: inputs x1000, labels shuffled
    weight_decay: float | None = None  # overrides the task's


FAILURES = {
    "none (MLP)": Failure("mlp", "no failure: the defense's own cost in accuracy"),
    "none (transformer)": Failure("transformer", "no failure: the defense's own cost in loss"),
    "lr x1000, sustained": Failure("mlp", "the learning rate x1000 from the middle step on",
                                   lr_factor=lambda t, at: 1000.0 if t >= at else 1.0),
    "lr x10000, one step": Failure("mlp", "the learning rate x10000 for the middle step only",
                                   lr_factor=lambda t, at: 1e4 if t == at else 1.0),
    "lr x100 throughout": Failure("mlp", "a learning rate 100x too high from the start",
                                  lr_factor=lambda t, at: 100.0),
    "corrupted batch": Failure("mlp", "one batch (the middle step's) with inputs x1000 and shuffled labels",
                               corrupt=True),
    "attention-logit growth": Failure("transformer", "lr x30 without QK normalisation (Wortsman et al. 2023)",
                                      lr_factor=lambda t, at: 30.0),
    "output-logit divergence": Failure("transformer", "lr x100 without weight decay (the failure z-loss is for)",
                                       lr_factor=lambda t, at: 100.0, weight_decay=0.0),
    "softmax collapse": Failure("grokking", "grokking without weight decay in float32 (Prieto et al. 2025)"),
}


def run(failure: str, defense: str, seed: int, steps: int) -> dict:
    """One run: the failure's task trained by the defense under the failure. Returns the outcome and the mean
    process time per step (forward, backward and step)."""
    f, d = FAILURES[failure], DEFENSES[defense]
    task = TASKS[f.task]
    data = _Data(f.task, seed, d.qk_norm)
    model = data.model
    wd = task.weight_decay if f.weight_decay is None else f.weight_decay
    opt, step = d.build(model, task, task.lr, wd)
    loss_fn = _loss_fn(d.loss)
    base = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(2000 + seed)
    at, elapsed = steps // 2, 0.0
    for t in range(steps):
        factor = f.lr_factor(t, at)
        for g, lr0 in zip(opt.param_groups, base):
            g["lr"] = lr0 * factor
        x, y = data.batch()
        if f.corrupt and t == at:
            x = x * 1000.0
            y = y[torch.randperm(len(y), generator=gen)]
        t0 = time.process_time()
        opt.zero_grad()
        loss = loss_fn(model(x).flatten(0, -2), y.flatten())
        loss.backward()
        step((x, y), loss.detach(), lambda: loss_fn(model(x).flatten(0, -2), y.flatten()))
        elapsed += time.process_time() - t0
    if hasattr(opt, "flush"):
        opt.flush()
    return {"failure": failure, "defense": defense, "task": f.task, "seed": seed, "steps": steps,
            "step_ms": 1e3 * elapsed / steps, **data.outcome(d.loss == "stablemax")}


def _job(job) -> dict:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run(*job)


# --------------------------------------------------------------------------------------------------
# the table


def damage(row: dict, reference: float) -> float:
    """How much worse than plain AdamW without the failure (0 = unharmed); the collapse row is the share itself."""
    task, v = TASKS[row["task"]], row["outcome"]
    if row["task"] == "grokking":
        return v
    if not math.isfinite(v):
        return math.inf
    return (reference - v) / reference if task.higher_is_better else (v - reference) / reference


def summarise(rows: list[dict]) -> tuple[dict, dict]:
    """({(failure, defense): median damage}, {defense: step time / AdamW's on the transformer})."""
    ref = {task: statistics.median(r["outcome"] for r in rows if r["failure"] == f"none ({label})"
                                   and r["defense"] == "AdamW")
           for task, label in (("mlp", "MLP"), ("transformer", "transformer"))}
    cells = {}
    for failure in dict.fromkeys(r["failure"] for r in rows):
        for defense in DEFENSES:
            runs = [r for r in rows if r["failure"] == failure and r["defense"] == defense]
            if runs:
                cells[failure, defense] = statistics.median(damage(r, ref.get(r["task"], 0.0)) for r in runs)
    clean = [r for r in rows if r["failure"] == "none (transformer)"]
    adamw = statistics.median(r["step_ms"] for r in clean if r["defense"] == "AdamW")
    cost = {d: statistics.median(r["step_ms"] for r in clean if r["defense"] == d) / adamw
            for d in DEFENSES if any(r["defense"] == d for r in clean)}
    return cells, cost


def _fmt(v: float, grokking: bool) -> str:
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "diverged"
    return f"{100 * v:.0f}%" if grokking else f"{100 * v:+.0f}%"


def _label(failure: str) -> str:
    return failure if failure.startswith("none") else f"{failure} ({FAILURES[failure].task})"


def _axes(cells: dict) -> tuple[list, list]:
    """The failures and defenses that were run, in table order."""
    return ([f for f in FAILURES if any(k[0] == f for k in cells)],
            [d for d in DEFENSES if any(k[1] == d for k in cells)])


def markdown(cells: dict, cost: dict, settings: str) -> str:
    failures, defenses = _axes(cells)
    lines = ["| failure (model) | " + " | ".join(defenses) + " |", "|---|" + "---|" * len(defenses)]
    for failure in failures:
        grok = FAILURES[failure].task == "grokking"
        vals = [_fmt(cells[failure, d], grok) if (failure, d) in cells else "n/a" for d in defenses]
        lines.append(f"| {_label(failure)} | " + " | ".join(vals) + " |")
    lines.append("| step time vs AdamW (transformer) | " + " | ".join(
        f"{cost[d]:.2f}x" if d in cost else "n/a" for d in defenses) + " |")
    legend = "\n".join(f"- **{name}** ({FAILURES[name].task}): {FAILURES[name].what}" for name in failures)
    return (f"Damage: how much worse than plain AdamW without the failure, median over seeds (accuracy or "
            f"validation loss; 0% = unharmed, negative = better; \"softmax collapse\": the share of training rows "
            f"whose float32 loss is exactly 0). {settings}\n\n" + "\n".join(lines) + "\n\n" + legend + "\n")


def heatmap(path: str, cells: dict, cost: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    failures, defenses = _axes(cells)
    grid = [[min(cells.get((f, d), math.nan), 1.0) for d in defenses] for f in failures]
    fig, ax = plt.subplots(figsize=(1.0 * len(defenses) + 3, 0.55 * len(failures) + 2))
    im = ax.imshow(grid, cmap="RdYlGn_r", vmin=-0.2, vmax=1.0, aspect="auto")
    for i, f in enumerate(failures):
        for j, d in enumerate(defenses):
            v = cells.get((f, d), math.nan)
            ax.text(j, i, "n/a" if (f, d) not in cells else _fmt(v, FAILURES[f].task == "grokking"),
                    ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(defenses)), [f"{d}\n{cost[d]:.2f}x" if d in cost else d for d in defenses],
                  rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(failures)), [_label(f) for f in failures], fontsize=8)
    fig.colorbar(im, ax=ax, label="damage vs undisturbed AdamW (capped at 100%)")
    ax.set_title("stability shoot-out: failure modes x defenses (x: step time vs AdamW)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def jobs(seeds: int, steps: int, grok_steps: int, failures=None, defenses=None) -> list[tuple]:
    """Every applicable (failure, defense, seed, steps) of the given failures and defenses (default all);
    grokking (full batch, deterministic) once; the longest runs first so that the workers finish together."""
    out = []
    for failure in failures or FAILURES:
        f = FAILURES[failure]
        for defense in defenses or DEFENSES:
            if DEFENSES[defense].applies(f.task):
                n, s = (1, grok_steps) if f.task == "grokking" else (seeds, steps)
                out += [(failure, defense, seed, s) for seed in range(n)]
    weight = {"grokking": 10, "transformer": 3, "mlp": 1}
    return sorted(out, key=lambda j: -weight[FAILURES[j[0]].task] * (2 if j[1] in ("SAdam", "RadiusAdamW") else 1))


def run_scenario(out: str, seeds: int = 3, steps: int = 200, grok_steps: int = 8000, failures=None,
                 defenses=None) -> str:
    """Runs the shoot-out (``failures`` and ``defenses``: subsets by name, default all; the references "none (MLP)"
    and "none (transformer)" with AdamW are always run), writes ``out``/summary.csv, summary.md and heatmap.png
    and returns the markdown."""
    from .._pool import map_on_cores
    from ..benchmarks.run import progress

    t0 = time.perf_counter()
    todo = jobs(seeds, steps, grok_steps, failures, defenses)
    todo += [j for j in jobs(seeds, steps, grok_steps, ["none (MLP)", "none (transformer)"], ["AdamW"]) if j not in todo]
    rows = []
    for i, r in enumerate(map_on_cores(_job, todo)):
        progress(i + 1, len(todo), f"{r['failure']} / {r['defense']} / seed {r['seed']}")
        rows.append(r)
    cells, cost = summarise(rows)
    settings = (f"{seeds} seed(s), {steps} steps (grokking: {grok_steps} full-batch steps, mod {GROK_P}, one "
                f"seed), failures from step {steps // 2}; torch {torch.__version__}, {len(rows)} runs in "
                f"{time.perf_counter() - t0:.0f} s on {os.cpu_count()} cores.")
    md = markdown(cells, cost, settings)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write(md)
    write_rows(os.path.join(out, "summary.csv"), rows,  # test_acc: the grokking rows only
               ["failure", "defense", "task", "seed", "steps", "outcome", "test_acc", "step_ms"])
    heatmap(os.path.join(out, "heatmap.png"), cells, cost)
    return md
