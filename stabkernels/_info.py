"""``stabkernels.info()``: versions, the compiled extension's state and the backend table."""
from __future__ import annotations

import platform
import sys

import torch

from . import _ext, backend

# Tested ranges: torch 2.11 (the borrowed GPU machine) to 2.14 (the CUDA build in CI); triton 3.6 to 3.9.
# pyproject.toml states the same (tests/test_ext.py checks).
SUPPORTED = {"torch": ((2, 11), (2, 14)), "triton": ((3, 6), (3, 9))}


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def support_note(package: str, version: str | None) -> str:
    """'' when ``version`` of ``package`` is in the supported range, else a short warning."""
    if not version:
        return ""
    lo, hi = SUPPORTED[package]
    try:
        ok = lo <= _minor(version) <= hi
    except ValueError:
        return f"  [cannot parse {package} version {version!r}]"
    return "" if ok else f"  [outside the supported {package} {lo[0]}.{lo[1]}-{hi[0]}.{hi[1]}]"


def collect() -> dict:
    """Everything ``info`` reports, as a dict."""
    triton_ok, triton_msg = backend.triton_status()
    return {
        "stabkernels": sys.modules["stabkernels"].__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": triton_msg if triton_ok else None,
        "triton_problem": None if triton_ok else triton_msg,
        "triton_interpret": backend.triton_interpreted(),
        "ext_loaded": _ext.loaded,
        "ext_problem": _ext.load_error,
        "ext_build": dict(_ext.build_info),
        "cpu_isa": _ext.cpu_isa,
        "cpu_isa_best": _ext.cpu_isa_best,
        "cpu_threads": torch.get_num_threads(),
        "supported": {k: [f"{a}.{b}" for a, b in v] for k, v in SUPPORTED.items()},
        "backends": backend.status(),
    }


def format_info(d: dict) -> str:
    (t_lo, t_hi), (tr_lo, tr_hi) = SUPPORTED["torch"], SUPPORTED["triton"]
    lines = [
        f"stabkernels {d['stabkernels']}  python {d['python']}  torch {d['torch']}"
        f" (CUDA {d['torch_cuda'] or 'none: CPU build'}){support_note('torch', d['torch'])}",
        f"supported: torch {t_lo[0]}.{t_lo[1]}-{t_hi[0]}.{t_hi[1]}, triton {tr_lo[0]}.{tr_lo[1]}-{tr_hi[0]}.{tr_hi[1]}",
        f"GPU: {d['gpu'] or 'none visible'}",
        f"triton: {d['triton'] or 'unavailable: ' + d['triton_problem']}{support_note('triton', d['triton'])}"
        + ("  [TRITON_INTERPRET=1: kernels run on CPU tensors]" if d["triton_interpret"] else ""),
    ]
    if d["ext_loaded"]:
        b = d["ext_build"]
        lines.append(
            f"_C: loaded (built for torch {b.get('torch')}, CPU ISA levels {'/'.join(b.get('cpu_isa_levels', []))}, "
            f"CUDA kernels: {'yes, CUDA ' + str(b.get('cuda')) if b.get('with_cuda') else 'no'})"
        )
        forced = f" (forced by {_ext.ISA_ENV})" if d["cpu_isa"] != d["cpu_isa_best"] else ""
        lines.append(f"CPU ISA level in use: {d['cpu_isa']}{forced}; best this CPU supports: {d['cpu_isa_best']}")
    else:
        lines.append(f"_C: not loaded: {d['ext_problem']}")
    lines.append(f"CPU threads: {d['cpu_threads']}")
    lines.append("")
    names = backend.BACKENDS
    rows = [(op, [d["backends"][op][b] for b in names]) for op in d["backends"]]
    w_op = max([len("op")] + [len(op) for op, _ in rows])
    lines.append(f"{'op':<{w_op}}  " + "  ".join(f"{b:<7}" for b in names))
    notes = []
    for op, cells in rows:
        shown = []
        for cell in cells:
            if cell == "yes":
                shown.append(f"{'yes':<7}")
            else:
                reason = cell[len("no: "):]
                if reason not in notes:
                    notes.append(reason)
                shown.append(f"{'no[' + str(notes.index(reason) + 1) + ']':<7}")
        lines.append(f"{op:<{w_op}}  " + "  ".join(shown))
    for i, reason in enumerate(notes, 1):
        lines.append(f"  [{i}] {reason}")
    return "\n".join(lines)


def info(print_: bool = True) -> dict:
    """Prints (unless ``print_=False``) and returns the versions, whether ``_C`` loaded (and why not), and
    which backends serve each op on this machine."""
    d = collect()
    if print_:
        print(format_info(d))
    return d
