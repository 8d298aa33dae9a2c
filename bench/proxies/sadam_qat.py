"""S-Adam on quantisation-aware training: the S-Adam paper reports it ahead of AdamW where the loss surface is
non-smooth, quantisation-aware training (QAT) among them. Proxy: an MLP 64-128-128-10 on digits whose
weights are fake-quantised to 2 bits in the forward (symmetric, per output row, scale = mean |w| * 1.5 as in
ternary-style quantisers; straight-through estimator in the backward), AdamW against SAdam (library defaults:
8 probes, sigma 0.01, damping 2) at the same lr, batch 64, 400 steps.

    python bench/proxies/sadam_qat.py [--seeds 5] [--quick] [--out bench/results/proxy_sadam_qat.md]

``--paper``: the closest to the authors' CIFAR-100 QAT run (their script ``CIFAR100_QAT_rebutttal12.py``) that
2 CPU cores allow; CIFAR-100 cannot be downloaded here, so digits stand in for it. Their network (``QATNet``:
conv 3x3 -> 16, ReLU, max-pool 2, conv 3x3 -> 32, ReLU, max-pool 2, dropout 0.25, linear 32*6*6 -> classes, no
padding), their quantiser (per-tensor scale 1.5 / max|x|, round, clamp to {-2, -1, 0, 1}: four levels, i.e. 2
bits, on both convs' weights and inputs and the linear layer's weights; straight-through), their
normalisation ((x - 0.5) / 0.5), batch 128, AdamW lr 1e-3 weight decay 1e-2 against SAdam lr 1e-3 weight
decay 1e-2, 8 probes, sigma 0.01, damping 2 with the authors' choices (probes in train mode, eps added to
the uncorrected sqrt(v)), one seed as theirs. Differences left: digits (1 channel, 10 classes, 1437
training images) bilinearly upsampled from 8x8 to 32x32, so every feature map has the size it has on CIFAR,
instead of CIFAR-100 (3 channels, 100 classes, 50,000 images); 1000 optimizer steps (about 89 epochs of
digits) instead of their 3128 (8 epochs of 391 batches), for time; ``--steps 3128`` runs their count.

    python bench/proxies/sadam_qat.py --paper [--seeds 1] [--steps 1000] [--out bench/results/proxy_sadam_qat_paper.md]

Time: an estimate, from a timed 20 steps of each optimizer (0.45 s per AdamW step, 0.6 s per SAdam step with
its 8 extra forwards) on a 2-vCPU AMD EPYC that was busy with other work (load average 5), not from a full run:
about 17 minutes for the default (1 seed, 1000 steps each), 55 minutes per seed at ``--steps 3128``; an idle
machine should be faster. ``--paper --quick``: 1 seed, 3 steps (a smoke run, about 15 s).
"""
import argparse
import os
import sys

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _table import med, write_md  # noqa: E402

from stabkernels.demo import digits  # noqa: E402
from stabkernels.optim import SAdam  # noqa: E402

BITS = 2


def fake_quant(w: torch.Tensor) -> torch.Tensor:
    """w rounded to 2^BITS - 1 symmetric levels per row, with a straight-through gradient."""
    levels = 2 ** (BITS - 1) - 0.5  # 2 bits: {-1.5, -0.5, 0.5, 1.5} * step
    step = (w.abs().mean(dim=1, keepdim=True) * 1.5 / levels).clamp_min(1e-8)
    q = ((w / step - 0.5).round().clamp(-levels - 0.5, levels - 0.5) + 0.5) * step
    return q.detach() + (w - w.detach())  # the value is q exactly; the gradient goes straight to w


class QLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, fake_quant(self.weight), self.bias)


def make(seed):
    torch.manual_seed(seed)
    return nn.Sequential(QLinear(64, 128), nn.ReLU(), QLinear(128, 128), nn.ReLU(), QLinear(128, 10))


# ---------------------------------------------------------------------------------------------------------
# --paper: the authors' QAT network and quantiser (CIFAR100_QAT_rebutttal12.py), on digits upsampled to 32x32

AUTHORS_STEPS = 8 * 391  # their 8 epochs of CIFAR-100 at batch 128
PAPER_STEPS, PAPER_BATCH, PAPER_LR, PAPER_WD = 1000, 128, 1e-3, 1e-2  # steps: what 2 cores allow in ~17 min


class _AuthorsFakeQuant(torch.autograd.Function):
    """The authors' quantiser: per-tensor scale 1.5 / max|x|, round, clamp to [-2, 1] (four levels: 2 bits,
    although their comment says 4-bit); the backward passes the gradient straight through."""

    @staticmethod
    def forward(ctx, x):
        scale = 1.5 / (x.abs().max() + 1e-5)
        return (x * scale).round().clamp(-2, 1) / scale

    @staticmethod
    def backward(ctx, grad):
        return grad


def authors_quant(x: torch.Tensor) -> torch.Tensor:
    return _AuthorsFakeQuant.apply(x)


class AuthorsQConv(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k)

    def forward(self, x):  # weights and inputs quantised, as theirs
        return F.conv2d(authors_quant(x), authors_quant(self.conv.weight), self.conv.bias)


class QATNet(nn.Module):
    """The authors' QATNet with ``cin`` input channels and ``classes`` outputs (theirs: 3 and 100)."""

    def __init__(self, cin: int = 1, classes: int = 10):
        super().__init__()
        self.conv1, self.conv2 = AuthorsQConv(cin, 16, 3), AuthorsQConv(16, 32, 3)
        self.fc1 = nn.Linear(32 * 6 * 6, classes)
        self.dropout = nn.Dropout(0.25)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.dropout(torch.flatten(x, 1))
        return F.linear(x, authors_quant(self.fc1.weight), self.fc1.bias)


