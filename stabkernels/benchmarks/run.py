"""``python -m stabkernels bench``: every family's kernel benchmarks against their torch baselines on this
machine; prints a table and writes ``<out>/<machine>.csv``."""
from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import sys

import torch

from .cases import FAMILIES, Case
from .timing import keep_freed_memory, measure
from .._csv import write_rows

COLUMNS = ["op", "backend", "shape", "dtype", "device", "time_ms", "statistic", "GB_per_s", "pct_of_copy",
           "speedup", "vs_best_peer", "peak_extra_MB", "baseline", "cpu_isa"]
COMPILED = "torch.compile"


def is_peer(name: str) -> bool:
    """Whether a timed entry is a torch peer a user could pick instead (the composition, its compiled form,
    torch's fused optimizers), as opposed to our kernels or a bandwidth reference."""
    return name in ("baseline", COMPILED) or (name.startswith("ref:") and "clone" not in name)


def copy_bandwidth(device: str, nbytes: int = 256 << 20) -> float:
    """GB/s of ``dst.copy_(src)`` over ``nbytes`` (bytes read per second, as our GB/s columns count)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = measure({"copy": lambda: dst.copy_(src)}, device=device, min_time=0.2)["copy"]
    return nbytes / t.median_s / 1e9


def cpu_isa() -> str:
    """The SIMD level of our CPU kernels in this process (DEFAULT, AVX2, AVX512), or '' without _C."""
    from .. import _ext

    return _ext.cpu_isa


def cpu_label(cpuinfo: str) -> str | None:
    """The CPU's model name in /proc/cpuinfo text; a VM may show only "AMD EPYC", so a name without a model
    number gets the family and model, which tell the generation (Zen 2 has no AVX-512, Zen 4 has)."""
    m = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    if not m:
        return None
    name = m.group(1)
    fam, mod = (re.search(rf"^{key}\s*:\s*(\d+)$", cpuinfo, re.M) for key in ("cpu family", "model"))
    if not re.search(r"\d", name) and fam and mod:
        name = f"{name}-f{fam.group(1)}-m{mod.group(1)}"
    return name


def machine_name() -> str:
    """A file-name slug for this machine: the GPU's name, else the CPU model and core count."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = cpu_label(f.read()) or name
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


def run_case(case: Case, device: str, min_time: float, compile_baseline: bool = False,
             copy_gbps: float | None = None) -> list[dict]:
    fns = {"baseline": case.baseline, **case.candidates}
    if compile_baseline and case.compile_baseline:
        fns[COMPILED] = torch.compile(case.baseline)  # compiled in measure()'s warm-up call, not timed
    t = measure(fns, device=device, min_time=min_time, min_rounds=case.min_rounds)
    stat = (lambda x: x.mean_s) if case.statistic == "mean" else (lambda x: x.median_s)  # noqa: E731
    base = stat(t["baseline"])
    best_peer = min(stat(timing) for name, timing in t.items() if is_peer(name))
    rows = []
    for name, timing in t.items():
        gbps = case.nbytes / stat(timing) / 1e9
        rows.append({
            "op": case.op, "backend": "torch-baseline" if name == "baseline" else name, "shape": case.shape,
            "dtype": case.dtype, "device": device, "time_ms": round(stat(timing) * 1e3, 4),
            "statistic": case.statistic, "GB_per_s": round(gbps, 2),
            "pct_of_copy": round(100 * gbps / copy_gbps, 1) if copy_gbps else "",
            "speedup": round(base / stat(timing), 3), "vs_best_peer": round(best_peer / stat(timing), 3),
            "peak_extra_MB": round(case.peak_mb[name], 1) if name in case.peak_mb else "",
            "baseline": case.baseline_name, "cpu_isa": cpu_isa() if device == "cpu" else "",
        })
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ["op", "backend", "shape", "dtype", "time_ms", "statistic", "GB_per_s", "speedup", "peak_extra_MB"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(f"{c:<{widths[c]}}" for c in cols)]
    lines += ["  ".join(f"{str(r[c]):<{widths[c]}}" for c in cols) for r in rows]
    return "\n".join(lines)


def markdown(rows: list[dict], title: str) -> str:
    """The table for docs/performance.md: candidates with their speed-up over the torch baseline of their case."""
    lines = [title, "", "| op | shape | dtype | backend | time (ms) | baseline (ms) | speed-up | vs best torch peer "
             "| GB/s | % of copy | extra peak MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {(r["op"], r["shape"], r["dtype"]): r for r in rows if r["backend"] == "torch-baseline"}
    for r in rows:
        if r["backend"] == "torch-baseline":
            continue
        b = base[(r["op"], r["shape"], r["dtype"])]
        mem = f"{r['peak_extra_MB']} (baseline {b['peak_extra_MB']})" if r["peak_extra_MB"] != "" else ""
        lines.append(f"| {r['op']} | {r['shape']} | {r['dtype']} | {r['backend']} | {r['time_ms']:.2f} | "
                     f"{b['time_ms']:.2f} | {r['speedup']:.2f}x | {r['vs_best_peer']:.2f}x | {r['GB_per_s']} | "
                     f"{r['pct_of_copy']} | {mem} |")
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
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile of each op's torch composition (compile time not counted)")
    p.add_argument("--name", default=None, help="results file stem (default: this machine's name)")
    args = p.parse_args(argv)
    min_time = args.min_time if args.min_time is not None else (0.05 if args.quick else 0.4)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        p.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    kept = keep_freed_memory()
    copy_gbps = copy_bandwidth(args.device, (32 << 20) if args.quick else (256 << 20))
    os.makedirs(args.out, exist_ok=True)
    name = args.name or machine_name() + (f"-{cpu_isa().lower()}" if args.device == "cpu" and cpu_isa() else "")
    stem = os.path.join(args.out, f"{name}{'-quick' if args.quick else ''}")
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"{torch.get_num_threads()} threads, CPU kernels {cpu_isa() or 'not loaded'}")
    title = (f"{machine_name()}, {where}, torch {torch.__version__}, copy {copy_gbps:.1f} GB/s"
             f"{', malloc keeps freed memory' if kept else ''}{', quick shapes' if args.quick else ''}")

    def write(rows, final):
        write_rows(stem + ".csv", rows, COLUMNS)
        with open(stem + ".md", "w") as f:
            f.write(markdown(rows, title + ("" if final else ", INCOMPLETE: stopped early")))

    # a time-limited run (make gpu-check) keeps what it measured: the files are rewritten after every case
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cases = [c for f in families for c in FAMILIES[f](args.device, args.quick)]
    rows = []
    done = False
    try:
        for i, case in enumerate(cases):
            progress(i, len(cases), f"{case.op} {case.shape} {case.dtype}")
            rows += run_case(case, args.device, min_time, args.compile, copy_gbps)
            write(rows, final=False)
        progress(len(cases), len(cases), "done")
        done = True
    finally:
        if rows:
            write(rows, final=done)
            chart(rows, stem + ".png", title)
    print(format_table(rows))
    print(f"wrote {stem}.csv, {stem}.md and {stem}.png")
    return 0
