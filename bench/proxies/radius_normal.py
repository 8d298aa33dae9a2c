"""Radius controller in normal training (Ghosts of Softmax): at a well-chosen learning rate and no spike, does
the controller cost accuracy, and how often does it cap a step? A controller that caps good steps costs
accuracy every day.

Digits MLP 64-128-10, batch 64, 300 steps, Adam at lr 1e-3 and 3e-3 (the digits scenario's best range), with
and without RadiusController(Adam) (cap mode, r = 1, the whole training split as the sample set).

    python bench/proxies/radius_normal.py [--seeds 5] [--quick] [--out bench/results/proxy_radius_normal.md]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _table import med, write_md  # noqa: E402

from stabkernels.demo import digits  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join("bench", "results", "proxy_radius_normal.md"))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = 1, 60
    rows = []
    for lr in (1e-3, 3e-3):
        acc = {"Adam": [], "RadiusController(Adam)": []}
        capped = []
        for seed in range(args.seeds):
            split = digits.load_digits_split(seed)
            acc["Adam"].append(digits.run("Adam", digits.adam_factory, lr, seed, split, steps=args.steps,
                                          spike=1.0).final_test_acc)
            scales = []

            def factory(model, lr):
                opt, step = digits.radius_adam_factory(model, lr)

                def counted(*a):
                    step(*a)
                    scales.append(float(opt.last.scale))

                return opt, counted

            acc["RadiusController(Adam)"].append(digits.run("RadiusController(Adam)", factory, lr, seed, split,
                                                            steps=args.steps, spike=1.0).final_test_acc)
            capped.append(sum(s < 1 for s in scales) / len(scales))
        rows.append([f"{lr:g}", f"{med(acc['Adam']):.3f}", f"{med(acc['RadiusController(Adam)']):.3f}",
                     f"{100 * med(capped):.1f}% ({100 * min(capped):.1f}-{100 * max(capped):.1f}%)"])
    write_md(args.out, f"Digits MLP, no spike, {args.steps} steps, median over {args.seeds} seed(s); torch "
             f"{torch.__version__}.", ["Adam lr", "Adam test acc", "RadiusController(Adam) test acc",
                                       "steps capped (median, min-max)"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
