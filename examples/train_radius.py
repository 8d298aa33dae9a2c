"""RadiusController around Adam, and the fused RadiusAdamW, with a cosine LR schedule; checkpoint and resume.

    python examples/train_radius.py
"""
import sys

import torch

from _resume import report, train_and_resume
from stabkernels.optim import RadiusAdamW, RadiusController


def wrapper(model):
    opt = RadiusController(torch.optim.Adam(model.parameters(), lr=3e-3), model)  # was: torch.optim.Adam(...)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=120)
    return opt, sched, lambda x, y, loss: opt.step(x)  # the radius is measured on this batch


def fused(model):
    opt = RadiusAdamW(model.parameters(), lr=3e-3, weight_decay=1e-2, model=model)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=120)
    return opt, sched, lambda x, y, loss: opt.step()  # no inputs: the last training forward's are captured


def main(steps=120):
    return max(report("RadiusController(Adam)", train_and_resume(wrapper, steps)),
               report("RadiusAdamW", train_and_resume(fused, steps)))


if __name__ == "__main__":
    sys.exit(main())
