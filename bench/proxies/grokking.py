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

``--authors`` runs the authors' own StableMax setting instead (their grokking_experiments.py and
run_main_experiments.sh, figure 1: MLP 226 -> 200 -> 200 -> 113 without biases on the one-hot (a, b), 40% of the
pairs for training, full batch, AdamW lr 1e-2, betas (0.9, 0.999), eps 1e-25, no weight decay, StableMax loss),
twice from the same initialisation and in lockstep on one thread: with their float64 loss (float32 model, the
logits cast to float64) and with our float32 ``stablemax_cross_entropy`` on the float32 logits. Every ``--every``
steps it writes train loss and train/test accuracy of both, and, on the float64 run's logits, how far our float32
loss and gradient are from the float64 ones (issue 31: before the collapse-free kernels they parted after ~22,000
steps). They did not shuffle the rows deliberately (their per-step permutation only changes float rounding); we
do not shuffle.

    python bench/proxies/grokking.py --authors [--steps 30000] [--every 1000] [--runs f64,ours] [--out ...]
"""
import argparse
import copy
import os
import sys

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _table import med, write_md  # noqa: E402

from stabkernels import stablemax_cross_entropy  # noqa: E402
from stabkernels.losses import stablemax_ds, stablemax_s  # noqa: E402
from stabkernels._pool import map_on_cores  # noqa: E402
from stabkernels.optim import OrthoGrad  # noqa: E402
from stabkernels.demo.shootout import ModAddMLP, mod_add_split  # noqa: E402

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
    return mod_add_split(P, seed, train_frac)


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


def AuthorsMLP() -> nn.Module:
    """The authors' MLP without biases, 2P -> 200 -> 200 -> P on the one-hot (a, b) (the shoot-out's model)."""
    return ModAddMLP(P, 200)


def authors_float64_loss(logits, target):
    """The authors' stablemax_cross_entropy: s(x) = x + 1 (x >= 0), 1 / (1 - x + 1e-30) (x < 0), in float64."""
    z = logits.double()
    s = torch.where(z < 0, 1 / (1 - z + 1e-30), z + 1)
    return -torch.log(s / s.sum(-1, keepdim=True)).gather(1, target[:, None]).mean()


def kernel_vs_float64(logits, target):
    """On the same logits, against the float64 loss: our float32 kernel's largest per-row loss relative error and
    gradient (normwise, per row) relative error, and the fraction of rows whose float32 loss is exactly 0; and the
    same two for the textbook float32 form (log S - log s_y, gradient s'(z) / S - onehot s'(z_y) / s_y, what the
    kernels computed before issue 31), which shows whether the run has reached the collapse regime."""
    x = logits.detach().float().requires_grad_()
    rows = stablemax_cross_entropy(x, target, "none")
    rows.sum().backward()
    r = logits.detach().double().requires_grad_()
    # float64 as log1p(S_rest / s_y), the rest summed apart: -log(s_y / S) itself keeps only about four digits once
    # the loss is near 1e-12 (1 - 1e-12 in float64), and was the larger error late in the 80,000-step run
    s64 = stablemax_s(r)
    s_y = s64.gather(1, target[:, None])[:, 0]
    rest = s64.masked_fill(F.one_hot(target, s64.shape[1]).bool(), 0.0).sum(1)
    want = torch.log1p(rest / s_y)
    want.sum().backward()
    z = logits.detach().float()
    s, S = stablemax_s(z), stablemax_s(z).sum(1)
    zy = z.gather(1, target[:, None])[:, 0]
    textbook = torch.log(S) - torch.log(stablemax_s(zy))
    g = stablemax_ds(z) / S[:, None]
    g[torch.arange(len(target)), target] -= stablemax_ds(zy) / stablemax_s(zy)

    def errs(rows, grad):
        return (((rows.double() - want) / want).abs().max().item(),
                ((grad.double() - r.grad).norm(dim=1) / r.grad.norm(dim=1)).max().item(), (rows == 0).float().mean().item())

    return errs(rows, x.grad) + errs(textbook, g)


def authors_run(steps: int, every: int, runs=("f64", "ours"), seed: int = 42):
    """The runs of ``--authors`` (``f64``: their float64 loss; ``ours``: our float32 kernel), from one initialisation,
    in lockstep; yields one dict per checkpoint. The kernel comparison is made on the first run's logits."""
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = data(seed)
    torch.manual_seed(seed)
    init = AuthorsMLP()
    models = {k: copy.deepcopy(init) for k in runs}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-25, weight_decay=0.0)
            for k, m in models.items()}
    losses = {"f64": authors_float64_loss, "ours": stablemax_cross_entropy}
    last = {}
    for t in range(1, steps + 1):
        for k, m in models.items():
            opts[k].zero_grad()
            logits = m(xtr)
            loss = losses[k](logits, ytr)
            loss.backward()
            opts[k].step()
            last[k] = (loss.item(), logits.detach())
        if t % every == 0 or t == steps:
            row = {"step": t}
            with torch.no_grad():
                for k, m in models.items():
                    row[k] = (last[k][0], (last[k][1].argmax(1) == ytr).float().mean().item(),
                              (m(xte).argmax(1) == yte).float().mean().item())
            row["kernel"] = kernel_vs_float64(last[runs[0]][1], ytr)
            yield row


def authors_main(args) -> int:
    runs = tuple(args.runs.split(","))
    if not runs or any(r not in ("f64", "ours") for r in runs):
        raise SystemExit(f"--runs: a comma-separated list of f64, ours; got {args.runs!r}")
    rows = []
    for r in authors_run(args.steps, args.every, runs):
        def col(i, fmt):
            return " / ".join(format(r[k][i], fmt) if k in r else "-" for k in ("f64", "ours"))
        rows.append([r["step"], col(0, ".3e"), col(1, ".3f"), col(2, ".3f"),
                     *(format(v, f) for v, f in zip(r["kernel"], (".1e", ".1e", ".2f") * 2))])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    write_md(args.out, f"Modular addition mod {P}, the authors' StableMax setting (MLP 200-200 without biases, 40% train, "
             f"full batch, AdamW lr 1e-2 betas (0.9, 0.999) eps 1e-25, no weight decay), one initialisation, {args.steps} "
             f"steps; runs: {', '.join(runs)} (f64: their float64 loss; ours: our float32 stablemax_cross_entropy); "
             f"torch {torch.__version__}.",
             ["step", "train loss (f64 / ours)", "train acc (f64 / ours)", "test acc (f64 / ours)",
              f"on the {runs[0]} run's logits, vs float64: ours, max row loss rel err",
              "ours, max row grad rel err (normwise)", "ours, rows with loss 0", "textbook float32, loss err",
              "textbook, grad err", "textbook, rows with loss 0"], rows)
    return 0


def _job(job):
    (loss_name, opt_name), seed, steps, eval_every = job
    return run(loss_name, opt_name, seed, steps, eval_every)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--authors", action="store_true", help="the authors' StableMax setting, float64 loss vs ours")
    p.add_argument("--every", type=int, default=1000, help="--authors: steps between checkpoints")
    p.add_argument("--runs", default="f64,ours", help="--authors: which runs to train (f64, ours or both)")
    args = p.parse_args(argv)
    if args.authors:
        if args.quick:
            args.steps, args.every = 20, 10
        args.out = args.out or os.path.join("bench", "results", "proxy_grokking_authors.md")
        return authors_main(args)
    args.out = args.out or os.path.join("bench", "results", "proxy_grokking.md")
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
