"""What the radius controller costs per training step, against AdamW(fused=True), on three models (issue 26):
the LM demo's byte-level transformer, a GPT-2-small-shaped model (12 layers, width 768, 12 heads, vocabulary
50257, context 256, batch 4; built from a config, random weights, nothing downloaded) and the bench's small
ResNet (CIFAR-style ResNet-8, batch 128).

A step is what a user's loop runs: zero_grad, forward, cross-entropy, backward, ``opt.step()``. The settings are
timed in interleaved rounds in one process: each round runs a block of ``--block`` steps of every setting in
turn (a block of 32 holds exactly two scheduled probes of the default ``every=16``), the cost of a setting is the median
over rounds of its mean step time, divided by AdamW(fused=True)'s of the same round. The first block of every
setting (state set-up, the first probe) is not timed.

    python bench/radius_cost.py [--models lm,gpt2,resnet] [--rounds 5] [--out bench/results]
"""
from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from stabkernels.benchmarks.cases import small_resnet
from stabkernels.benchmarks.run import cpu_isa, machine_name
from stabkernels.optim import RadiusAdamW, RadiusController
from stabkernels._csv import write_rows

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-3


POOL = 16  # batches cycled through, as a loop over a data set would (a fixed batch would be over-fitted)


def lm_model(seed=0):
    from stabkernels.demo import lm

    torch.manual_seed(seed)
    model = lm.ByteLM()
    corpus = lm.load_corpus()
    g = torch.Generator().manual_seed(seed)
    x, y = lm.windows(corpus.train, torch.randint(0, len(corpus.train) - 66, (POOL * 8,), generator=g), 64)
    return model, x.view(POOL, 8, 64), y.view(POOL, 8, 64), model.lm_head


def gpt2_model(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=256)
    model = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, cfg.vocab_size, (POOL, 4, 257), generator=g)
    return model, data[..., :-1], data[..., 1:], model.lm_head


def resnet_model(seed=0):
    model = small_resnet("cpu", seed)
    g = torch.Generator().manual_seed(seed)
    return (model, torch.randn(POOL, 128, 3, 32, 32, generator=g), torch.randint(0, 10, (POOL, 128), generator=g),
            model[-1])


MODELS = {"lm": lm_model, "gpt2": gpt2_model, "resnet": resnet_model}


def logits_of(out):
    return out.logits if hasattr(out, "logits") else out


