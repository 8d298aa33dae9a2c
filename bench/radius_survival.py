"""Does the radius controller still survive at a setting (issue 26)? For each probe setting of
bench/radius_cost.py: the LM demo's sustained x1000 learning-rate spike (final validation loss, median over
seeds, against AdamW without the spike), digits at base lr 1e-2 with the x1000 spike (median final test
accuracy), and normal training without a spike on the radius-normal proxy's setting (digits, Adam 3e-3: share
of steps capped). Merged with the cost table of bench/radius_cost.py when its CSV is there.

    python bench/radius_survival.py [--lm-seeds 3] [--digits-seeds 5] [--out bench/results]
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from stabkernels.demo import digits, lm
from stabkernels.benchmarks.run import cpu_isa, machine_name
from stabkernels.optim import RadiusAdamW
from stabkernels._csv import write_rows

ROOT = Path(__file__).resolve().parents[1]

# setting label (as in bench/radius_cost.py) -> RadiusAdamW options, given the model's output head and a
# sample-subset size
SETTINGS = {
    "RadiusAdamW (default)": lambda head, n: {},
    "fd, every=1": lambda head, n: dict(every=1),
    "jvp, every=1 (the full probe)": lambda head, n: dict(method="jvp", every=1),
    "fd, every=8": lambda head, n: dict(every=8),
    "jvp, every=16": lambda head, n: dict(method="jvp"),
    "fd, samples=B/4, every=1": lambda head, n: dict(samples=n, every=1),
    "head only, every=1": lambda head, n: dict(method="head", head=head, every=1),
    "head only, every=16": lambda head, n: dict(method="head", head=head),
    "jvp + fused head spread, every=1": lambda head, n: dict(head=head, every=1),
}


def lm_survival(options, seeds: int) -> float:
    def factory(model, lr):
        return lm.radius_adamw(model, lr, **options(model.lm_head, 2))
    corpus = lm.load_corpus()
    return statistics.median(lm.run("RadiusAdamW", corpus, s, spike=True, factory=factory).final_val_loss
                             for s in range(seeds))


def digits_runs(options, seeds: int, lr: float, spike: float, capped: list | None = None) -> float:
    accs = []
    for seed in range(seeds):
        split = digits.load_digits_split(seed)
        scales = []

        def factory(model, lr):
            opt = RadiusAdamW(model.parameters(), lr=lr, weight_decay=1e-2, model=model, capture_inputs=False,
                              **options(model[-1], len(split.x_train) // 4))

            def step(x, y, sample_set, loss):
                opt.step(sample_set)
                scales.append(opt.last.scale)
            return opt, step

        accs.append(digits.run("RadiusAdamW", factory, lr, seed, split, spike=spike).final_test_acc)
        if capped is not None:
            capped.append(sum(float(s) < 1 for s in scales) / len(scales))
    return statistics.median(accs)


def head_capture(steps: int = 100, seed: int = 0) -> tuple[float, float, float]:
    """How much of the full spread the zero-probe mode sees: AdamW trains the LM demo's transformer (lr 3e-3);
    after every step, the spread along that step's direction at the new point, from the whole model (exact JVP)
    and from the head alone (h dW^T). Returns the median, min and max over steps of spread_head / spread_full
    (= rho_full / rho_head)."""
    import math

    from stabkernels.optim.radius import RadiusProbe

    corpus = lm.load_corpus()
    torch.manual_seed(seed)
    model = lm.ByteLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    full = RadiusProbe(model, "jvp", capture_inputs=False)
    head = RadiusProbe(model, "head", head=model.lm_head, capture_inputs=False)
    gen = torch.Generator().manual_seed(1000 + seed)
    fractions = []
    for _ in range(steps):
        x, y = lm.windows(corpus.train, torch.randint(0, len(corpus.train) - 65, (8,), generator=gen), 64)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        lm.lm_loss(model(x), y).backward()
        opt.step()
        direction = {id(p): p.detach() - b for p, b in zip(model.parameters(), before)}
        scale = 1 / torch.sqrt(sum(d.double().square().sum() for d in direction.values())).float()
        with torch.no_grad():
            rhos = [probe.radius(probe.sample_set(x), direction, scale) for probe in (full, head)]
        fractions.append(float(rhos[0] / rhos[1]))
    fractions = [f for f in fractions if math.isfinite(f)]
    return statistics.median(fractions), min(fractions), max(fractions)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm-seeds", type=int, default=3)
    p.add_argument("--digits-seeds", type=int, default=5)
    p.add_argument("--only", default="")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--table-only", action="store_true",
                   help="re-render radius-levers.md from radius-survival.csv and the cost CSVs (after a cost run)")
    args = p.parse_args(argv)
    if args.table_only:
        return rerender(Path(args.out), args)
    torch.set_num_threads(1)  # as the demo's runs (stabkernels._pool): reproducible, and beside a timing run
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    corpus = lm.load_corpus()
    adamw = statistics.median(lm.run("AdamW", corpus, s, spike=False).final_val_loss for s in range(args.lm_seeds))
    adamw_spike = statistics.median(lm.run("AdamW", corpus, s, spike=True).final_val_loss
                                    for s in range(args.lm_seeds))
    rows = []
    summary = {"adamw": adamw, "adamw_spike": adamw_spike}
    for label, options in SETTINGS.items():
        if only and label not in only:
            continue
        t0 = time.time()
        loss = lm_survival(options, args.lm_seeds)
        acc = digits_runs(options, args.digits_seeds, 1e-2, 1000.0)
        capped: list = []
        digits_runs(options, args.digits_seeds, 3e-3, 1.0, capped)
        rows.append({"setting": label, "lm_spike_val_loss": round(loss, 4),
                     "lm_vs_adamw_no_spike": round(loss / adamw, 4), "digits_spike_test_acc": round(acc, 4),
                     "digits_normal_capped_share": round(statistics.median(capped), 4)})
        print(rows[-1], f"{time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    summary["capture"] = head_capture()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = merged(out / "radius-survival.csv", rows, "setting") if only else rows
    write_rows(out / "radius-survival.csv", rows)
    (out / "radius-survival.json").write_text(json.dumps(summary))
    return rerender(out, args)


def merged(path: Path, rows: list[dict], key: str) -> list[dict]:
    """The rows of an earlier run in ``path`` with those of this run (``--only``) in place of the same ``key``,
    in the earlier order (new keys last)."""
    if not path.exists():
        return rows
    new = {r[key]: r for r in rows}
    with open(path) as f:
        old = list(csv.DictReader(f))
    out = [new.pop(r[key], r) for r in old]
    return out + list(new.values())


def rerender(out: Path, args) -> int:
    machine = f"{machine_name()}-{cpu_isa().lower()}"
    with open(out / "radius-survival.csv") as f:
        rows = [{k: (v if k == "setting" else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]
    summary = json.loads((out / "radius-survival.json").read_text())
    capture = summary["capture"]
    text = table(rows, out, machine, summary["adamw"], summary["adamw_spike"], args)
    text += (f"\nThe zero-probe mode (head only) sees {100 * capture[0]:.0f}% of the full spread (median over 100 "
             f"AdamW steps of the LM demo's transformer, {100 * capture[1]:.0f}-{100 * capture[2]:.0f}%): its radius "
             f"is {1 / capture[0]:.1f}x the full probe's.\n")
    (out / "radius-levers.md").write_text(text)
    print(text)
    return 0


def table(rows, out: Path, machine: str, adamw: float, adamw_spike: float, args) -> str:
    cost = {}
    for model in ("lm", "gpt2", "resnet"):
        path = out / f"radius-cost-{machine}-{model}.csv"
        if not path.exists():
            continue
        with open(path) as f:
            for r in csv.DictReader(f):
                label = r["setting"].replace(f"samples={r['setting'].split('samples=')[-1].split(',')[0]}",
                                             "samples=B/4") if "samples=" in r["setting"] else r["setting"]
                cost[(r["model"], label)] = float(r["vs_adamw_fused"])
    models = [m for m in ("lm", "gpt2", "resnet") if any(k[0] == m for k in cost)]
    head = ["setting"] + [f"cost {m}" for m in models] + [
        f"LM x1000 spike: val loss (vs AdamW w/o spike {adamw:.3f})", "digits lr 1e-2 x1000: test acc",
        "digits normal (Adam-like 3e-3): steps capped"]
    lines = [f"Cost: step time against AdamW(fused=True) (bench/results/radius-cost-{machine}.md: LM demo "
             f"transformer, GPT-2-small shape, ResNet-8). Survival: LM demo median over {args.lm_seeds} seeds (AdamW "
             f"with the spike: {adamw_spike:.3g}); digits median over {args.digits_seeds} seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = [f"{cost[(m, r['setting'])]:.2f}x" if (m, r["setting"]) in cost else "" for m in models]
        lines.append("| " + " | ".join([r["setting"]] + c + [
            f"{r['lm_spike_val_loss']:.3f} ({100 * (r['lm_vs_adamw_no_spike'] - 1):+.1f}%)",
            f"{r['digits_spike_test_acc']:.3f}", f"{100 * r['digits_normal_capped_share']:.1f}%"]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
