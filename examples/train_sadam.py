"""SAdam: AdamW damped by random-direction probes of the batch loss; checkpoint and resume (the probe
directions continue from the saved seed and counter).

    python examples/train_sadam.py
"""
import sys

from torch.nn import functional as F

from _resume import report, train_and_resume
from stabkernels.optim import SAdam


def build(model):
    opt = SAdam(model, lr=3e-3, probes=4, seed=0)  # was: torch.optim.AdamW(model.parameters(), lr=3e-3)
    return opt, None, lambda x, y, loss: opt.step(probe_closure=lambda: F.cross_entropy(model(x), y), loss=loss)


def main(steps=120):
    return report("SAdam", train_and_resume(build, steps))


if __name__ == "__main__":
    sys.exit(main())
