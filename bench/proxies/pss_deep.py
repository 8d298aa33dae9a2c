"""PSS on a deep plain network: at a learning rate where the top singular values of the weight matrices run
away and training collapses, does smoothing them (PSS around AdamW, trigger 2.5 on the gradient-norm EMA)
keep it training? (Also PSS with ``every=10``: smoothing on a schedule, whatever the trigger says.) A 12-layer
plain MLP (width 128, tanh, no normalisation, no residuals) on digits,
batch 64, 300 steps, AdamW at a high learning rate, with and without PSS; the spectral report (largest
sigma_1 over the layers, and the median) before and after training.

    python bench/proxies/pss_deep.py [--seeds 5] [--quick] [--out bench/results/proxy_pss_deep.md]

``--paper``: the closest to the PSS paper's setting that 2 CPU cores allow. The paper trains transformers
(BERT-base/large, GPT-2 Medium/Large/XL) with AdamW at learning rates up to 10x (5x for the larger models) the
largest the baseline survives, and compares PSS (trigger 2.5) with gradient clipping and orthogonal
regularisation on loss explosions and final loss/perplexity. Here: the library's GPT-2-style pre-LayerNorm
byte-level transformer (``stabkernels.demo.lm.ByteLM``, 4 blocks, width 64, 4 heads, context 64, 0.24M
parameters) on the Python standard library's sources (nothing downloaded), batch 8 x 64 bytes, AdamW betas
(0.9, 0.95), weight decay 0.1 (GPT-2 practice; the paper's exact optimizer settings were not found), linear
warm-up over the first 10% of steps, then constant; learning rates 1x, 5x and 10x the LM demo's 3e-3; AdamW,
AdamW with gradient clipping at 1.0, and PSS(AdamW) at its defaults (trigger 2.5); 1 seed, 400 steps.
Reported: final validation loss (nats per byte), the worst validation loss after warm-up, whether the loss
exploded (a validation loss non-finite or 1 nat above the best seen before it), smoothings, and sigma_1.

    python bench/proxies/pss_deep.py --paper [--seeds 1] [--steps 400] [--lrs 3e-3,1.5e-2,3e-2]
        [--out bench/results/proxy_pss_deep_paper.md]

Time: an estimate, from a timed 12 steps of each method at lr 3e-3 (0.2-0.35 s per step, noisy) on a 2-vCPU
AMD EPYC that was busy with other work (load average 5), not from a full run: about 2 minutes per run, 15-20
minutes for the 9 runs (3 learning rates x 3 methods, 1 seed); an idle machine should be faster. A first try at
width 96, batch 16 measured about 1.1 s per step (about 1.7 hours for the grid), hence the smaller model.
``--paper --quick``: 1 seed, 4 steps, the largest learning rate only (a smoke run, about 20 s).
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


# ---------------------------------------------------------------------------------------------------------
# --paper: the paper's model family (a GPT-2-style transformer LM) scaled to 2 cores; see the module docstring

PAPER_D, PAPER_LAYERS, PAPER_HEADS, PAPER_CONTEXT, PAPER_BATCH, PAPER_STEPS = 64, 4, 4, 64, 8, 400
PAPER_LRS = "3e-3,1.5e-2,3e-2"  # 1x, 5x, 10x the LM demo's lr
PAPER_METHODS = ("AdamW", "AdamW+clip(1.0)", "PSS(AdamW)")


def make_paper_lm(seed: int):
    from stabkernels.demo.lm import ByteLM

    torch.manual_seed(seed)
    return ByteLM(d=PAPER_D, layers=PAPER_LAYERS, heads=PAPER_HEADS, context=PAPER_CONTEXT)


def train_paper(method: str, lr: float, seed: int, steps: int, corpus) -> dict:
    import math
    import time

    from stabkernels.demo.lm import evaluate, lm_loss, windows

    model = make_paper_lm(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    if method == "PSS(AdamW)":
        opt = PSS(opt, model)
    clip = method == "AdamW+clip(1.0)"
    warmup = max(1, steps // 10)
    gen = torch.Generator().manual_seed(1000 + seed)
    vx, vy = windows(corpus.val, torch.linspace(0, len(corpus.val) - PAPER_CONTEXT - 2, 32).long(), PAPER_CONTEXT)
    init_val = evaluate(model, vx, vy)
    vals, exploded, best = [], False, init_val
    eval_every = max(1, steps // 20)
    start = time.perf_counter()
    for t in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (t + 1) / warmup)
        x, y = windows(corpus.train, torch.randint(0, len(corpus.train) - PAPER_CONTEXT - 1, (PAPER_BATCH,),
                                                   generator=gen), PAPER_CONTEXT)
        opt.zero_grad()
        lm_loss(model(x), y).backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (t + 1) % eval_every == 0 or t + 1 == steps:
            if hasattr(opt, "flush"):
                opt.flush()
            v = evaluate(model, vx, vy)
            exploded = exploded or (t + 1 > warmup and (not math.isfinite(v) or v > best + 1.0))
            best = min(best, v)
            vals.append((t + 1, v))
    seconds = time.perf_counter() - start
    after_warmup = [v for s_, v in vals if s_ > warmup] or [vals[-1][1]]
    return dict(final=vals[-1][1], worst=max(after_warmup), exploded=exploded, init=init_val,
                triggers=getattr(opt, "trigger_count", 0), sigma=sigmas(model), seconds=seconds)


def main_paper(args) -> int:
    from stabkernels.demo.lm import load_corpus

    seeds = args.seeds if args.seeds is not None else 1
    steps = args.steps if args.steps is not None else PAPER_STEPS
    lrs = args.lrs if args.lrs is not None else PAPER_LRS
    if args.quick:
        seeds, steps, lrs = 1, min(steps, 4), lrs.split(",")[-1]
    corpus = load_corpus()
    rows = []
    for lr in [float(x) for x in lrs.split(",")]:
        for method in PAPER_METHODS:
            res = [train_paper(method, lr, s, steps, corpus) for s in range(seeds)]
            rows.append([f"{lr:g}", method, f"{med([r['final'] for r in res]):.3f}",
                         f"{med([r['worst'] for r in res]):.3f}", f"{sum(r['exploded'] for r in res)}/{seeds}",
                         f"{med([r['triggers'] for r in res]):g}",
                         f"{med([float(r['sigma'].max()) for r in res]):.2f}",
                         f"{med([r['seconds'] for r in res]):.0f}"])
    write_md(args.out, f"PSS paper setting scaled to 2 cores: GPT-2-style byte-level transformer "
             f"({PAPER_LAYERS} blocks, width {PAPER_D}, context {PAPER_CONTEXT}) on the standard library's sources, batch {PAPER_BATCH}, "
             f"AdamW (0.9, 0.95), weight decay 0.1, 10% linear warm-up, {steps} steps, medians over {seeds} seed(s); "
             f"validation loss in nats per byte (init {res[0]['init']:.2f}); torch {torch.__version__}.",
             ["lr", "optimizer", "final val loss", "worst val loss after warm-up", "loss explosions", "smoothings",
              "max sigma_1 after", "seconds per run"], rows)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=None, help="default 5 (1 with --paper)")
    p.add_argument("--steps", type=int, default=None, help=f"default 300 ({PAPER_STEPS} with --paper)")
    p.add_argument("--lrs", default=None, help=f"default 1e-3,1e-2 ({PAPER_LRS} with --paper)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--paper", action="store_true", help="the paper's model family and protocol, scaled to 2 cores")
    p.add_argument("--out", default=None, help="default bench/results/proxy_pss_deep[_paper].md")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = os.path.join("bench", "results", "proxy_pss_deep_paper.md" if args.paper else "proxy_pss_deep.md")
    if args.paper:
        return main_paper(args)
    args.seeds = args.seeds if args.seeds is not None else 5
    args.steps = args.steps if args.steps is not None else 300
    args.lrs = args.lrs if args.lrs is not None else "1e-3,1e-2"
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
