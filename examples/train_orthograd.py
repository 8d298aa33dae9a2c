"""OrthoGrad around AdamW (the grokking paper's setup: betas (0.9, 0.99), no weight decay); checkpoint and
resume.

    python examples/train_orthograd.py
"""
import sys

import torch

from _resume import report, train_and_resume
from stabkernels.optim import OrthoGrad


def build(model):
    opt = OrthoGrad(torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.0))
    return opt, None, lambda x, y, loss: opt.step()


def main(steps=120):
    return report("OrthoGrad(AdamW)", train_and_resume(build, steps))


if __name__ == "__main__":
    sys.exit(main())
