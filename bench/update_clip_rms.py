"""How often update clipping binds in training: the share of StableAdamW's per-tensor RMS above 1 while training
the LM demo's byte-level transformer (docs/performance.md "Skip-step and update clipping": a one-pass step at
the unclipped rate, corrected where RMS > 1, pays its correction pass that often).

    python bench/update_clip_rms.py [--steps 300]

Per model size and learning rate: the share of elements (tensors weighted by size, over all steps) whose
tensor had RMS > 1, the same share of tensors, and the share of steps with at least one such tensor. The
statistic is recomputed in float64 after each step from the gradient and the updated v (SPEC 7.2)."""
from __future__ import annotations

import argparse

import torch

from stabkernels.demo import lm
from stabkernels.optim import StableAdamW


def clip_shares(corpus, d: int, layers: int, lr: float, steps: int, beta2: float = 0.999) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = lm.ByteLM(d=d, layers=layers, context=64)
    opt = StableAdamW(model.parameters(), lr=lr, betas=(0.9, beta2), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    elements = elements_over = tensors = tensors_over = steps_over = 0
    for _ in range(steps):
        x, y = lm.windows(corpus.train, torch.randint(0, corpus.train.numel() - 65, (32,), generator=gen), 64)
        loss = lm.lm_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        any_over = False
        for p in model.parameters():
            state = opt.state[p]
            v_hat = state["exp_avg_sq"].double() / (1 - beta2 ** float(state["step"]))
            rms = float((p.grad.double() ** 2 / v_hat.clamp_min(1e-16)).mean().sqrt())
            elements += p.numel()
            tensors += 1
            if rms > 1:
                elements_over += p.numel()
                tensors_over += 1
                any_over = True
        steps_over += any_over
    return elements_over / elements, tensors_over / tensors, steps_over / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    corpus = lm.load_corpus()
    print("| lr | d | layers | elements with RMS > 1 | tensors | steps with any |")
    print("|---|---|---|---|---|---|")
    for lr in (1e-3, 3e-3, 1e-2):
        for d, layers in ((64, 2), (128, 4)):
            e, t, s = clip_shares(corpus, d, layers, lr, args.steps)
            print(f"| {lr:g} | {d} | {layers} | {e:.1%} | {t:.1%} | {s:.0%} |", flush=True)


if __name__ == "__main__":
    main()
