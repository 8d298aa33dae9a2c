"""The language-model scenario of the demo: a small byte-level causal transformer on real text that every
Python ships, with and without a sustained learning-rate spike.

Data: the standard library's own top-level ``.py`` sources (found through ``sysconfig``), in sorted order;
every 8th file is validation, the rest training; a fixed byte budget of each (``TRAIN_BYTES``, ``VAL_BYTES``)
keeps runs comparable across Python versions. Nothing is downloaded. Tokens are bytes (vocabulary 256), so
the loss is in nats per byte. One function trains one (method, spike, seed) and returns its history.
"""
from __future__ import annotations

import glob
import math
import os
import sysconfig
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

TRAIN_BYTES, VAL_BYTES = 1 << 20, 1 << 17
VOCAB = 256


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 bytes
    val: torch.Tensor
    files: int  # how many source files were read


def stdlib_files() -> list[str]:
    """The standard library's top-level ``.py`` files, sorted (the fixed file list of the scenario)."""
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def load_corpus(train_bytes: int = TRAIN_BYTES, val_bytes: int = VAL_BYTES) -> Corpus:
    """Training and validation bytes, split by file (every 8th file is validation)."""
    files = stdlib_files()
    if not files:
        raise RuntimeError(f"no .py files under {sysconfig.get_paths()['stdlib']}: the LM scenario reads the "
                           "standard library's sources")
    parts = {True: bytearray(), False: bytearray()}
    for i, path in enumerate(files):
        is_val = i % 8 == 7
        budget = val_bytes if is_val else train_bytes
        if len(parts[is_val]) < budget:
            with open(path, "rb") as f:
                parts[is_val] += f.read()
        if len(parts[False]) >= train_bytes and len(parts[True]) >= val_bytes:
            break
    as_tensor = lambda b, n: torch.frombuffer(b[:n], dtype=torch.uint8).clone()  # noqa: E731
    return Corpus(as_tensor(parts[False], train_bytes), as_tensor(parts[True], val_bytes), len(files))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, qk_norm: bool = False):
        super().__init__()
        from ..nn import QKLayerNorm

        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.qk_norm = QKLayerNorm(d // heads) if qk_norm else None
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    """A pre-LayerNorm causal transformer over bytes; ``lm_head`` is its last step (the radius controllers'
    fused output-head path takes it). ``qk_norm``: QK-LayerNorm on every block's queries and keys."""

    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, context: int = 64, qk_norm: bool = False):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads, qk_norm) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, idx):
        h = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            h = b(h)
        return self.lm_head(self.norm(h))


def windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, next-byte targets) for windows starting at ``starts``."""
    idx = starts[:, None] + torch.arange(context + 1)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


@dataclass
class History:
    method: str
    spike: bool
    seed: int
    loss: list = field(default_factory=list)  # training loss per step
    val_loss: list = field(default_factory=list)  # (step, nats per byte)
    init_val_loss: float = math.nan  # before the first step

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1][1]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    return loss if math.isfinite(loss) else float("inf")


def lm_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


# A method builds (optimizer, loss function, step function) for a model and base lr; the step function is
# called after backward with the batch and the loss.
MethodFactory = Callable[[nn.Module, float], tuple]


def _adamw(params, lr):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)


def adamw(model, lr):
    opt = _adamw(model.parameters(), lr)
    return opt, lm_loss, lambda x, y, loss: opt.step()


def adamw_clip(model, lr):
    opt = _adamw(model.parameters(), lr)

    def step(x, y, loss):
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return opt, lm_loss, step


def adamw_z_loss(model, lr):
    from ..losses import cross_entropy_z_loss

    opt = _adamw(model.parameters(), lr)
    return opt, lambda z, y: cross_entropy_z_loss(z.flatten(0, 1), y.flatten(), z_coef=1e-4)[0], \
        lambda x, y, loss: opt.step()


def radius_adamw(model, lr, **options):
    """RadiusAdamW at its defaults (finite differences reusing the training forward's logits, every 16th step;
    issue 26), or with ``options``."""
    from ..optim import RadiusAdamW

    opt = RadiusAdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, model=model, **options)
    return opt, lm_loss, lambda x, y, loss: opt.step()


def pss_adamw(model, lr):
    from ..optim import PSSAdamW

    opt = PSSAdamW(model, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    return opt, lm_loss, lambda x, y, loss: opt.step()


def sadam(model, lr):
    from ..optim import SAdam

    opt = SAdam(model, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, seed=0)
    return opt, lm_loss, lambda x, y, loss: opt.step(probe_closure=lambda: lm_loss(model(x), y), loss=loss)


def orthograd_adamw(model, lr):
    from ..optim import OrthoGrad

    opt = OrthoGrad(_adamw(model.parameters(), lr))
    return opt, lm_loss, lambda x, y, loss: opt.step()


METHODS: dict[str, MethodFactory] = {
    "AdamW": adamw,
    "AdamW+clip(1.0)": adamw_clip,
    "AdamW+z-loss": adamw_z_loss,
    "RadiusAdamW": radius_adamw,
    "PSSAdamW": pss_adamw,
    "SAdam": sadam,
    "OrthoGrad(AdamW)": orthograd_adamw,
}


def run(method: str, corpus: Corpus, seed: int, *, spike: bool, lr: float = 3e-3, steps: int = 200,
        spike_at: int = 66, spike_factor: float = 1000.0, batch: int = 8, context: int = 64,
        eval_every: int = 10, val_windows: int = 64, factory: MethodFactory | None = None, d: int = 64,
        qk_norm: bool = False, qk_clip: float | None = None) -> History:
    """Trains one model (seeded init and batches) and records its history; from ``spike_at`` on the learning
    rate is multiplied by ``spike_factor`` and kept there when ``spike``. ``factory`` replaces the method's own
    (``METHODS[method]``); ``d`` is the model's width, ``qk_norm`` turns QK-LayerNorm on, ``qk_clip`` (a
    threshold) runs :class:`stabkernels.optim.QKClip` after every step of any method (SPEC 8.2).
    ``init_val_loss`` is the validation loss at initialisation."""
    torch.manual_seed(seed)
    model = ByteLM(d=d, context=context, qk_norm=qk_norm)
    opt, loss_fn, step_fn = (factory or METHODS[method])(model, lr)
    if qk_clip is not None:
        from ..optim import QKClip

        clip, method_step = QKClip(model, threshold=qk_clip), step_fn

        def step_fn(x, y, loss):  # the method's step, then the clip of the heads measured in this forward
            method_step(x, y, loss)
            clip.step()
    base = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(1000 + seed)
    vx, vy = windows(corpus.val, torch.linspace(0, len(corpus.val) - context - 2, val_windows).long(), context)
    hist = History(method, spike, seed)
    hist.init_val_loss = evaluate(model, vx, vy)
    for t in range(steps):
        factor = spike_factor if spike and t >= spike_at else 1.0
        for g, lr0 in zip(opt.param_groups, base):
            g["lr"] = lr0 * factor
        x, y = windows(corpus.train, torch.randint(0, len(corpus.train) - context - 1, (batch,), generator=gen),
                       context)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        step_fn(x, y, loss.detach())
        hist.loss.append(loss.item())
        if (t + 1) % eval_every == 0 or t + 1 == steps:
            if hasattr(opt, "flush"):
                opt.flush()
            hist.val_loss.append((t + 1, evaluate(model, vx, vy)))
    return hist


# --------------------------------------------------------------------------------------------------
# the demo's LM scenario: every method with and without the spike, over seeds; summary, curves, figure


def _progress(items, desc: str, total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional
        return items
    return tqdm(items, desc=desc, unit="run", total=total)


_corpus_cache: list[Corpus] = []


def cached_corpus() -> Corpus:
    """The corpus, read once per process (the demo's worker processes train many runs on it)."""
    if not _corpus_cache:
        _corpus_cache.append(load_corpus())
    return _corpus_cache[0]


def _run_one(job) -> History:
    """One run, in a worker process (see :func:`stabkernels._pool.map_on_cores`)."""
    method, spike, seed, kwargs = job
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run(method, cached_corpus(), seed, spike=spike, **kwargs)


def run_all(methods, seeds: int, workers: int | None = None, **kwargs) -> list[History]:
    """Every (method, spike, seed), spread over ``workers`` processes (default: one per core)."""
    from .._pool import map_on_cores

    jobs = [(m, spike, s, kwargs) for m in methods for spike in (False, True) for s in range(seeds)]
    # the longest runs first (S-Adam's k probes, the radius probe), so that the workers finish together
    cost = {"SAdam": 4, "RadiusAdamW": 2}
    order = sorted(range(len(jobs)), key=lambda i: -cost.get(jobs[i][0], 1))
    results = list(_progress(map_on_cores(_run_one, [jobs[i] for i in order], workers), "LM scenario", len(jobs)))
    out: list = [None] * len(jobs)
    for i, h in zip(order, results):
        out[i] = h
    return out


def summary_rows(histories: list[History]) -> list[dict]:
    return [{"method": h.method, "spike": str(h.spike).lower(), "seed": h.seed,
             "final_val_loss": round(h.final_val_loss, 4) if math.isfinite(h.final_val_loss) else h.final_val_loss}
            for h in histories]


def _median(values: list[float]) -> float:
    v = sorted(values, key=lambda x: (math.isnan(x), x))  # NaN (diverged) sorts last, like inf
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def markdown(histories: list[History], settings: str) -> str:
    lines = [f"Median final validation loss (nats per byte; min-max over seeds) of a byte-level transformer on the "
             f"standard library's sources; {settings}.\n",
             "| method | no spike | with spike | spike / no spike |", "|---|---|---|---|"]
    for m in dict.fromkeys(h.method for h in histories):
        cells, med = [], {}
        for spike in (False, True):
            v = [h.final_val_loss for h in histories if h.method == m and h.spike == spike]
            med[spike] = _median(v)
            cells.append(f"{med[spike]:.3f} ({min(v):.3f}-{max(v):.3f})")
        lines.append(f"| {m} | {cells[0]} | {cells[1]} | {med[True] / med[False]:.2f}x |")
    return "\n".join(lines) + "\n"


def write_outputs(out: str, histories: list[History], settings: str, spike_at: int) -> str:
    import csv

    from .._csv import write_rows

    os.makedirs(out, exist_ok=True)
    rows = summary_rows(histories)
    write_rows(os.path.join(out, "summary.csv"), rows)
    with open(os.path.join(out, "curves.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "spike", "seed", "step", "train_loss", "val_loss"])
        for h in histories:
            val = dict(h.val_loss)
            for t, loss in enumerate(h.loss, 1):
                w.writerow([h.method, str(h.spike).lower(), h.seed, t, loss, val.get(t, "")])
    md = markdown(histories, settings)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    _plot(os.path.join(out, "val_loss.png"), histories, spike_at)
    return md


def _plot(path: str, histories: list[History], spike_at: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, spike in zip(axes, (False, True)):
        for m in dict.fromkeys(h.method for h in histories):
            hs = [h for h in histories if h.method == m and h.spike == spike]
            steps = [t for t, _ in hs[0].val_loss]
            med = [min(_median(list(col)), 8.0) for col in zip(*[[v for _, v in h.val_loss] for h in hs])]
            ax.plot(steps, med, label=m)
        if spike:
            ax.axvline(spike_at, color="grey", ls=":", lw=1)
        ax.axhline(math.log(VOCAB), color="grey", lw=0.5)  # a uniform guess over bytes
        ax.set_title("with the sustained lr spike (curves clipped at 8)" if spike else "no spike")
        ax.set_xlabel("step")
    axes[0].set_ylabel("validation loss, nats per byte (median over seeds)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
