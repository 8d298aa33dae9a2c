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
import statistics
import sys
import time
from pathlib import Path

import torch

from stabkernels import digits, lm
from stabkernels.benchmarks.run import cpu_isa, machine_name
from stabkernels.optim import RadiusAdamW

ROOT = Path(__file__).resolve().parents[1]

# setting label (as in bench/radius_cost.py) -> RadiusAdamW options, given the model's output head and a
# sample-subset size
SETTINGS = {
    "RadiusAdamW (default)": lambda head, n: {},
    "fd, every=1": lambda head, n: dict(every=1),
    "jvp, every=1 (the full probe)": lambda head, n: dict(method="jvp", every=1),
    "jvp, every=8": lambda head, n: dict(method="jvp"),
    "fd, samples=B/4, every=1": lambda head, n: dict(samples=n, every=1),
    "head only, every=1": lambda head, n: dict(method="head", head=head, every=1),
    "head only, every=8": lambda head, n: dict(method="head", head=head),
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm-seeds", type=int, default=3)
    p.add_argument("--digits-seeds", type=int, default=5)
    p.add_argument("--only", default="")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    corpus = lm.load_corpus()
    adamw = statistics.median(lm.run("AdamW", corpus, s, spike=False).final_val_loss for s in range(args.lm_seeds))
    adamw_spike = statistics.median(lm.run("AdamW", corpus, s, spike=True).final_val_loss
                                    for s in range(args.lm_seeds))
    rows = []
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
    machine = f"{machine_name()}-{cpu_isa().lower()}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "radius-survival.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    text = table(rows, out / f"radius-cost-{machine}.csv", adamw, adamw_spike, args)
    (out / "radius-levers.md").write_text(text)
    print(text)
    return 0


def table(rows, cost_csv: Path, adamw: float, adamw_spike: float, args) -> str:
    cost = {}
    if cost_csv.exists():
        with open(cost_csv) as f:
            for r in csv.DictReader(f):
                label = r["setting"].replace(f"samples={r['setting'].split('samples=')[-1].split(',')[0]}",
                                             "samples=B/4") if "samples=" in r["setting"] else r["setting"]
                cost[(r["model"], label)] = float(r["vs_adamw_fused"])
    models = [m for m in ("lm", "gpt2", "resnet") if any(k[0] == m for k in cost)]
    head = ["setting"] + [f"cost {m}" for m in models] + [
        f"LM x1000 spike: val loss (vs AdamW w/o spike {adamw:.3f})", "digits lr 1e-2 x1000: test acc",
        "digits normal (Adam-like 3e-3): steps capped"]
    lines = [f"Survival: LM demo median over {args.lm_seeds} seeds (AdamW with the spike: {adamw_spike:.3g}); digits "
             f"median over {args.digits_seeds} seeds. Cost: {cost_csv.name} (AdamW(fused=True) = 1.00x).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = [f"{cost[(m, r['setting'])]:.2f}x" if (m, r["setting"]) in cost else "" for m in models]
        lines.append("| " + " | ".join([r["setting"]] + c + [
            f"{r['lm_spike_val_loss']:.3f} ({100 * (r['lm_vs_adamw_no_spike'] - 1):+.1f}%)",
            f"{r['digits_spike_test_acc']:.3f}", f"{100 * r['digits_normal_capped_share']:.1f}%"]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
