"""Host-side cost of one fused step on the GPU (Triton) path at the parameter shapes of a 7B LLaMA-style model
(291 tensors, 6.74B elements), with the kernel launches left out: the tensors are ``meta`` tensors (shapes, no
27 GB allocation) and every Triton launch is replaced by a no-op, so what is timed is the Python host work of
the wrappers (launch tables, keys, scatters) per call.

Rows: ``build`` (the first call: the launch plan is built and cached), ``step`` (a later call with the same
tensors: the cached plan), and with ``--before REV`` the same calls through the Triton host code of commit REV
(tables rebuilt from Python lists on every call, e.g. d63a91c, the code before the launch plans).

    python bench/host_cost_7b.py [--before d63a91c] [--out bench/results]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton.runtime.jit as triton_jit  # noqa: E402

import stabkernels  # noqa: E402,F401
from stabkernels import _launch_plan, directional  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def llama7b_shapes(vocab=32000, d=4096, ffn=11008, layers=32):
    shapes = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d, d)] * 4 + [(ffn, d), (ffn, d), (d, ffn), (d,), (d,)]
    return shapes + [(d,), (vocab, d)]


@contextlib.contextmanager
def launches_stubbed():
    """Every ``kernel[grid](...)`` does nothing: only the host code around the launches runs."""
    real = triton_jit.KernelInterface.__getitem__
    triton_jit.KernelInterface.__getitem__ = lambda self, grid: (lambda *a, **k: None)
    try:
        yield
    finally:
        triton_jit.KernelInterface.__getitem__ = real


def old_triton_package(rev: str):
    """The Triton host modules of commit ``rev`` as a package of their own (their relative imports of the
    library pointed at today's stabkernels, which they only use for dtype helpers and stream constants)."""
    tmp = Path(tempfile.mkdtemp()) / "stabkernels_triton_old"
    tmp.mkdir()
    for name in ("__init__", "_common", "update", "spectral", "directional"):
        src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:stabkernels/triton/{name}.py"],
                             check=True, capture_output=True, text=True).stdout
        (tmp / f"{name}.py").write_text(src.replace("from .. import", "from stabkernels import")
                                        .replace("from ..", "from stabkernels."))
    sys.path.insert(0, str(tmp.parent))
    return {m: importlib.import_module(f"stabkernels_triton_old.{m}") for m in ("update", "spectral", "directional")}


def new_triton_package():
    return {m: importlib.import_module(f"stabkernels.triton.{m}") for m in ("update", "spectral", "directional")}


def cases(mods, params, new: bool):
    """name -> a call of one op's Triton host code over the 7B parameters (the step's arguments as the public
    wrappers pass them)."""
    f64 = lambda v: torch.full((), v, dtype=torch.float64, device="meta")  # noqa: E731
    grads = [torch.empty_like(p) for p in params]
    m = [torch.empty_like(p) for p in params]
    v = [torch.empty_like(p) for p in params]
    U, S, D = mods["update"], mods["spectral"], mods["directional"]
    mats = [p for p in params if p.dim() == 2]
    us = [torch.empty(w.shape[0], device="meta") for w in mats]
    vs = [torch.empty(w.shape[1], device="meta") for w in mats]
    out = [torch.empty_like(p) for p in params]
    T = len(params)
    if new:
        adam = lambda: U.adam_step_(params, grads, m, v, [], [], f64(1.0), f64(1e-3), f64(10.0), 0.9, 0.999, 1e-8,  # noqa: E731
                                    0.1, True, False, False, True, False, None, False)
        sgd = lambda: U.sgd_step_(params, grads, m, [], f64(1.0), f64(1e-3), 0.9, 0.0, 0.0, False, False, False,  # noqa: E731
                                  True, None)

        seed_hash = directional.signed64(directional.splitmix64(1))

        def sadam_probe():  # the keys as directional.device_key_table makes them on a GPU (the Triton kernel)
            D.perturb(params, D.key_table(seed_hash, 0, 1, T, "meta")[0], 0.01, out)
            D.directional_dots(grads, D.key_table(seed_hash, 0, 8, T, "meta"))
    else:
        adam = lambda: U.adam_step_(params, grads, m, v, [], [], f64(1.0), 1e-3, 0.9, 0.999, 1e-8, 0.1, 10, True,  # noqa: E731
                                    False, False, True)
        sgd = lambda: U.sgd_step_(params, grads, m, [], f64(1.0), 1e-3, 0.9, 0.0, 0.0, False, False, False,  # noqa: E731
                                  True)

        def sadam_probe():
            D.perturb(params, directional.key_table(1, [0], T)[0], 0.01, out)
            D.directional_dots(grads, directional.key_table(1, range(8), T))
    return {"adam_step_": adam, "sgd_step_": sgd, "sq_norms": lambda: S.sq_norms(grads),
            "perturb + directional_dots (K=8)": sadam_probe,
            "power_iteration_": lambda: S.power_iteration_(mats, us, vs, 1, 1e-12)}


class _CountOps(__import__("torch").utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops a call dispatches (small elementwise ops and allocations on the 0-d/per-tensor
    scalars: on meta tensors each costs tens to hundreds of microseconds of Python here, on CUDA a few)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def torch_ops(fn) -> int:
    with _CountOps() as mode:
        fn()
    return mode.n


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", help="also time the Triton host code of this commit (e.g. d63a91c)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    params = [torch.empty(s, dtype=torch.bfloat16, device="meta") for s in llama7b_shapes()]
    print(f"{len(params)} tensors, {sum(p.numel() for p in params) / 1e9:.2f}B elements (meta, bf16), "
          f"launches stubbed")
    rows = []
    with launches_stubbed():
        _launch_plan.clear()
        for name, fn in cases(new_triton_package(), params, new=True).items():
            t = time.perf_counter()
            fn()
            build = (time.perf_counter() - t) * 1e3
            rows.append((name, "cached plan", build, timed(fn, args.reps), torch_ops(fn)))
        if args.before:
            for name, fn in cases(old_triton_package(args.before), params, new=False).items():
                rows.append((name, f"per-call tables ({args.before})", None, timed(fn, max(2, args.reps // 2)),
                             None))
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [f"Host time of one fused step's Triton wrapper at LLaMA-7B shapes ({len(params)} tensors, "
             f"{sum(p.numel() for p in params) / 1e9:.2f}B elements), launches stubbed; {cpu}, torch "
             f"{torch.__version__}, one thread, median of {args.reps}.", "",
             "| op | host code | first call (ms) | per step (ms) | torch ops per step |", "|---|---|---|---|---|"]
    for name, kind, build, step, ops in rows:
        lines.append(f"| {name} | {kind} | {'' if build is None else f'{build:.1f}'} | {step:.2f} | "
                     f"{'' if ops is None else ops} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host-cost-7b.md").write_text(text + "\n")
    return rows


if __name__ == "__main__":
    main()
