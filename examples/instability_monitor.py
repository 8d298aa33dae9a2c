"""Does kappa(V) warn before a loss spike? A two-layer network trained into instability (SPEC 5).

A 4-16-1 tanh network fits a random teacher (64 samples, full batch, MSE) while its learning rate grows by a
constant factor per step until training breaks. Every step the InstabilityMonitor computes rho(J) and kappa(V)
of the update operator from the full Hessian (momentum SGD, mu 0.9; Adam, betas (0.9, 0.999)). The script
plots both against the loss and prints:
  * the spike step: the first step whose loss exceeds 10x the best loss so far;
  * separation: median kappa(V) over the last 20 steps before the spike against its median over the first
    half of the steps before it (the paper reports about 10x between stable and unstable phases);
  * lead: how many steps before the spike a rolling median (9 steps) of kappa(V) first exceeds 3x its stable
    median, and how many steps before it the run of rho(J) > 1.05 that leads into the spike began.

    python examples/instability_monitor.py [--steps 300] [--out demo_out]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import warnings

import torch
from torch import nn
from torch.nn import functional as F

from stabkernels.diagnostics import InstabilityMonitor


def teacher_data(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    w = torch.randn(4, generator=g, dtype=torch.float64)
    return x, torch.tanh(x @ w)[:, None] + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)


def mse(forward, batch):
    return F.mse_loss(forward(batch[0]), batch[1])


def run(optimizer: str, steps: int = 300, lr0: float | None = None, growth: float = 1.03, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    batch = teacher_data(seed)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr0 or 0.01, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr0 or 1e-3, betas=(0.9, 0.999))
    mon = InstabilityMonitor(opt, model, every=1, loss_fn=mse, method="dense")
    out = {"loss": [], "rho": [], "kappa": [], "lr": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            opt.zero_grad()
            loss = mse(model, batch)
            if not math.isfinite(loss.item()) or loss.item() > 1e6:
                break
            loss.backward()
            opt.step()
            rec = mon.step(batch, loss.item())
            out["loss"].append(loss.item())
            out["rho"].append(rec.rho)
            out["kappa"].append(rec.kappa)
            out["lr"].append(opt.param_groups[0]["lr"])
            for g in opt.param_groups:
                g["lr"] *= growth
    return out | summarise(out)


def summarise(h: dict) -> dict:
    loss = h["loss"]
    spike, best = None, math.inf
    for t, v in enumerate(loss):
        if v > 10 * best:
            spike = t
            break
        best = min(best, v)
    if spike is None:
        spike = len(loss)  # no spike: the run ended (diverged to inf/NaN) or never broke
    kappa = [k if math.isfinite(k) else 1e12 for k in h["kappa"]]
    stable = kappa[: max(1, spike // 2)]
    late = kappa[max(0, spike - 20): spike] or kappa[-1:]
    stable_med = statistics.median(stable)
    rolling = [statistics.median(kappa[max(0, t - 8): t + 1]) for t in range(len(kappa))]
    k_first = next((t for t, k in enumerate(rolling) if k > 3 * stable_med), None)
    # onset of the run of rho(J) > 1.05 that leads into the spike (rho also exceeds 1 briefly at non-convex
    # points early on, which says nothing about the spike)
    r_first = None
    t = min(spike, len(h["rho"])) - 1
    while t >= 0 and h["rho"][t] > 1.05:
        r_first, t = t, t - 1
    return {"spike_step": spike, "kappa_stable": stable_med, "kappa_unstable": statistics.median(late),
            "separation": statistics.median(late) / stable_med,
            "kappa_lead": None if k_first is None else spike - k_first,
            "rho_lead": None if r_first is None else spike - r_first}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 7), sharex="col")
    for col, (name, r) in enumerate(results.items()):
        steps = range(len(r["loss"]))
        ax = axes[0][col]
        ax.semilogy(steps, r["loss"], color="black")
        ax.set_title(f"{name}: loss (lr x{1.03:g} per step)")
        ax.axvline(r["spike_step"], color="red", ls="--", lw=1, label="spike")
        ax.legend()
        ax = axes[1][col]
        ax.semilogy(steps, [min(k, 1e12) for k in r["kappa"]], label="kappa(V)")
        ax.semilogy(steps, r["rho"], label="rho(J)")
        ax.axvline(r["spike_step"], color="red", ls="--", lw=1)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", default="demo_out")
    args = p.parse_args(argv)
    results = {"momentum SGD": run("sgd", args.steps), "Adam": run("adam", args.steps)}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "instability_monitor.png")
    plot(results, path)
    lines = ["| optimizer | spike step | kappa(V) stable | kappa(V) last 20 steps | separation | "
             "kappa(V) > 3x stable: steps ahead | rho(J) > 1.05: steps ahead |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['spike_step']} | {r['kappa_stable']:.3g} | {r['kappa_unstable']:.3g} | "
                     f"{r['separation']:.1f}x | {r['kappa_lead']} | {r['rho_lead']} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "instability_monitor.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"wrote {path} and instability_monitor.md")
    return results


if __name__ == "__main__":
    main()
