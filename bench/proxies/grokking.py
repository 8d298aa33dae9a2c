"""Grokking at the Edge of Numerical Stability (Prieto et al.): modular addition mod 113, full batch, no weight
decay. The paper: without weight decay, softmax cross-entropy in float32 drives the logits until the softmax
rounds to one-hot ("softmax collapse") and generalisation never comes; StableMax cross-entropy and the
orthogonal gradient (OrthoGrad) each let the model generalise without weight decay.

Model: an MLP on the concatenated one-hot (a, b), written as two embedding tables (the first linear layer's
halves) -> ReLU -> 128 -> ReLU -> 113; 40% of the 113^2 pairs for training, AdamW (lr 1e-2, betas 0.9/0.99,
weight decay 0: the paper's OrthoGrad setup), float32. The runs are spread over the cores (one thread each). Four runs per seed: {softmax CE, stablemax CE} x {AdamW,
OrthoGrad(AdamW)}. Reports the step at which test accuracy first reaches 90% (or "never") and the final
accuracies.

    python bench/proxies/grokking.py [--seeds 3] [--steps 2000] [--quick] [--out bench/results/proxy_grokking.md]
"""
import argparse
import os
import sys

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _table import med, write_md  # noqa: E402

from stabkernels import stablemax_cross_entropy  # noqa: E402
from stabkernels._pool import map_on_cores  # noqa: E402
from stabkernels.optim import OrthoGrad  # noqa: E402

P = 113


class PairMLP(nn.Module):
    """Linear(226, W) on the one-hot concatenation of (a, b), as two embedding lookups, then an MLP."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.ea, self.eb = nn.Embedding(P, width), nn.Embedding(P, width)
        self.bias = nn.Parameter(torch.zeros(width))
        self.mlp = nn.Sequential(nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, P))

    def forward(self, x):
        return self.mlp(self.ea(x[:, 0]) + self.eb(x[:, 1]) + self.bias)


def data(seed: int, train_frac: float = 0.4):
    a, b = torch.meshgrid(torch.arange(P), torch.arange(P), indexing="ij")
    a, b = a.flatten(), b.flatten()
    x = torch.stack([a, b], 1)
    y = (a + b) % P
    perm = torch.randperm(P * P, generator=torch.Generator().manual_seed(seed))
    n = int(train_frac * P * P)
    return x[perm[:n]], y[perm[:n]], x[perm[n:]], y[perm[n:]]


def run(loss_name: str, opt_name: str, seed: int, steps: int, eval_every: int):
    xtr, ytr, xte, yte = data(seed)
    torch.manual_seed(seed)
    model = PairMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
    if opt_name == "OrthoGrad(AdamW)":
        opt = OrthoGrad(opt)
    loss_fn = F.cross_entropy if loss_name == "softmax CE" else stablemax_cross_entropy
    grok, train_acc, test_acc = None, 0.0, 0.0
    for t in range(1, steps + 1):
        opt.zero_grad()
        loss_fn(model(xtr), ytr).backward()
        opt.step()
        if t % eval_every == 0 or t == steps:
            with torch.no_grad():
                train_acc = (model(xtr).argmax(1) == ytr).float().mean().item()
                test_acc = (model(xte).argmax(1) == yte).float().mean().item()
            if grok is None and test_acc >= 0.9:
                grok = t
    return grok, train_acc, test_acc


def _job(job):
    (loss_name, opt_name), seed, steps, eval_every = job
    return run(loss_name, opt_name, seed, steps, eval_every)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join("bench", "results", "proxy_grokking.md"))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 1, 100
    configs = [(loss_name, opt_name) for loss_name in ("softmax CE", "stablemax CE")
               for opt_name in ("AdamW", "OrthoGrad(AdamW)")]
    jobs = [(c, s, args.steps, 50 if not args.quick else 25) for c in configs for s in range(args.seeds)]
    if args.quick:
        results = list(map(_job, jobs))
    else:  # one run per core, one thread each
        results = list(map_on_cores(_job, jobs))
    rows = []
    for c in configs:
        loss_name, opt_name = c
        res = [r for (jc, *_), r in zip(jobs, results) if jc == c]
        groks = [g for g, _, _ in res]
        when = ", ".join("never" if g is None else str(g) for g in groks)
        rows.append([loss_name, opt_name, f"{sum(g is not None for g in groks)}/{len(groks)}", when,
                     f"{med([r[1] for r in res]):.3f}", f"{med([r[2] for r in res]):.3f}"])
    write_md(args.out, f"Modular addition mod {P}, 40% train, full batch, no weight decay, {args.steps} steps, "
             f"{args.seeds} seed(s); torch {torch.__version__}.",
             ["loss", "optimizer", "generalised (test acc >= 90%)", "step reached, per seed", "final train acc",
              "final test acc"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
