"""``python -m stabkernels bench``: every family's kernel benchmarks against their torch baselines on this
machine; prints a table and writes ``<out>/<machine>.csv``."""
from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import sys

import torch

from .cases import FAMILIES, Case
from .timing import keep_freed_memory, measure

COLUMNS = ["op", "backend", "shape", "dtype", "device", "time_ms", "statistic", "GB_per_s", "speedup",
           "peak_extra_MB", "baseline"]


def machine_name() -> str:
    """A file-name slug for this machine: the GPU's name, else the CPU model and core count."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
            if m:
                name = m.group(1)
        except OSError:
            pass
        name = f"{name}-{os.cpu_count()}cores"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def progress(i: int, n: int, label: str, width: int = 30) -> None:
    done = int(width * i / max(n, 1))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {label[:60]:<60}")
    sys.stderr.flush()
    if i == n:
        sys.stderr.write("\n")


def run_case(case: Case, device: str, min_time: float) -> list[dict]:
    fns = {"baseline": case.baseline, **case.candidates}
    t = measure(fns, device=device, min_time=min_time, min_rounds=case.min_rounds)
    stat = (lambda x: x.mean_s) if case.statistic == "mean" else (lambda x: x.median_s)  # noqa: E731
    base = stat(t["baseline"])
    rows = []
    for name, timing in t.items():
        rows.append({
            "op": case.op, "backend": "torch-baseline" if name == "baseline" else name, "shape": case.shape,
            "dtype": case.dtype, "device": device, "time_ms": round(stat(timing) * 1e3, 4),
            "statistic": case.statistic, "GB_per_s": round(case.nbytes / stat(timing) / 1e9, 2),
            "speedup": round(base / stat(timing), 3),
            "peak_extra_MB": round(case.peak_mb[name], 1) if name in case.peak_mb else "",
            "baseline": case.baseline_name,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ["op", "backend", "shape", "dtype", "time_ms", "statistic", "GB_per_s", "speedup", "peak_extra_MB"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(f"{c:<{widths[c]}}" for c in cols)]
    lines += ["  ".join(f"{str(r[c]):<{widths[c]}}" for c in cols) for r in rows]
    return "\n".join(lines)


def markdown(rows: list[dict], title: str) -> str:
    """The table for the README: candidates with their speed-up over the torch baseline of their case."""
    lines = [title, "", "| op | shape | dtype | backend | time (ms) | baseline (ms) | speed-up | GB/s | extra peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {(r["op"], r["shape"], r["dtype"]): r for r in rows if r["backend"] == "torch-baseline"}
    for r in rows:
        if r["backend"] == "torch-baseline":
            continue
        b = base[(r["op"], r["shape"], r["dtype"])]
        mem = f"{r['peak_extra_MB']} (baseline {b['peak_extra_MB']})" if r["peak_extra_MB"] != "" else ""
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['backend']} | {r['time_ms']:.2f} | "
                     f"{b['time_ms']:.2f} | {r['speedup']:.2f}x | {r['GB_per_s']} | {mem} |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: str, title: str) -> None:
    """Horizontal bars of each candidate's speed-up over its torch baseline (log scale, 1x marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["backend"] != "torch-baseline"]
    labels = [f"{r['op']} [{r['backend']}] {r['shape']} {r['dtype']}" for r in shown]
    values = [r["speedup"] for r in shown]
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(shown) + 1.2))
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.barh(range(len(shown)), values, color=colors)
    ax.set_yticks(range(len(shown)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xlabel("speed-up over the torch baseline (x, log scale)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stabkernels bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="CI-size shapes, short timing")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: " + ", ".join(FAMILIES))
    p.add_argument("--out", default=os.path.join("bench", "results"), help="folder for the CSV")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--min-time", type=float, default=None, help="seconds per candidate (default 0.4, quick 0.05)")
    args = p.parse_args(argv)
    min_time = args.min_time if args.min_time is not None else (0.05 if args.quick else 0.4)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        p.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    kept = keep_freed_memory()
    cases = [c for f in families for c in FAMILIES[f](args.device, args.quick)]
    rows = []
    for i, case in enumerate(cases):
        progress(i, len(cases), f"{case.op} {case.shape} {case.dtype}")
        rows += run_case(case, args.device, min_time)
    progress(len(cases), len(cases), "done")
    print(format_table(rows))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{machine_name()}{'-quick' if args.quick else ''}")
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    title = (f"{machine_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
             f"{', malloc keeps freed memory' if kept else ''}{', quick shapes' if args.quick else ''}")
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows, title))
    chart(rows, stem + ".png", title)
    print(f"wrote {stem}.csv, {stem}.md and {stem}.png")
    return 0
