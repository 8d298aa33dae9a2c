"""What QK-clip costs on CPU (docs/performance.md "QK-clip"): qk_max_logits against materialising the scores, and a training
step's peak memory and time with and without QKClip.

    python bench/qkclip_costs.py [--quick]

1. qk_max_logits at (B, H, T, D) float32, causal: the cpp kernel against (q @ k^T * scale).masked_fill(causal)
   .amax((2, 3)) in eager torch and under torch.compile (inductor): median time, and the extra peak resident
   memory of one call in a fresh process (VmHWM against RSS before).
2. A ByteLM training step (forward, backward, AdamW step) with and without QKClip: the peak resident memory of
   building the model and running 3 steps in a fresh process (above the imports), and the median step time.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from stabkernels.benchmarks.cases import peak_extra_mb


def median_ms(fn, rounds=7, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def op_costs(B, H, T, D):
    import stabkernels as sk

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, H, T, D, generator=g) for _ in range(2))
    scale = 1 / math.sqrt(D)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)

    def materialise(q, k):
        return (q @ k.transpose(-1, -2) * scale).masked_fill(future, float("-inf")).amax(dim=(2, 3))

    compiled = torch.compile(materialise)
    want = materialise(q, k)
    got = sk.qk_max_logits(q, k, backend="cpp")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    rows = {"eager q @ k^T": median_ms(lambda: materialise(q, k)),
            "torch.compile q @ k^T": median_ms(lambda: compiled(q, k)),
            "qk_max_logits (cpp)": median_ms(lambda: sk.qk_max_logits(q, k, backend="cpp"))}
    setup = (f"g = torch.Generator().manual_seed(0); q, k = (torch.randn({B}, {H}, {T}, {D}, generator=g) for _ in "
             f"range(2)); f = torch.ones({T}, {T}, dtype=torch.bool).triu(1)")
    mem = {"eager q @ k^T": peak_extra_mb(setup, f"r = (q @ k.transpose(-1, -2) * {scale}).masked_fill(f, "
                                                 "float('-inf')).amax(dim=(2, 3))"),
           "torch.compile q @ k^T": peak_extra_mb(
               setup + f"; m = torch.compile(lambda q, k: (q @ k.transpose(-1, -2) * {scale}).masked_fill(f, "
                       "float('-inf')).amax(dim=(2, 3))); m(q, k)", "r = m(q, k)"),
           "qk_max_logits (cpp)": peak_extra_mb(setup, "r = stabkernels.qk_max_logits(q, k, backend='cpp')")}
    print(f"\nqk_max_logits, B={B} H={H} T={T} D={D} float32 causal (scores would be {B * H * T * T * 4 / 2**20:.0f} MiB)")
    print("| how | median ms | extra peak MiB |\n|---|---|---|")
    for name in rows:
        print(f"| {name} | {rows[name]:.1f} | {mem[name]:.0f} |")


STEP_SETUP = """
from stabkernels.demo.lm import ByteLM
from stabkernels.optim import QKClip
torch.manual_seed(0)
model = ByteLM(d={d}, layers={layers}, heads={heads}, context={T})
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
if {clip}:
    opt = QKClip(model, threshold=1.0).wrap(opt)
x = torch.randint(0, 256, ({B}, {T} + 1))
def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    opt.step()
step(); step()
"""


def step_costs(B, T, d, layers, heads):
    print(f"\nByteLM training step (AdamW), B={B} T={T} d={d} layers={layers} heads={heads}")
    print("| | median ms | peak MiB above the imports (model, AdamW state, 3 steps) |\n|---|---|---|")
    for clip in (False, True):
        setup = STEP_SETUP.format(d=d, layers=layers, heads=heads, T=T, B=B, clip=clip)
        # the whole run as the statement (setup only imports): the warm-up steps reach the high-water mark
        mem = peak_extra_mb("pass", (setup + "step()").replace("\n", "\n        "))  # peak_extra_mb indents by 8
        ns: dict = {"torch": torch}
        exec(setup, ns)
        ms = median_ms(ns["step"], rounds=5, warmup=1)
        print(f"| {'with QKClip' if clip else 'without'} | {ms:.1f} | {mem:.0f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.quick:
        op_costs(1, 2, 256, 32)
        step_costs(2, 64, 64, 2, 4)
    else:
        op_costs(1, 8, 2048, 64)
        step_costs(4, 512, 256, 4, 8)


if __name__ == "__main__":
    main()