# setting -> (model, head) -> optimizer; every setting is built as a user writes it, with only the named option
def settings(model_name: str, batch: int) -> dict:
    s = {
        "AdamW(fused=True)": lambda m, h: torch.optim.AdamW(m.parameters(), lr=LR, fused=True),
        "RadiusAdamW (default)": lambda m, h: RadiusAdamW(m.parameters(), lr=LR, model=m),
        "RadiusController(AdamW) (default)": lambda m, h: RadiusController(torch.optim.AdamW(m.parameters(), lr=LR),
                                                                           m),
        "fd, every=1": lambda m, h: RadiusAdamW(m.parameters(), lr=LR, model=m, every=1),
        "jvp, every=1 (the full probe)": lambda m, h: RadiusAdamW(m.parameters(), lr=LR, model=m, method="jvp",
                                                                  every=1),
        "fd, every=8": lambda m, h: RadiusAdamW(m.parameters(), lr=LR, model=m, every=8),
        "jvp, every=16": lambda m, h: RadiusAdamW(m.parameters(), lr=LR, model=m, method="jvp"),
        f"fd, samples={max(1, batch // 4)}, every=1": lambda m, h: RadiusAdamW(
            m.parameters(), lr=LR, model=m, samples=max(1, batch // 4), every=1),
        "head only, every=1": lambda m, h: RadiusAdamW(m.parameters(), lr=LR, model=m, method="head", head=h,
                                                       every=1),
        "head only, every=16": lambda m, h: RadiusAdamW(m.parameters(), lr=LR, model=m, method="head", head=h),
    }
    if model_name != "resnet":
        s["jvp + fused head spread, every=1"] = lambda m, h: RadiusAdamW(m.parameters(), lr=LR, model=m, head=h,
                                                                         every=1)
    if model_name == "gpt2":  # 8 s a step on 2 cores: the defaults only (the levers: bench/results, earlier run)
        s = {k: v for k, v in s.items() if k.startswith("AdamW") or "(default)" in k}
    return s


def make_step(model, opt, xs, ys, probes: list):
    """One training step on the next batch of the pool; appends to ``probes`` whether it measured the radius."""
    it = iter(range(1 << 62))

    def step():
        i = next(it) % len(xs)
        x, y = xs[i], ys[i]
        opt.zero_grad()
        logits = logits_of(model(x))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        last = getattr(opt, "last", None)
        probes.append(bool(getattr(last, "recomputed", False)))
    return step


def run_model(name: str, rounds: int, block: int, only: list[str] | None, warmup: int | None = None) -> list[dict]:
    import copy

    model0, x, y, _ = MODELS[name]()
    runs, probes = {}, {}
    for label, make in settings(name, x.shape[1]).items():
        if only and label not in only and not label.startswith("AdamW"):
            continue
        # GPT-2: every setting steps the one model (a copy each would hold 7 x 1 GB of weights and gradients);
        # the timings do not depend on where the weights are
        model = model0 if name == "gpt2" else copy.deepcopy(model0)
        probes[label] = []
        runs[label] = make_step(model, make(model, HEADS[name](model)), x, y, probes[label])
    times = {label: [] for label in runs}
    for label, fn in runs.items():  # warm-up: state set-up and the first probe
        for _ in range(block if warmup is None else warmup):
            fn()
        probes[label].clear()
    for r in range(rounds):
        for label, fn in runs.items():
            t0 = time.process_time()  # CPU time of this process: other jobs on the machine do not count
            for _ in range(block):
                fn()
            times[label].append((time.process_time() - t0) / block)
        print(f"  {name}: round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    base = times["AdamW(fused=True)"]
    rows = []
    for label, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        rows.append({"model": name, "setting": label, "step_ms": round(1e3 * statistics.median(ts), 2),
                     "vs_adamw_fused": round(ratio, 3),
                     "ratio_min": round(min(t / b for t, b in zip(ts, base)), 3),
                     "ratio_max": round(max(t / b for t, b in zip(ts, base)), 3),
                     "probed_share": round(sum(probes[label]) / max(1, len(probes[label])), 3)})
    return rows


HEADS = {"lm": lambda m: m.lm_head, "gpt2": lambda m: m.lm_head, "resnet": lambda m: m[-1]}

DESCRIBE = {"lm": "LM demo transformer (d 64, 2 layers, 4 heads, context 64, batch 8, vocab 256)",
            "gpt2": "GPT-2-small shape (12 layers, d 768, 12 heads, vocab 50257, context 256, batch 4)",
            "resnet": "small ResNet-8 (CIFAR-style, batch 128 x 3 x 32 x 32)"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="lm,gpt2,resnet")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--block", type=int, default=32, help="steps per timed block (a multiple of 16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (GPT-2: --gpt2-threads)")
    p.add_argument("--gpt2-threads", type=int, default=2)
    p.add_argument("--gpt2-rounds", type=int, default=2)
    p.add_argument("--gpt2-block", type=int, default=16, help="GPT-2's block (16: one scheduled probe each)")
    p.add_argument("--gpt2-warmup", type=int, default=2, help="GPT-2's untimed steps before the rounds")
    p.add_argument("--only", default="", help="comma-separated setting labels (AdamW always runs)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--table-only", action="store_true",
                   help="re-render the markdown table from the per-model CSVs in --out (after a run of one model)")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] or None
    machine = f"{machine_name()}-{cpu_isa().lower()}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in [] if args.table_only else args.models.split(","):
        gpt2 = name == "gpt2"
        torch.set_num_threads(args.gpt2_threads if gpt2 else args.threads)
        new = run_model(name, args.gpt2_rounds if gpt2 else args.rounds, args.gpt2_block if gpt2 else args.block,
                        only, args.gpt2_warmup if gpt2 else None)
        if only:  # the other settings' rows of the last full run stay (each row is a ratio within its own run)
            from radius_survival import merged
            new = merged(out / f"radius-cost-{machine}-{name}.csv", new, "setting")
        write_rows(out / f"radius-cost-{machine}-{name}.csv", new)
    rows = []  # every model measured so far on this machine (one run per model)
    for name in MODELS:
        path = out / f"radius-cost-{machine}-{name}.csv"
        if path.exists():
            with open(path) as f:
                rows += list(csv.DictReader(f))
    header = (f"Machine: {platform.processor() or platform.machine()} ({machine}), CPU kernels {cpu_isa()}, "
              f"torch {torch.__version__}, {args.threads} thread(s) ({args.gpt2_threads} for GPT-2), CPU time of the "
              f"process. Interleaved rounds of {args.block} steps ({args.gpt2_block} for GPT-2; forward, backward, "
              f"step) on a pool of {POOL} batches; cost = median over rounds of the step time "
              f"divided by AdamW(fused=True)'s in the same round (min-max in brackets).")
    lines = [f"# Radius controller: step cost against AdamW(fused=True)", "", header, ""]
    for name in dict.fromkeys(r["model"] for r in rows):
        lines += [f"## {DESCRIBE[name]}", "", "| setting | step ms | vs AdamW(fused) | steps probed |",
                  "|---|---|---|---|"]
        for r in rows:
            if r["model"] == name:
                lines.append(f"| {r['setting']} | {r['step_ms']} | {float(r['vs_adamw_fused']):.2f}x "
                             f"[{float(r['ratio_min']):.2f}-{float(r['ratio_max']):.2f}] | "
                             f"{100 * float(r.get('probed_share', 0)):.0f}% |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    (out / f"radius-cost-{machine}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
