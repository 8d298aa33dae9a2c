"""``python -m stabkernels.benchmarks.compiled_steps``: each optimizer's ``step()`` eager and under
``torch.compile``, with dynamo's graph-break and graph counts, on a small transformer-like MLP; writes
``<out>/<name>-compiled-steps.{csv,md}``.

The step alone is timed (gradients are computed once and kept), interleaved with the eager step; the first
compiled call (compilation) is not timed. S-Adam's probe closure is a fixed-batch loss."""
from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from torch.nn import functional as F

from .run import machine_name
from .timing import measure
from .._csv import write_rows


def bench_model(device, width):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.LayerNorm(4 * width),
                         nn.Linear(4 * width, width), nn.GELU(), nn.Linear(width, 64)).to(device)


def optimizers():
    from ..optim import PSS, OrthoGrad, PSSAdamW, RadiusAdamW, RadiusController, RadiusSGD, SAdam

    return {
        "AdamW(fused=True)": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True),
        "RadiusController(Adam)": lambda m: RadiusController(torch.optim.Adam(m.parameters(), lr=1e-3), m),
        "RadiusAdamW": lambda m: RadiusAdamW(m.parameters(), lr=1e-3, model=m),
        "RadiusSGD": lambda m: RadiusSGD(m.parameters(), lr=1e-2, momentum=0.9, model=m),
        "SAdam": lambda m: SAdam(m, lr=1e-3, seed=0),
        "PSSAdamW": lambda m: PSSAdamW(m, lr=1e-3),
        "PSS(AdamW)": lambda m: PSS(torch.optim.AdamW(m.parameters(), lr=1e-3), m),
        "OrthoGrad(AdamW)": lambda m: OrthoGrad(torch.optim.AdamW(m.parameters(), lr=1e-3)),
    }


def measure_one(name, make, device, width, batch, min_time):
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, width, generator=g).to(device)
    y = torch.randint(0, 64, (batch,), generator=g).to(device)
    steps = {}
    for compiled in (False, True):
        model = bench_model(device, width)
        opt = make(model)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        probe = lambda model=model: F.cross_entropy(model(x), y)  # noqa: E731
        fn = torch.compile(opt.step) if compiled else opt.step
        steps["compiled" if compiled else "eager"] = (
            (lambda fn=fn, loss=loss, probe=probe: fn(probe_closure=probe, loss=loss.detach())) if name == "SAdam" else fn)
    torch._dynamo.reset()
    counters.clear()
    steps["compiled"]()  # compiles
    breaks = sum(counters["graph_break"].values())
    graphs = counters["stats"]["unique_graphs"]
    t = measure(steps, device=device, min_time=min_time)
    return {"optimizer": name, "device": device, "eager_ms": round(t["eager"].median_s * 1e3, 3),
            "compiled_ms": round(t["compiled"].median_s * 1e3, 3),
            "compiled_speedup": round(t["eager"].median_s / t["compiled"].median_s, 3),
            "graph_breaks": breaks, "graphs": graphs, "params": sum(p.numel() for p in bench_model("cpu", width).parameters())}


def write(stem, rows, device, width) -> None:
    write_rows(stem + ".csv", rows)
    with open(stem + ".md", "w") as f:
        f.write(f"{machine_name()}, torch {torch.__version__}, {device}, MLP width {width} "
                f"({rows[0]['params']} parameters), step() alone\n\n")
        f.write("| optimizer | eager (ms) | torch.compile (ms) | compiled speed-up | graph breaks | graphs |\n")
        f.write("|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['optimizer']} | {r['eager_ms']} | {r['compiled_ms']} | {r['compiled_speedup']}x | "
                    f"{r['graph_breaks']} | {r['graphs']} |\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width", type=int, default=None, help="model width (default 512 on CUDA, 128 on CPU)")
    p.add_argument("--min-time", type=float, default=0.3)
    p.add_argument("--out", default=os.path.join("bench", "results"))
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    width = args.width or (512 if args.device == "cuda" else 128)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{args.name or machine_name()}-compiled-steps")
    rows = []
    for name, make in optimizers().items():  # the files are rewritten after each optimizer (time-limited runs)
        rows.append(measure_one(name, make, args.device, width, 64, args.min_time))
        print(rows[-1], flush=True)
        write(stem, rows, args.device, width)
    print(f"wrote {stem}.csv and {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
