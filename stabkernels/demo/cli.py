"""``python -m stabkernels demo``: the stability shoot-outs, ``--scenario digits`` (default), ``lm``, ``lr-sweep``,
``shootout`` or ``all``.

``shootout`` (:mod:`stabkernels.demo.shootout`): every failure mode (learning-rate spikes, a too-high learning
rate, attention- and output-logit growth, a corrupted batch, softmax collapse) against every defense of the
library and the ones LLM stacks deploy, each on the smallest model that shows it; writes ``<out>/shootout/``
(summary.csv, summary.md, heatmap.png).

``lr-sweep`` (:mod:`stabkernels.demo.lr_sweep`): the LM scenario's transformer trained at 7 learning rates over 3
decades, 2 widths, 2 seeds, for AdamW, AdamW + clipping, AdamW + z-loss + QK-LayerNorm and RadiusAdamW (default
and full probe); the learning-rate sensitivity of each; writes ``<out>/lr-sweep/``.

``lm`` (:mod:`stabkernels.demo.lm`): a byte-level causal transformer on the standard library's sources, with and
without a sustained learning-rate spike, for AdamW, AdamW + clipping, AdamW + z-loss, RadiusAdamW (the fused
output-head spread), PSSAdamW, SAdam and OrthoGrad(AdamW); writes ``<out>/lm/summary.csv`` (method, spike,
seed, final_val_loss in nats per byte), ``summary.md``, ``curves.csv`` and ``val_loss.png``.

``digits``: the stability shoot-out on scikit-learn's digits.

The sustained learning-rate spike of SPEC 2.5 (MLP 64-128-10, batch 64, 200 steps, the lr multiplied by 1000
from step 50 on) for every optimizer of the library next to AdamW and AdamW with gradient clipping, over
several base learning rates and seeds. Each method runs at its library defaults. Writes to ``--out``:
``summary.csv`` and ``summary.md`` (median final test accuracy with its min-max over seeds), ``history.csv``
(per step), ``accuracy_loss.png`` (median test accuracy and loss against step) and ``radius.png`` (the
radius controller's rho and step length against step).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import torch

from . import digits
from .._csv import write_rows
from ..benchmarks.run import progress


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m stabkernels demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=("digits", "lm", "lr-sweep", "shootout", "all"), default="digits")
    p.add_argument("--quick", action="store_true", help="1 seed, short runs (about a minute per scenario)")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    p.add_argument("--methods", default=",".join(digits.METHODS),
                   help="comma-separated, from: " + ", ".join(digits.METHODS))
    p.add_argument("--seeds", type=int, default=None, help="seeds per setting (default: digits 5, lm 3)")
    p.add_argument("--lm-steps", type=int, default=200, help="lm: training steps (the lr spike from a third on)")
    p.add_argument("--lrs", default="1e-4,1e-3,1e-2", help="base learning rates")
    p.add_argument("--spike", type=float, default=1000.0, help="lr multiplier from --spike-at on")
    p.add_argument("--spike-at", type=int, default=50)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--no-info", action="store_true", help="skip the backend report")
    args = p.parse_args(argv)
    args.lm_seeds = args.seeds or 3
    args.seeds = args.seeds or 5
    if args.quick:
        args.seeds, args.lrs, args.lm_seeds, args.lm_steps = 1, "1e-2", 1, 120
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in digits.METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(digits.METHODS)}")
    args.methods = methods
    args.lrs = [float(x) for x in args.lrs.split(",")]
    return args


def _run_digits(job) -> digits.History:
    """One run, in a worker process (see :func:`stabkernels._pool.map_on_cores`)."""
    method, lr, seed, steps, spike_at, spike = job
    return digits.run(method, digits.METHODS[method], lr, seed, digits.load_digits_split(seed), steps=steps,
                      spike_at=spike_at, spike=spike)


def run_all(args) -> list[digits.History]:
    """Every (method, lr, seed), one run per core."""
    from .._pool import map_on_cores

    jobs = [(m, lr, s, args.steps, args.spike_at, args.spike) for m in args.methods for lr in args.lrs
            for s in range(args.seeds)]
    histories = []
    for i, h in enumerate(map_on_cores(_run_digits, jobs)):
        progress(i, len(jobs), f"{h.method} lr={h.base_lr:g} seed={h.seed}")
        histories.append(h)
    progress(len(jobs), len(jobs), "done")
    return histories


def summarise(histories, methods, lrs) -> list[dict]:
    rows = []
    for m in methods:
        for lr in lrs:
            accs = [h.final_test_acc for h in histories if h.method == m and h.base_lr == lr]
            med, lo, hi = digits.median_and_spread(accs)
            rows.append({"method": m, "base_lr": lr, "median_acc": round(med, 4), "min_acc": round(lo, 4),
                         "max_acc": round(hi, 4), "seeds": len(accs),
                         "per_seed": " ".join(f"{a:.4f}" for a in accs)})
    return rows


def markdown(rows, lrs, args) -> str:
    head = (f"Median final test accuracy over {args.seeds} seed(s) (min-max in brackets); digits, MLP 64-128-10, "
            f"batch 64, {args.steps} steps, lr x{args.spike:g} from step {args.spike_at}.\n\n")
    lines = ["| method | " + " | ".join(f"base lr {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for m in dict.fromkeys(r["method"] for r in rows):
        cells = [f"{r['median_acc']:.3f} ({r['min_acc']:.3f}-{r['max_acc']:.3f})" for r in rows if r["method"] == m]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def write_csvs(out, rows, histories):
    write_rows(os.path.join(out, "summary.csv"), rows)
    with open(os.path.join(out, "history.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "base_lr", "seed", "step", "train_loss", "test_acc", "test_loss", "rho", "step_norm"])
        for h in histories:
            acc, tl = dict(h.test_acc), dict(h.test_loss)
            for t in range(len(h.loss)):
                w.writerow([h.method, h.base_lr, h.seed, t + 1, h.loss[t], acc.get(t + 1, ""), tl.get(t + 1, ""),
                            h.rho[t], h.step_norm[t]])


def _median_curve(hs, key):
    series = [[v for _, v in getattr(h, key)] for h in hs]
    return [statistics.median(col) for col in zip(*series)]


def plots(out, histories, methods, lrs, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(lrs), figsize=(5.5 * len(lrs), 7.5), squeeze=False)
    for c, lr in enumerate(lrs):
        for m in methods:
            hs = [h for h in histories if h.method == m and h.base_lr == lr]
            steps = [t for t, _ in hs[0].test_acc]
            axes[0][c].plot(steps, _median_curve(hs, "test_acc"), label=m)
            loss = [min(v, 1e6) for v in _median_curve(hs, "test_loss")]
            axes[1][c].semilogy(steps, loss, label=m)
        for r in range(2):
            axes[r][c].axvline(args.spike_at, color="grey", ls=":", lw=1)
        axes[0][c].set_title(f"base lr {lr:g} (x{args.spike:g} from step {args.spike_at})")
        axes[0][c].set_ylabel("test accuracy (median over seeds)")
        axes[1][c].set_ylabel("test loss")
        axes[1][c].set_xlabel("step")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_loss.png"), dpi=100)
    plt.close(fig)

    ctrl = [m for m in methods if m.startswith("Radius")]
    if not ctrl:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in ctrl:
        for lr in lrs:
            hs = [h for h in histories if h.method == m and h.base_lr == lr]
            rho = [statistics.median(col) for col in zip(*[h.rho for h in hs])]
            norm = [statistics.median(col) for col in zip(*[h.step_norm for h in hs])]
            axes[0].semilogy(range(1, len(rho) + 1), rho, label=f"{m}, lr {lr:g}")
            axes[1].semilogy(range(1, len(norm) + 1), norm, label=f"{m}, lr {lr:g}")
    axes[0].set_title("radius rho along the step")
    axes[1].set_title("applied step length ||theta_t+1 - theta_t||")
    for ax in axes:
        ax.axvline(args.spike_at, color="grey", ls=":", lw=1)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "radius.png"), dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse(argv)
    if not args.no_info:
        import stabkernels

        stabkernels.info()
        print()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.scenario in ("digits", "all"):
        digits_demo(args)
    if args.scenario in ("lm", "all"):
        lm_demo(args)
    if args.scenario in ("lr-sweep", "all"):
        lr_sweep_demo(args)
    if args.scenario in ("shootout", "all"):
        shootout_demo(args)
    return 0


def shootout_demo(args) -> None:
    from . import shootout

    kw = dict(seeds=1, steps=140, grok_steps=2500) if args.quick else {}
    out = os.path.join(args.out, "shootout")
    print(shootout.run_scenario(out, **kw))
    print(f"wrote summary.csv, summary.md and heatmap.png to {out}/")


def lr_sweep_demo(args) -> None:
    from . import lr_sweep

    kw = dict(seeds=1, steps=60, widths=(32,)) if args.quick else dict(seeds=2, steps=200)
    md = lr_sweep.run(os.path.join(args.out, "lr-sweep"), **kw)
    print(md)
    print(f"wrote summary.csv, summary.md and lr_sweep.png to {os.path.join(args.out, 'lr-sweep')}/")


def lm_demo(args) -> None:
    from . import lm

    t0 = time.perf_counter()
    steps = args.lm_steps
    spike_at = steps // 3
    histories = lm.run_all(list(lm.METHODS), args.lm_seeds, steps=steps, spike_at=spike_at)
    settings = (f"{args.lm_seeds} seed(s), {steps} steps, batch 8 x 64 bytes, AdamW-family lr 3e-3, "
                f"spike: lr x1000 from step {spike_at} on")
    out = os.path.join(args.out, "lm")
    md = lm.write_outputs(out, histories, settings, spike_at)
    print(md)
    print(f"{len(histories)} LM runs in {time.perf_counter() - t0:.0f} s; wrote summary.csv, summary.md, "
          f"curves.csv and val_loss.png to {out}/")


def digits_demo(args) -> None:
    t0 = time.perf_counter()
    histories = run_all(args)
    rows = summarise(histories, args.methods, args.lrs)
    os.makedirs(args.out, exist_ok=True)
    md = markdown(rows, args.lrs, args)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(md)
    write_csvs(args.out, rows, histories)
    plots(args.out, histories, args.methods, args.lrs, args)
    print(md)
    print(f"{len(histories)} runs in {time.perf_counter() - t0:.0f} s; wrote summary.csv, summary.md, history.csv, "
          f"accuracy_loss.png and radius.png to {args.out}/")


if __name__ == "__main__":
    sys.exit(main())
