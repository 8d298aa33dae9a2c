"""PSSAdamW: AdamW with spectral smoothing on trigger steps (here also every 25 steps); checkpoint and resume.

    python examples/train_pss.py
"""
import sys

import torch

from _resume import report, train_and_resume
from stabkernels.optim import PSSAdamW


def build(model):
    opt = PSSAdamW(model, lr=3e-3, weight_decay=1e-2, every=25)  # was: torch.optim.AdamW(model.parameters(), ...)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.5)
    return opt, sched, lambda x, y, loss: opt.step()


def main(steps=120):
    return report("PSSAdamW", train_and_resume(build, steps))


if __name__ == "__main__":
    sys.exit(main())
