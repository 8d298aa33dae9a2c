"""``python -m stabkernels demo``: the backend report, then a small ``row_spread`` example.

(The stability shoot-out on real data grows here as the optimizer families land.)"""
from __future__ import annotations

import argparse
import math
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stabkernels demo", description=__doc__)
    parser.parse_args(argv)
    import stabkernels as sk

    sk.info()
    print("\nrow_spread: the spread of tangent logits bounds the softmax convergence radius by pi / spread")
    torch.manual_seed(0)
    logits_tangent = torch.randn(2048, 32000)
    backend = sk.backend.resolve("row_spread", "auto", "cpu")
    for name, fn in [("torch composition", lambda: (logits_tangent.amax(1) - logits_tangent.amin(1)).max()),
                     (f"stabkernels ({backend})", lambda: sk.row_spread(logits_tangent))]:
        fn()
        t0 = time.perf_counter()
        for _ in range(5):
            value = fn()
        ms = (time.perf_counter() - t0) / 5 * 1e3
        print(f"  {name:<24} spread {value.item():.4f}  radius {math.pi / value.item():.4f}  {ms:7.2f} ms")
    return 0