def paper_images(x: torch.Tensor) -> torch.Tensor:
    """Digits rows (N, 64) in [0, 1] as (N, 1, 32, 32) images normalised as the authors' CIFAR ((x - 0.5) / 0.5)."""
    img = F.interpolate(x.view(-1, 1, 8, 8), size=(32, 32), mode="bilinear", align_corners=False)
    return (img - 0.5) / 0.5


def train_step(method: str, opt, model, x, y) -> None:
    """One step on (x, y): AdamW's, or SAdam's with this batch's loss and its probe closure."""
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if method == "AdamW":
        opt.step()
    else:
        opt.step(loss=loss.detach(), probe_closure=lambda: F.cross_entropy(model(x), y))


def train_paper(method: str, seed: int, steps: int) -> tuple[float, float]:
    """(test accuracy, seconds) of one run in the authors' setting (see the module docstring)."""
    import time

    split = digits.load_digits_split(seed)
    xtr, xte = paper_images(split.x_train), paper_images(split.x_test)
    torch.manual_seed(seed)
    model = QATNet()
    if method == "AdamW":
        opt = torch.optim.AdamW(model.parameters(), lr=PAPER_LR, weight_decay=PAPER_WD)
    else:
        opt = SAdam(model, lr=PAPER_LR, weight_decay=PAPER_WD, probes=8, sigma=0.01, damping=2.0,
                    probe_mode="train", eps_mode="authors", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(xtr), generator=gen), 0
    model.train()
    start = time.perf_counter()
    for _ in range(steps):  # shuffled epochs, as their DataLoader(shuffle=True); the last batch of an epoch short
        if pos >= len(perm):
            perm, pos = torch.randperm(len(xtr), generator=gen), 0
        idx = perm[pos:pos + PAPER_BATCH]
        pos += PAPER_BATCH
        x, y = xtr[idx], split.y_train[idx]
        train_step(method, opt, model, x, y)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        return (model(xte).argmax(1) == split.y_test).float().mean().item(), seconds


def train(method: str, lr: float, seed: int, steps: int) -> float:
    split = digits.load_digits_split(seed)
    model = make(seed)
    if method == "AdamW":
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    else:
        opt = SAdam(model, lr=lr, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(split.x_train), (64,), generator=gen)
        x, y = split.x_train[idx], split.y_train[idx]
        train_step(method, opt, model, x, y)
    with torch.no_grad():
        return (model(split.x_test).argmax(1) == split.y_test).float().mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=None, help="default 5 (1 with --paper)")
    p.add_argument("--steps", type=int, default=None, help=f"default 400 ({PAPER_STEPS} with --paper)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--paper", action="store_true", help="the authors' QAT setting, as close as 2 cores allow")
    p.add_argument("--out", default=None, help="default bench/results/proxy_sadam_qat[_paper].md")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = os.path.join("bench", "results", "proxy_sadam_qat_paper.md" if args.paper else "proxy_sadam_qat.md")
    if args.paper:
        return main_paper(args)
    args.seeds = args.seeds if args.seeds is not None else 5
    args.steps = args.steps if args.steps is not None else 400
    if args.quick:
        args.seeds, args.steps = 1, 40
    rows = []
    for lr in (1e-3, 1e-2):
        acc = {m: [train(m, lr, s, args.steps) for s in range(args.seeds)] for m in ("AdamW", "SAdam")}
        rows.append([f"{lr:g}"] + [f"{med(acc[m]):.3f} ({min(acc[m]):.3f}-{max(acc[m]):.3f})" for m in acc]
                    + [f"{med(acc['SAdam']) - med(acc['AdamW']):+.3f}"])
    write_md(args.out, f"Digits MLP with {BITS}-bit fake-quantised weights (straight-through), {args.steps} steps, "
             f"median test accuracy (min-max) over {args.seeds} seed(s); torch {torch.__version__}.",
             ["lr", "AdamW", "SAdam", "SAdam - AdamW"], rows)
    return 0


def main_paper(args) -> int:
    seeds = args.seeds if args.seeds is not None else 1
    steps = args.steps if args.steps is not None else PAPER_STEPS
    if args.quick:
        seeds, steps = 1, min(steps, 3)
    res = {m: [train_paper(m, s, steps) for s in range(seeds)] for m in ("AdamW", "SAdam")}
    acc = {m: [r[0] for r in res[m]] for m in res}
    secs = {m: [r[1] for r in res[m]] for m in res}
    rows = [[f"{PAPER_LR:g}"] + [f"{med(acc[m]):.3f} ({min(acc[m]):.3f}-{max(acc[m]):.3f})" for m in acc]
            + [f"{med(acc['SAdam']) - med(acc['AdamW']):+.3f}",
               f"{med(secs['AdamW']):.0f} / {med(secs['SAdam']):.0f}"]]
    write_md(args.out, f"The S-Adam authors' QAT setting (their QATNet and 2-bit quantiser on weights and conv inputs, "
             f"batch {PAPER_BATCH}, AdamW and SAdam at lr {PAPER_LR:g}, weight decay {PAPER_WD:g}; SAdam 8 probes, "
             f"sigma 0.01, damping 2, train-mode probes) on digits upsampled to 32x32 instead of CIFAR-100, "
             f"{steps} steps (theirs: {AUTHORS_STEPS}), median test accuracy (min-max) over {seeds} seed(s); "
             f"torch {torch.__version__}.",
             ["lr", "AdamW", "SAdam", "SAdam - AdamW", "seconds per run (AdamW / SAdam)"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
