"""SPEC 2.5 reproduction: the sustained 1000x learning-rate spike on scikit-learn's digits.

MLP 64-128-10, Adam (0.9, 0.999, 1e-8), batch 64, 200 steps, lr x1000 from step 50 on; base lr in
{1e-4, 1e-3, 1e-2}; 5 seeds. Plain Adam against the radius controller (RadiusController around Adam, the
whole training split as the sample set, exact JVP along Adam's direction). Prints the median final test
accuracy with its min-max over seeds and writes bench/results/radius_digits.csv.

    python bench/reproduce_radius_digits.py [--seeds 5] [--out bench/results]
"""
import argparse
import os
import time

from stabkernels.demo import digits
from stabkernels._csv import write_rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--lrs", default="1e-4,1e-3,1e-2")
    p.add_argument("--out", default=os.path.join("bench", "results"))
    args = p.parse_args()
    lrs = [float(x) for x in args.lrs.split(",")]
    methods = {"Adam": digits.adam_factory, "RadiusController(Adam)": digits.radius_adam_factory}
    rows = []
    t0 = time.perf_counter()
    for method, factory in methods.items():
        for lr in lrs:
            accs = []
            for seed in range(args.seeds):
                split = digits.load_digits_split(seed)
                accs.append(digits.run(method, factory, lr, seed, split).final_test_acc)
            med, lo, hi = digits.median_and_spread(accs)
            rows.append({"method": method, "base_lr": lr, "median_acc": round(med, 4), "min_acc": round(lo, 4),
                         "max_acc": round(hi, 4), "seeds": args.seeds})
    print(f"digits, lr x1000 from step 50, {args.seeds} seeds ({time.perf_counter() - t0:.0f} s)\n")
    print("| method | " + " | ".join(f"base lr {lr:g}" for lr in lrs) + " |")
    print("|---|" + "---|" * len(lrs))
    for method in methods:
        cells = [f"{r['median_acc']:.3f} ({r['min_acc']:.3f}-{r['max_acc']:.3f})" for r in rows
                 if r["method"] == method]
        print(f"| {method} | " + " | ".join(cells) + " |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "radius_digits.csv")
    write_rows(path, rows)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
