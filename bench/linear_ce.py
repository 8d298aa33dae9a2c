"""linear_cross_entropy against F.linear + F.cross_entropy (eager and torch.compile) on CPU: process CPU time and
wall time of a forward + backward (gradients of hidden and weight), interleaved rounds, medians; and peak extra
memory, each in a fresh process (SPEC 4.6; docs/performance.md "Linear cross-entropy").

    python bench/linear_ce.py [--tokens 1024] [--hidden 512] [--vocab 4096 16384] [--rounds 15]

Peak extra memory: resident memory the forward + backward adds at its high-water mark, over the inputs and after
one warm-up call (the compiled function's compilation is then done), the high-water mark reset before the
measured call (``/proc/self/clear_refs`` 5), glibc made to return every freed block of 64 KiB or more (so that
retained pages hide nothing). "chunk" for eager and torch.compile: all N rows at once. The gradients of hidden
and weight themselves are part of it on every side (N x H + V x H floats)."""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import textwrap
import time

SETUP = """
import torch, torch.nn.functional as F, stabkernels
torch.manual_seed(0)
h = torch.randn({n}, {d}).requires_grad_()
w = (torch.randn({v}, {d}) * 0.02).requires_grad_()
y = torch.randint(0, {v}, ({n},))
def eager():
    F.cross_entropy(F.linear(h, w), y).backward()
compiled = torch.compile(eager)
def fused():
    stabkernels.linear_cross_entropy(h, w, y)[0].backward()
def fused_liger():  # Liger-Kernel's chunk rule alone (no 128-row floor)
    stabkernels.linear_cross_entropy(h, w, y, chunk_size={liger})[0].backward()
"""

PEAK = """
def status_kb(key):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ':'))
{name}()
h.grad = w.grad = None
open('/proc/self/clear_refs', 'w').write('5')
before = status_kb('VmRSS')
{name}()
print((status_kb('VmHWM') - before) / 1024)
"""

TIME = """
import statistics, time
fns = {{'eager': eager, 'torch.compile': compiled, 'linear_cross_entropy': fused, 'Liger chunk': fused_liger}}
for f in fns.values():
    f(); f()  # compile, warm
samples = {{k: [] for k in fns}}
walls = {{k: [] for k in fns}}
names = list(fns)
for r in range({rounds}):
    for k in names[r % len(names):] + names[:r % len(names)]:  # interleaved, who goes first rotates
        h.grad = w.grad = None
        t0, w0 = time.process_time(), time.perf_counter()
        fns[k]()
        samples[k].append(time.process_time() - t0)
        walls[k].append(time.perf_counter() - w0)
for k, s in samples.items():
    print(k, statistics.median(s) * 1e3, min(s) * 1e3, statistics.median(walls[k]) * 1e3)
"""


# glibc: every block of 64 KiB or more its own mapping, returned on free (no dynamic threshold, no retained heap),
# so that resident memory follows the live buffers and the warm-up call's freed memory cannot hide the next one's
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def run(code: str, env: dict | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=900,
                         env=None if env is None else {**os.environ, **env})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return out.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args()
    from stabkernels.losses import default_chunk_size

    print("| N x H x V | chunk | logits (N x V) MB | chunk buffer MB | method | CPU time ms (median, min) "
          "| wall ms (median) | peak extra MB |")
    print("|---|---|---|---|---|---|---|---|")
    for v in a.vocab:
        rows = -(-a.tokens // -(-v // a.hidden))
        liger = 1 << max(0, rows - 1).bit_length()
        setup = SETUP.format(n=a.tokens, d=a.hidden, v=v, liger=liger)
        times = {}
        for line in run(setup + TIME.format(rounds=a.rounds)).splitlines():
            name, med, low, wall = line.rsplit(" ", 3)
            times[name] = (float(med), float(low), float(wall))
        chunk = default_chunk_size(a.tokens, a.hidden, v, cpu=True)
        for name, fn, c in (("eager", "eager", a.tokens), ("torch.compile", "compiled", a.tokens),
                            ("linear_cross_entropy", "fused", chunk), ("Liger chunk", "fused_liger", liger)):
            peak = float(run(setup + PEAK.format(name=fn), MALLOC).strip().splitlines()[-1])
            med, low, wall = times[name]
            print(f"| {a.tokens} x {a.hidden} x {v} | {c} | {a.tokens * v * 4 / 2**20:.0f} | "
                  f"{c * v * 4 / 2**20:.1f} | {name} | {med:.1f} ({low:.1f}) | {wall:.1f} | {peak:.1f} |", flush=True)


if __name__ == "__main__":
    main()
