"""S-Adam on quantisation-aware training: the S-Adam paper reports it ahead of AdamW where the loss surface is
non-smooth, quantisation-aware training (QAT) among them. Proxy: an MLP 64-128-128-10 on digits whose
weights are fake-quantised to 2 bits in the forward (symmetric, per output row, scale = mean |w| * 1.5 as in
ternary-style quantisers; straight-through estimator in the backward), AdamW against SAdam (library defaults:
8 probes, sigma 0.01, damping 2) at the same lr, batch 64, 400 steps.

    python bench/proxies/sadam_qat.py [--seeds 5] [--quick] [--out bench/results/proxy_sadam_qat.md]
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
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if method == "AdamW":
            opt.step()
        else:
            opt.step(loss=loss.detach(), probe_closure=lambda: F.cross_entropy(model(x), y))
    with torch.no_grad():
        return (model(split.x_test).argmax(1) == split.y_test).float().mean().item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join("bench", "results", "proxy_sadam_qat.md"))
    args = p.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
