"""``stabkernels.info()``: versions, the compiled extension's state and the backend table."""
from __future__ import annotations

import platform
import sys

import torch

from . import _ext, backend


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
        "cpu_threads": torch.get_num_threads(),
        "backends": backend.status(),
    }


def format_info(d: dict) -> str:
    lines = [
        f"stabkernels {d['stabkernels']}  python {d['python']}  torch {d['torch']}"
        f" (CUDA {d['torch_cuda'] or 'none: CPU build'})",
        f"GPU: {d['gpu'] or 'none visible'}",
        f"triton: {d['triton'] or 'unavailable: ' + d['triton_problem']}"
        + ("  [TRITON_INTERPRET=1: kernels run on CPU tensors]" if d["triton_interpret"] else ""),
    ]
    if d["ext_loaded"]:
        b = d["ext_build"]
        lines.append(
            f"_C: loaded (built for torch {b.get('torch')}, CPU {b.get('cpu_capability')}, "
            f"CUDA kernels: {'yes, CUDA ' + str(b.get('cuda')) if b.get('with_cuda') else 'no'})"
        )
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
