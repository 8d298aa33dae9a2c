"""Shared by the example scripts: train on digits, checkpoint halfway, and check that a run resumed from
the checkpoint (fresh model, optimizer and scheduler) ends bit-identical to the uninterrupted one."""
from __future__ import annotations

import os
import tempfile

import torch
from torch.nn import functional as F

from stabkernels.demo.digits import evaluate, load_digits_split, make_mlp


def train_and_resume(build, steps: int = 120, batch: int = 64, seed: int = 0) -> dict:
    """``build(model)`` returns (optimizer, scheduler or None, step(x, y, loss)); ``step`` runs after
    ``loss.backward()``. Returns final accuracy and whether the resumed run was identical."""
    split = load_digits_split(seed)

    def run(ckpt_path, start=None):
        model = make_mlp(seed)
        opt, sched, step = build(model)
        gen = torch.Generator().manual_seed(seed)
        t0 = 0
        if start is not None:  # resume
            ckpt = torch.load(start, weights_only=False)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            if sched is not None:
                sched.load_state_dict(ckpt["scheduler"])
            gen.set_state(ckpt["data_rng"])
            t0 = ckpt["step"]
        for t in range(t0, steps):
            if t == steps // 2 and ckpt_path is not None:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": t,
                            "scheduler": sched.state_dict() if sched is not None else None,
                            "data_rng": gen.get_state()}, ckpt_path)
            idx = torch.randint(0, len(split.x_train), (batch,), generator=gen)
            x, y = split.x_train[idx], split.y_train[idx]
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            step(x, y, loss)
            if sched is not None:
                sched.step()
        return model

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "checkpoint.pt")
        full = run(path)
        resumed = run(None, start=path)
    identical = all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))
    _, acc = evaluate(full, split.x_test, split.y_test)
    return {"test_acc": acc, "resumed_identical": identical}


def report(name: str, result: dict) -> int:
    print(f"{name}: test accuracy {result['test_acc']:.3f}; resumed run identical: {result['resumed_identical']}")
    return 0 if result["resumed_identical"] else 1
