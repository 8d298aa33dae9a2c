"""The demo's learning-rate sweep (``python -m stabkernels demo --scenario lr-sweep``): the final validation loss
of the LM scenario's byte-level transformer (:mod:`stabkernels.demo.lm`) against the learning rate, for AdamW, AdamW
with gradient clipping, AdamW with z-loss and QK-LayerNorm, and RadiusAdamW at its defaults and with the full
probe (exact JVP, every step), over two widths and several seeds.

Each method gets one number per width: the learning-rate sensitivity of Wortsman et al. 2023 ("Small-scale
proxies for large-scale Transformer training instabilities"), the mean over the grid of
min(L(lr), L0) - min over the grid of L, with L the final validation loss (median over seeds) and L0 the loss at
initialisation: 0 for a method whose loss does not depend on the learning rate, at most L0 - min L for one that
learns nothing away from its best learning rate. Writes ``<out>/lr-sweep/summary.csv`` (every run),
``summary.md`` (the sensitivity table and the loss at every learning rate) and ``lr_sweep.png``.
"""
from __future__ import annotations

import math
import os
import statistics
import time

from . import lm
from .._csv import write_rows

GRID = tuple(10 ** (-3 + i / 2) for i in range(7))  # 1e-3 .. 1, half-decade steps: 7 values over 3 decades
WIDTHS = (32, 64)


def _radius_full(model, lr):
    return lm.radius_adamw(model, lr, method="jvp", every=1)


# method -> (factory, the model with QK-LayerNorm)
METHODS = {
    "AdamW": (lm.adamw, False),
    "AdamW+clip(1.0)": (lm.adamw_clip, False),
    "AdamW+z-loss+QK-LN": (lm.adamw_z_loss, True),
    "RadiusAdamW (default)": (lm.radius_adamw, False),
    "RadiusAdamW (full probe)": (_radius_full, False),
}


def _run(job) -> dict:
    """One run, in a worker process (see :func:`stabkernels._pool.map_on_cores`)."""
    method, width, lr, seed, steps = job
    factory, qk_norm = METHODS[method]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h = lm.run(method, lm.cached_corpus(), seed, spike=False, lr=lr, steps=steps, factory=factory, d=width,
                   qk_norm=qk_norm, eval_every=steps)
    return {"method": method, "width": width, "lr": lr, "seed": seed, "final_val_loss": h.final_val_loss,
            "init_val_loss": h.init_val_loss}


def sensitivity(losses: dict[float, float], init_loss: float) -> float:
    """Wortsman et al.'s learning-rate sensitivity: mean over lr of min(L(lr), L0) - min over lr of L (a
    non-finite loss counts as L0)."""
    capped = [min(v, init_loss) if math.isfinite(v) else init_loss for v in losses.values()]
    return statistics.fmean(capped) - min(capped)


def _median(values):
    return statistics.median(v if math.isfinite(v) else math.inf for v in values)


def summarise(rows: list[dict]) -> list[dict]:
    """Per (method, width): the median loss at each lr and the sensitivity."""
    out = []
    for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        for width in sorted({r["width"] for r in rows}):
            runs = [r for r in rows if r["method"] == method and r["width"] == width]
            if not runs:
                continue
            lrs = sorted({r["lr"] for r in runs})
            losses = {lr: _median([r["final_val_loss"] for r in runs if r["lr"] == lr]) for lr in lrs}
            init = statistics.median(r["init_val_loss"] for r in runs)
            out.append({"method": method, "width": width, "sensitivity": sensitivity(losses, init),
                        "best": min(losses.values()), "init": init, "losses": losses})
    return out


def markdown(summary: list[dict], settings: str) -> str:
    widths = sorted({s["width"] for s in summary})
    lrs = sorted(summary[0]["losses"])
    lines = [f"Learning-rate sensitivity (Wortsman et al. 2023: mean over the grid of min(L(lr), L0) - min L; lower "
             f"is flatter) and the best final validation loss (nats per byte), byte-level transformer; {settings}.",
             "", "| method | " + " | ".join(f"sensitivity d={w} | best d={w}" for w in widths) + " |",
             "|---|" + "---|---|" * len(widths)]
    for method in dict.fromkeys(s["method"] for s in summary):
        cells = []
        for w in widths:
            s = next(s for s in summary if s["method"] == method and s["width"] == w)
            cells += [f"{s['sensitivity']:.3f}", f"{s['best']:.3f}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", f"Final validation loss (median over seeds) at each learning rate, d={widths[-1]} (inf: diverged):",
              "", "| method | " + " | ".join(f"{lr:.3g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for s in summary:
        if s["width"] == widths[-1]:
            lines.append(f"| {s['method']} | " + " | ".join(f"{s['losses'][lr]:.3f}" for lr in lrs) + " |")
    return "\n".join(lines) + "\n"


def plot(path: str, summary: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({s["width"] for s in summary})
    fig, axes = plt.subplots(1, len(widths), figsize=(5.5 * len(widths), 4.2), sharey=True, squeeze=False)
    for ax, w in zip(axes[0], widths):
        for s in summary:
            if s["width"] == w:
                lrs = sorted(s["losses"])
                ax.semilogx(lrs, [min(s["losses"][lr], 8.0) for lr in lrs], "o-", ms=3,
                            label=f"{s['method']} ({s['sensitivity']:.2f})")
        ax.axhline(s["init"], color="grey", lw=0.5)
        ax.set_title(f"width {w} (sensitivity in brackets)")
        ax.set_xlabel("learning rate")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("final validation loss, nats per byte (clipped at 8)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(out: str, *, seeds: int = 2, steps: int = 150, widths=WIDTHS, grid=GRID, methods=None,
        workers: int | None = None) -> str:
    """The whole sweep, one run per core; writes the outputs and returns the markdown."""
    from .._pool import map_on_cores
    from ..benchmarks.run import progress

    t0 = time.perf_counter()
    methods = list(methods or METHODS)
    jobs = [(m, w, lr, s, steps) for m in methods for w in widths for lr in grid for s in range(seeds)]
    # the full probe's runs first, so that the workers finish together
    jobs.sort(key=lambda j: j[0] != "RadiusAdamW (full probe)")
    rows = []
    for i, r in enumerate(map_on_cores(_run, jobs, workers)):
        rows.append(r)
        progress(i + 1, len(jobs), "lr sweep")
    summary = summarise(rows)
    os.makedirs(out, exist_ok=True)
    write_rows(os.path.join(out, "summary.csv"),
               sorted(rows, key=lambda r: (r["method"], r["width"], r["lr"], r["seed"])))
    settings = (f"{len(grid)} learning rates {grid[0]:.3g}-{grid[-1]:.3g}, widths {', '.join(map(str, widths))} "
                f"(2 layers, 4 heads), {seeds} seed(s), {steps} steps of batch 8 x 64 bytes, no spike")
    md = markdown(summary, settings)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(md)
    plot(os.path.join(out, "lr_sweep.png"), summary)
    print(f"{len(rows)} runs in {time.perf_counter() - t0:.0f} s")
    return md

