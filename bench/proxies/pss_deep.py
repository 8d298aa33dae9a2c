"""PSS on a deep plain network: at a learning rate where the top singular values of the weight matrices run
away and training collapses, does smoothing them (PSS around AdamW, trigger 2.5 on the gradient-norm EMA)
keep it training? (Also PSS with ``every=10``: smoothing on a schedule, whatever the trigger says.) A 12-layer
plain MLP (width 128, tanh, no normalisation, no residuals) on digits,
batch 64, 300 steps, AdamW at a high learning rate, with and without PSS; the spectral report (largest
sigma_1 over the layers, and the median) before and after training.

    python bench/proxies/pss_deep.py [--seeds 5] [--quick] [--out bench/results/proxy_pss_deep.md]
"""
import argparse
import os
import sys

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _table import med, write_md  # noqa: E402

from stabkernels import spectral_report  # noqa: E402
from stabkernels.demo import digits  # noqa: E402
from stabkernels.optim import PSS  # noqa: E402

DEPTH, WIDTH = 12, 128


def make(seed):
    torch.manual_seed(seed)
    layers = [nn.Linear(64, WIDTH), nn.Tanh()]
    for _ in range(DEPTH - 2):
        layers += [nn.Linear(WIDTH, WIDTH), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, 10))


def sigmas(model) -> torch.Tensor:
    """sigma_1 of every layer, from the library's spectral report (power iteration)."""
    return spectral_report(model).sigma


def train(method: str, lr: float, seed: int, steps: int):
    split = digits.load_digits_split(seed)
    model = make(seed)
    before = sigmas(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    if method == "PSS(AdamW)":
        opt = PSS(opt, model)
    elif method == "PSS(AdamW, every=10)":  # smoothing on a schedule too, whatever the trigger says
        opt = PSS(opt, model, every=10)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(split.x_train), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(split.x_train[idx]), split.y_train[idx]).backward()
        opt.step()
    if hasattr(opt, "flush"):
        opt.flush()
    with torch.no_grad():
        acc = (model(split.x_test).argmax(1) == split.y_test).float().mean().item()
    after = sigmas(model)
    triggers = getattr(opt, "trigger_count", 0)
    return acc, before, after, triggers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lrs", default="1e-3,1e-2")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join("bench", "results", "proxy_pss_deep.md"))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.lrs = 1, 30, "1e-2"
    rows = []
    for lr in [float(x) for x in args.lrs.split(",")]:
        for method in ("AdamW", "PSS(AdamW)", "PSS(AdamW, every=10)"):
            res = [train(method, lr, s, args.steps) for s in range(args.seeds)]
            accs = [r[0] for r in res]
            rows.append([f"{lr:g}", method, f"{med(accs):.3f} ({min(accs):.3f}-{max(accs):.3f})",
                         f"{med([float(r[1].max()) for r in res]):.2f} / {med([float(r[1].median()) for r in res]):.2f}",
                         f"{med([float(r[2].max()) for r in res]):.2f} / {med([float(r[2].median()) for r in res]):.2f}",
                         f"{med([r[3] for r in res]):g}"])
    write_md(args.out, f"{DEPTH}-layer plain tanh MLP (width {WIDTH}) on digits, {args.steps} steps, medians over "
             f"{args.seeds} seed(s); sigma_1 of the layers: max / median; torch {torch.__version__}.",
             ["lr", "optimizer", "test acc (min-max)", "sigma_1 at init", "sigma_1 after", "smoothings"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
