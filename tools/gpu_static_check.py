"""GPU checks that need no GPU (make gpu-static-check; issue 25 item 5).

1. capture   Runs the Triton-backend tests (pytest -k triton) under TRITON_INTERPRET=1 with a hook on the
             interpreter's launch (InterpretedFunction.run) and records every distinct launch: kernel, arguments
             (tensor dtypes and 16-byte alignment, integers, constexprs) and launch options (num_warps,
             enable_fp_fusion, ...). Distinct = distinct Triton specialisation, as the newest triton's own binder
             computes it for a CUDA target. Nothing here lists kernels by hand: whatever the package launches
             while the tests run is what gets checked, and a @triton.jit kernel in stabkernels/triton that no
             test launches is reported.
2. triton    In a process WITHOUT TRITON_INTERPRET, under whichever triton is importable (PYTHONPATH selects the
             oldest supported one), rebuilds each captured launch's arguments, binds them with that triton's own
             binder and compiles ahead of time (triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)))
             for sm_80, sm_90 and sm_100; reads registers and spills from the ptxas -v log triton's own ptxas
             call writes, dynamic shared memory from the metadata, and counts fma / mma / wgmma / .tf32 in the
             PTX.
3. cuda      Compiles every csrc/cuda/*.cu with torch's nvcc flags (torch.utils.cpp_extension of the CUDA venv
             when there is one: COMMON_NVCC_FLAGS, the arch flags of TORCH_CUDA_ARCH_LIST, the C++ standard)
             plus ours (stabkernels/_toolkit.py NVCC_FLAGS) and -Xptxas -v, keeping the PTX.
4. report    One table (kernel, variants, arch, registers, spill bytes, shared memory, fma count) and the
             violations; exit status 1 when there is one.

`check` runs all four (capture and cuda side by side, then the two triton versions side by side).

Rules (module constants below, so that they can grow):
  * every compile succeeds;
  * no register spills, except the kernels in SPILL_ALLOWED (name -> (most bytes, reason));
  * Triton dynamic shared memory <= MAX_DYN_SMEM, CUDA static shared memory <= MAX_STATIC_SMEM;
  * no fma in the PTX of NO_FMA_KERNELS (Triton) / CUDA_NO_FMA_KERNELS (bit-exact stream kernels);
  * no TF32 or non-fp64 mma / wgmma in the PTX of IEEE_KERNELS (and of the no-FMA kernels);
  * CUDA kernels: 0 spill bytes, static shared memory within 48 KB.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --- rules ---------------------------------------------------------------------------------------------------
ARCHS = (80, 90, 100)

# Bit-exact kernels: the direction stream (Philox + float32 Box-Muller) must give the reference's bits, so their
# PTX may hold no fused multiply-add (launch them with enable_fp_fusion=False; issue 25 item 1).
NO_FMA_KERNELS = {
    "_shard_normals_kernel": "direction stream, bit-exact with the CPU reference",
    "_sq_sums_kernel": "direction stream, bit-exact with the CPU reference",
    "_write_kernel": "direction stream, bit-exact with the CPU reference",
    "_dots_kernel": "direction stream, bit-exact with the CPU reference",
}
# Kernels documented as IEEE float32 (no TF32, no tensor-core MMA); the no-FMA kernels are checked too.
IEEE_KERNELS = {
    "_tangent_spread_kernel": "tl.dot(..., input_precision='ieee'): 'IEEE fp32, no TF32' (triton/spread.py)",
    "_qk_max_logits_kernel": "tl.dot(..., input_precision='ieee'): 'IEEE fp32, no TF32' (triton/attention.py)",
}
# Register spills tolerated: kernel name -> (most spill bytes, stores + loads, in any variant, arch and triton
# version; why). Measured 2026-12 with triton 3.6.0 and 3.8.0 for sm_80/90/100; a kernel that spills more, or any
# other kernel that spills, fails the check.
SPILL_ALLOWED = {
    "_tangent_spread_kernel": (1024, "a BLOCK_M x BLOCK_V fp32/fp64 accumulator and two IEEE (FMA-loop, not "
                                     "tensor-core) dot products per tile at 255 registers: 8-784 bytes of spill "
                                     "(most with HAS_WD on sm_80); the tiles' loads dominate its traffic"),
    "_sgd_kernel": (32, "fp64 / bf16 momentum + nesterov + apply + write_u variant: 8-24 bytes of spill, a few "
                        "bytes of L1 traffic per element beside the 40+ bytes the step streams"),
    "_row_spread_kernel": (16, "bfloat16, BLOCK_C=128 on sm_80 under triton 3.8: 12 bytes of spill, small beside "
                               "the row's loads"),
    "_qk_max_logits_kernel": (48, "32 x 32 x 16 IEEE (FMA-loop) tiles, fp32/fp64, some stride specialisations: 8-40 "
                                  "bytes of spill in 26 of 468 variants (64 x 32 x 32 tiles spilled up to 776); a few "
                                  "bytes of L1 traffic beside the q and k tiles each key step loads"),
}
MAX_DYN_SMEM = 99 * 1024     # Triton dynamic shared memory (bytes) a block may use on every sm_80+ part we target
MAX_STATIC_SMEM = 48 * 1024  # CUDA static shared memory (bytes)
# CUDA kernels of the direction stream (csrc/cuda/directional.cu): no fma either (issue 25 item 1, __fmul_rn /
# __fadd_rn). Names are the demangled kernel names without namespace and template arguments.
CUDA_NO_FMA_KERNELS = {
    "sq_sums_kernel": "direction stream, bit-exact with the CPU reference",
    "write_kernel": "direction stream, bit-exact with the CPU reference",
    "dots_kernel": "direction stream, bit-exact with the CPU reference",
}
CUDA_SPILL_ALLOWED: dict[str, str] = {}

TRITON_PACKAGE = "stabkernels.triton"
DEFAULT_PYTEST_ARGS = ["tests", "-k", "triton and not cuda"]

FMA = re.compile(r"^\s*(?:@%?\w+\s+)?fma\.", re.M)  # an fma instruction of PTX (predicated or not)
_MMA = re.compile(r"^\s*(?:@%?\w+\s+)?(?:mma|wgmma)\.", re.M)
_TF32 = re.compile(r"\.tf32\b")
_MMA_INS = re.compile(r"^\s*(?:@%?\w+\s+)?((?:mma|wgmma)\.\S+)", re.M)
_MMA_TYPES = re.compile(r"\.(f16|bf16|tf32|f32|f64|e4m3|e5m2|e2m1|e3m2|e2m3|s8|u8|s4|u4|b1|s32)\b")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --- argument encoding (capture side and compile side share it) ----------------------------------------------

def _encode(v):
    import torch
    import triton.language as tl

    if isinstance(v, tl.constexpr):
        v = v.value
    if v is None or isinstance(v, (bool, str)):
        return {"t": "lit", "v": v}
    if isinstance(v, int):
        return {"t": "int", "v": v}
    if isinstance(v, float):
        return {"t": "float", "v": repr(v)}
    if isinstance(v, torch.Tensor):
        return {"t": "tensor", "dtype": str(v.dtype).replace("torch.", ""), "align16": v.data_ptr() % 16 == 0}
    if isinstance(v, tl.dtype):
        if isinstance(v, tl.pointer_type):
            return {"t": "ptrtype", "elt": _encode(v.element_ty)}
        return {"t": "tldtype", "name": v.name}
    if isinstance(v, (tuple, list)):
        return {"t": "tuple", "v": [_encode(x) for x in v]}
    fn = getattr(v, "fn", None)
    if fn is not None and hasattr(fn, "__qualname__"):
        return {"t": "jitfn", "module": fn.__module__, "name": fn.__qualname__}
    raise TypeError(f"cannot record a kernel argument of type {type(v).__name__}: teach tools/gpu_static_check.py")


def _decode(e, keep):
    import torch
    import triton.language as tl

    t = e["t"]
    if t in ("lit", "int"):
        return e["v"]
    if t == "float":
        return float(e["v"])
    if t == "tensor":
        dtype = getattr(torch, e["dtype"])
        base = torch.empty(64, dtype=dtype)  # CPU allocations are 64-byte aligned
        x = base if e["align16"] else base[1:]
        keep.append(base)
        return x
    if t == "tldtype":
        return tl.dtype(e["name"])
    if t == "ptrtype":
        return tl.pointer_type(_decode(e["elt"], keep))
    if t == "tuple":
        return tuple(_decode(x, keep) for x in e["v"])
    if t == "jitfn":
        return _resolve(e["module"], e["name"])
    raise TypeError(f"unknown encoded argument {e}")


def _resolve(module, name):
    """The JITFunction ``name`` of ``module`` (through autotune / heuristics wrappers)."""
    from triton.runtime.jit import JITFunction

    mod = importlib.import_module(module)
    for obj in list(vars(mod).values()):
        f = obj
        for _ in range(8):
            if isinstance(f, JITFunction) or f is None:
                break
            f = getattr(f, "fn", None)
        if isinstance(f, JITFunction) and f.fn.__qualname__ == name and f.fn.__module__ == module:
            return f
    raise LookupError(f"{module}.{name}: no @triton.jit function of that name at module level")


# --- 1. capture ------------------------------------------------------------------------------------------------

class Capture:
    """Records every Triton launch the tests make under the interpreter (kernel, arguments, constexprs, launch
    options), to be compiled ahead of time afterwards; install() hooks the interpreter, the kernels still run."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        self.backend = make_backend(GPUTarget("cuda", 90, 32))
        self.binders = {}
        self.launches = {}  # key -> record
        self.errors = []
        self.test = None

    def binder(self, interp):
        from triton.runtime.jit import JITFunction, create_function_from_signature

        b = self.binders.get(interp.fn)
        if b is None:
            jf = JITFunction(interp.fn, **interp.kwargs)
            b = self.binders[interp.fn] = create_function_from_signature(jf.signature, jf.params, self.backend)
        return b

    def record(self, interp, args, kwargs):
        fn = interp.fn
        name = f"{fn.__module__}:{fn.__qualname__}"
        try:
            bound, spec, options = self.binder(interp)(*args, **kwargs)
            key = (name, repr(spec), repr(sorted(options.items())))
            rec = self.launches.get(key)
            if rec is None:
                rec = self.launches[key] = {
                    "kernel": name, "args": {k: _encode(v) for k, v in bound.items()},
                    "options": {k: _encode(v) for k, v in options.items()}, "launches": 0, "first_test": self.test}
            rec["launches"] += 1
        except Exception as e:  # recorded, reported as a violation; the test itself goes on
            self.errors.append(f"{name}: could not record a launch ({type(e).__name__}: {e}) in {self.test}")

    def install(self):
        from triton.runtime.interpreter import InterpretedFunction

        orig = InterpretedFunction.run
        cap = self

        def run(self, *args, grid, warmup, **kwargs):
            cap.record(self, args, kwargs)
            return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run

    # pytest plugin hook: remember which test launched what
    def pytest_runtest_setup(self, item):
        self.test = item.nodeid


def _defined_jit_functions():
    """{module:qualname: source} of every @triton.jit function (also under autotune / heuristics) in the
    package's triton modules."""
    import inspect
    import pkgutil

    from triton.runtime.interpreter import InterpretedFunction

    pkg = importlib.import_module(TRITON_PACKAGE)
    out = {}
    for info in pkgutil.iter_modules(pkg.__path__, TRITON_PACKAGE + "."):
        mod = importlib.import_module(info.name)
        for obj in list(vars(mod).values()):
            for _ in range(8):
                if isinstance(obj, InterpretedFunction) or obj is None:
                    break
                obj = getattr(obj, "fn", None)
            if isinstance(obj, InterpretedFunction) and obj.fn.__module__ == mod.__name__:
                out[f"{obj.fn.__module__}:{obj.fn.__qualname__}"] = inspect.getsource(obj.fn)
    return out


def cmd_capture(a):
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import pytest
    import torch

    torch.set_num_threads(1)
    cap = Capture()
    cap.install()
    t0 = time.time()
    pytest_args = a.pytest_args or DEFAULT_PYTEST_ARGS
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-o", "addopts=", "--no-header", "-rN", *pytest_args],
                     plugins=[cap])
    secs = time.time() - t0
    jit = _defined_jit_functions()
    launched = {r["kernel"] for r in cap.launches.values()}
    # a jit function never launched is a device helper when another jit function's source calls it
    helpers = {k for k in jit if any(re.search(r"\b%s\s*\(" % re.escape(k.split(":")[1]), src)
                                     for other, src in jit.items() if other != k)}
    unlaunched = sorted(set(jit) - launched - helpers)
    out = {"pytest_args": pytest_args, "pytest_rc": int(rc), "seconds": round(secs, 1),
           "launches": sorted(cap.launches.values(), key=lambda r: r["kernel"]), "errors": cap.errors,
           "unlaunched_kernels": unlaunched, "jit_functions": sorted(jit)}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    kernels = sorted(launched)
    log(f"capture: {len(cap.launches)} distinct Triton launches of {len(kernels)} kernels "
        f"({sum(r['launches'] for r in cap.launches.values())} launches) in {secs:.0f} s, pytest exit {int(rc)}")
    if a.list:
        from collections import Counter

        for k, n in sorted(Counter(r["kernel"] for r in cap.launches.values()).items()):
            print(f"{n:5d}  {k}")
    return 0 if int(rc) in (0, 1) else int(rc)  # test failures are make test's business; no tests is not


# --- 2. triton AOT compile -------------------------------------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def _compile_one(job):
    """(record index, arch) -> result dict. Runs in a worker process."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    idx, rec, arch = job
    t0 = time.time()
    name = rec["kernel"]
    res = {"idx": idx, "kernel": name, "arch": arch}
    try:
        jf = _resolve(*name.split(":"))
        keep = []
        args = {k: _decode(v, keep) for k, v in rec["args"].items()}
        kwargs = {k: _decode(v, keep) for k, v in rec["options"].items()}
        # what JITFunction.run adds before binding
        kwargs["debug"] = kwargs.get("debug", jf.debug) or knobs.runtime.debug
        if hasattr(knobs.compilation, "instrumentation_mode"):
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(jf.signature, jf.params, backend)
        bound, spec, opts = binder(**args, **kwargs)
        options, signature, constexprs, attrs = jf._pack_args(backend, kwargs, bound, spec, opts)
        res["variant"] = repr((signature, sorted(constexprs.items(), key=repr), sorted(attrs.items(), key=repr),
                               sorted(options.__dict__.items(), key=repr)))
        res["fp_fusion"] = bool(options.enable_fp_fusion)
        src = triton.compiler.ASTSource(jf, signature, constexprs, attrs)
        knobs.nvidia.dump_ptxas_log = True
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            k = triton.compile(src, target=target, options=options.__dict__)
        ptxlog = buf.getvalue()
        ptx = k.asm["ptx"]
        m = _PTXAS_REGS.findall(ptxlog)
        sp = _PTXAS_SPILL.findall(ptxlog)
        res.update(ok=True, regs=max(map(int, m)) if m else None,
                   spills=max(int(s) + int(l) for s, l in sp) if sp else None,
                   spill_stores=max(int(s) for s, _ in sp) if sp else None,
                   smem=int(k.metadata.shared), fma=len(FMA.findall(ptx)), mma=len(_MMA.findall(ptx)),
                   mma_bad=non_f64_mma(ptx),
                   tf32=len(_TF32.findall(ptx)), num_warps=k.metadata.num_warps)
        if m == [] or sp == []:
            res["note"] = "no ptxas -v log captured"
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
        res.update(ok=False, error=msg[:2000])
    res["seconds"] = round(time.time() - t0, 3)
    return res


def cmd_triton(a):
    os.environ.pop("TRITON_INTERPRET", None)
    cache = tempfile.mkdtemp(prefix="gpu-static-triton-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache  # a fresh cache: every kernel really compiles (ptxas log)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import triton

    with open(a.launches) as f:
        cap = json.load(f)
    archs = [int(x) for x in a.archs.split(",")]
    jobs = [(i, rec, arch) for arch in archs for i, rec in enumerate(cap["launches"])]
    t0 = time.time()
    try:
        if a.jobs > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(a.jobs) as pool:
                results = pool.map(_compile_one, jobs, chunksize=1)
        else:
            results = [_compile_one(j) for j in jobs]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    secs = time.time() - t0
    out = {"triton": triton.__version__, "archs": archs, "seconds": round(secs, 1), "jobs": a.jobs,
           "results": results}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    nerr = sum(not r["ok"] for r in results)
    log(f"triton {triton.__version__}: {len(results)} compiles ({len(cap['launches'])} launches x {len(archs)} "
        f"archs) in {secs:.0f} s, {nerr} failed")
    return 0


# --- 3. CUDA kernels through ptxas -v ---------------------------------------------------------------------------

def _nvcc_flags(archs):
    """torch's nvcc flags for a .cu (as tests/test_build.py takes them) plus ours."""
    import inspect

    sys.path.insert(0, os.path.join(REPO, "stabkernels"))
    from _toolkit import NVCC_FLAGS, find_cuda_home  # noqa: E402

    sys.path.pop(0)
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("no CUDA toolkit found (set CUDA_HOME)")
    os.environ["CUDA_HOME"] = cuda_home
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a // 10}.{a % 10}" for a in archs)
    import torch
    from torch.utils import cpp_extension

    std = sorted(set(re.findall(r"c\+\+(\d\d)", inspect.getsource(cpp_extension.BuildExtension))))[-1]
    flags = (list(cpp_extension.COMMON_NVCC_FLAGS) + ["-Xcompiler", "-fPIC"] + list(NVCC_FLAGS)
             + cpp_extension._get_cuda_arch_flags(list(NVCC_FLAGS)) + [f"-std=c++{std}"])
    return flags, cuda_home, torch.__version__


def _demangle(names):
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short(demangled):
    """'void stabkernels::cuda::(anonymous namespace)::write_kernel<float>(...)' -> ('write_kernel', '<float>')"""
    s = demangled.replace("(anonymous namespace)", "anon").split("(")[0]
    s = s.replace("void ", "", 1)
    m = re.match(r"(.*?)(<.*>)?$", s)
    base, targs = m.group(1), m.group(2) or ""
    return base.split("::")[-1], targs


def _ptx_entries(ptx):
    """{mangled entry name: body} of a PTX file."""
    out = {}
    for m in re.finditer(r"\.entry\s+(\S+?)\s*\(", ptx):
        start = m.end()
        nxt = ptx.find(".entry", start)
        out[m.group(1)] = ptx[start:nxt if nxt >= 0 else len(ptx)]
    return out


def _cuda_one(job):
    path, flags, cuda_home, include = job
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu-static-cu-") as tmp:
        cmd = ["nvcc", "-c", *flags, "-Xptxas", "-v", "--keep", "--keep-dir", tmp, "-I", os.path.dirname(path),
               *sum((["-I", d] for d in include), []), path, "-o", os.path.join(tmp, "k.o")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        res = {"file": os.path.relpath(path, REPO), "ok": r.returncode == 0, "seconds": round(time.time() - t0, 1)}
        if r.returncode:
            res["error"] = (r.stderr or r.stdout)[-3000:]
            return res
        fma = {}
        for p in os.listdir(tmp):
            if p.endswith(".ptx"):
                m = re.search(r"compute_(\d+)", p)
                ptx = open(os.path.join(tmp, p)).read()
                arch = int(m.group(1)) if m else int(re.search(r"\.target\s+sm_(\d+)", ptx).group(1))
                for name, body in _ptx_entries(ptx).items():
                    fma[(name, arch)] = len(FMA.findall(body))
    kernels = []
    cur = None
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)", line)
        if m:
            cur = {"mangled": m.group(1), "arch": int(m.group(2)), "regs": None, "spills": 0, "smem": 0,
                   "stack": 0}
            kernels.append(cur)
            continue
        if cur is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            cur["spills"] = int(m.group(1)) + int(m.group(2))
        m = _PTXAS_STACK.search(line)
        if m:
            cur["stack"] = int(m.group(1))
        m = _PTXAS_REGS.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(sm.group(1)) if sm else 0
    names = _demangle(sorted({k["mangled"] for k in kernels}))
    for k in kernels:
        k["name"], k["targs"] = _short(names[k["mangled"]])
        k["fma"] = fma.get((k["mangled"], k["arch"]))
    res["kernels"] = kernels
    return res


def cmd_cuda(a):
    import glob

    archs = [int(x) for x in a.archs.split(",")]
    t0 = time.time()
    flags, cuda_home, torch_version = _nvcc_flags(archs)
    include = [os.path.join(cuda_home, "include")]
    files = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cu")))
    jobs = [(p, flags, cuda_home, include) for p in files]
    if a.jobs > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(a.jobs) as ex:
            results = list(ex.map(_cuda_one, jobs))
    else:
        results = [_cuda_one(j) for j in jobs]
    secs = time.time() - t0
    out = {"torch": torch_version, "nvcc_flags": flags, "archs": archs, "seconds": round(secs, 1),
           "files": results}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    log(f"cuda: {len(files)} .cu files with torch {torch_version}'s nvcc flags for sm_{'/'.join(map(str, archs))} "
        f"in {secs:.0f} s, {sum(not r['ok'] for r in results)} failed")
    return 0


# --- 4. report --------------------------------------------------------------------------------------------------

def _kname(full):
    return full.split(":")[1]


def _fmt(lo, hi):
    if lo is None:
        return "?"
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _rng(vals):
    vals = [v for v in vals if v is not None]
    return (min(vals), max(vals)) if vals else (None, None)


class _Violations:
    """Violations grouped by (what, kernel, rule): one line each, with the range of values, the variants, archs
    and triton versions concerned."""

    def __init__(self):
        self.plain = []
        self.groups = {}

    def add(self, what, kernel, rule, value, variant, arch, version=None, hint=""):
        g = self.groups.setdefault((what, kernel, rule), {"vals": [], "variants": set(), "archs": set(),
                                                            "versions": set(), "hint": hint})
        g["vals"].append(value)
        g["variants"].add(variant)
        g["archs"].add(arch)
        if version:
            g["versions"].add(version)

    def lines(self):
        out = list(self.plain)
        for (what, kernel, rule), g in self.groups.items():
            vals = [v for v in g["vals"] if isinstance(v, (int, float))]
            val = f" {_fmt(*_rng(vals))}" if vals else ""
            where = f"sm_{'/sm_'.join(map(str, sorted(g['archs'])))}"
            if g["versions"]:
                where += f", triton {', '.join(sorted(g['versions']))}"
            out.append(f"{what} {kernel}: {rule}{val} in {len(g['variants'])} variant(s) ({where})"
                       + (f"; {g['hint']}" if g["hint"] else ""))
        return out


def non_f64_mma(ptx):
    """How many mma / wgmma instructions are not all-float64. DMMA (mma ... .f64) is IEEE binary64 arithmetic
    (correctly rounded fused multiply-adds, like the FMA loop of an fp32 'ieee' dot); what a kernel documented
    as IEEE must not use is TF32 or 16-/8-bit tensor-core MMA."""
    n = 0
    for ins in _MMA_INS.findall(ptx):
        types = _MMA_TYPES.findall(ins)
        if not types or any(t != "f64" for t in types):
            n += 1
    return n


def cmd_report(a):
    V = _Violations()
    lines = []
    d = a.dir
    cap_path = os.path.join(d, "launches.json")
    cap = json.load(open(cap_path)) if os.path.exists(cap_path) else None
    if cap is None:
        V.plain.append("no capture (launches.json): the Triton launches were not recorded")
    else:
        for e in cap["errors"]:
            V.plain.append(f"capture: {e}")
        for k in cap["unlaunched_kernels"]:
            V.plain.append(f"{k}: a @triton.jit kernel that no test in `pytest {' '.join(cap['pytest_args'])}` "
                           "launches, so it is not checked (add a Triton-backend test)")
        if not cap["launches"]:
            V.plain.append("capture recorded no Triton launch at all")
        else:
            names = {_kname(r["kernel"]) for r in cap["launches"]}
            for table, what in ((NO_FMA_KERNELS, "NO_FMA_KERNELS"), (IEEE_KERNELS, "IEEE_KERNELS"),
                                (SPILL_ALLOWED, "SPILL_ALLOWED")):
                for k in sorted(set(table) - names):
                    V.plain.append(f"{what} names {k}, which no captured launch has (renamed? update the list)")
    tri_files = sorted(p for p in os.listdir(d) if p.startswith("triton-") and p.endswith(".json"))
    if a.expect_triton and len(tri_files) < a.expect_triton:
        V.plain.append(f"expected results of {a.expect_triton} triton versions, found {len(tri_files)}")
    summary = []
    for p in tri_files:
        tr = json.load(open(os.path.join(d, p)))
        ver = tr["triton"]
        by = {}
        for r in tr["results"]:
            by.setdefault((_kname(r["kernel"]), r["arch"]), []).append(r)
        nvariants = len({(r["kernel"], r.get("variant")) for r in tr["results"] if r["ok"] and
                         r["arch"] == tr["archs"][-1]})
        cpu = sum(r.get("seconds", 0) for r in tr["results"])
        summary.append(f"triton {ver}: {len({r['kernel'] for r in tr['results']})} kernels, {nvariants} variants x "
                       f"sm_{'/sm_'.join(map(str, tr['archs']))} = {len(tr['results'])} compiles, "
                       f"{tr['seconds']} s ({cpu:.0f} s of compile in {tr.get('jobs', 1)} process(es))")
        lines.append(f"\nTriton {ver}: min-max over the variants of registers, spill bytes, dynamic shared memory "
                     "bytes, fma and mma in the PTX, fp fusion")
        lines.append(f"{'kernel':28s} {'var':>4s} {'arch':>6s} {'regs':>8s} {'spills':>7s} {'smem':>12s} "
                     f"{'fma':>9s} {'mma':>4s} {'fusion':>6s}")
        for (name, arch), rs in sorted(by.items()):
            ok = [r for r in rs if r["ok"]]
            for r in rs:
                if not r["ok"]:
                    first = cap["launches"][r["idx"]]["first_test"] if cap else "?"
                    V.add("Triton", name, f"compile error ({r['error'].splitlines()[0][:300]}; first launched by "
                          f"{first})", None, r["idx"], arch, ver)
            nvar = len({r.get("variant") for r in ok})
            fus = sorted({r["fp_fusion"] for r in ok})
            lines.append(f"{name:28s} {nvar:4d} {'sm_' + str(arch):>6s} {_fmt(*_rng(r['regs'] for r in ok)):>8s} "
                         f"{_fmt(*_rng(r['spills'] for r in ok)):>7s} {_fmt(*_rng(r['smem'] for r in ok)):>12s} "
                         f"{_fmt(*_rng(r['fma'] for r in ok)):>9s} {max([r['mma'] for r in ok] or [0]):4d} "
                         f"{'/'.join('on' if f else 'off' for f in fus):>6s}")
            for r in ok:
                add = lambda rule, value, hint="": V.add("Triton", name, rule, value, r["idx"], arch, ver, hint)  # noqa
                if r.get("note"):
                    add(r["note"], None)
                if r["spills"] and name not in SPILL_ALLOWED:
                    add("register spill bytes (stores+loads)", r["spills"], "not in SPILL_ALLOWED")
                elif r["spills"] and r["spills"] > SPILL_ALLOWED[name][0]:
                    add("register spill bytes (stores+loads)", r["spills"],
                        f"more than the {SPILL_ALLOWED[name][0]} bytes SPILL_ALLOWED grants it")
                if r["smem"] > MAX_DYN_SMEM:
                    add(f"dynamic shared memory bytes > {MAX_DYN_SMEM}", r["smem"])
                if name in NO_FMA_KERNELS and r["fma"]:
                    add("fma in the PTX of a bit-exact kernel", r["fma"],
                        f"{NO_FMA_KERNELS[name]}: launched with enable_fp_fusion="
                        f"{'/'.join(str(f) for f in fus)}, launch it with enable_fp_fusion=False")
                if name in IEEE_KERNELS or name in NO_FMA_KERNELS:
                    bad = r.get("mma_bad", r["mma"]) + r["tf32"]
                    if bad:
                        add("TF32 / tensor-core MMA instructions in the PTX of a kernel documented as IEEE", bad,
                            IEEE_KERNELS.get(name, NO_FMA_KERNELS.get(name)))
    cu_path = os.path.join(d, "cuda.json")
    if os.path.exists(cu_path):
        cu = json.load(open(cu_path))
        ks = [k for f in cu["files"] for k in f.get("kernels", [])]
        summary.append(f"CUDA: {len(cu['files'])} .cu files, {len({k['name'] for k in ks})} kernels, "
                       f"{len({(k['name'], k['targs']) for k in ks})} instantiations, sm_"
                       f"{'/sm_'.join(map(str, cu['archs']))}, torch {cu['torch']}'s nvcc flags, {cu['seconds']} s")
        lines.append(f"\nCUDA (torch {cu['torch']}'s nvcc flags): min-max over the template instantiations of "
                     "registers, spill bytes, static shared memory bytes, fma in the PTX")
        lines.append(f"{'kernel':28s} {'inst':>4s} {'arch':>6s} {'regs':>8s} {'spills':>7s} {'smem':>12s} "
                     f"{'fma':>9s}")
        for f in cu["files"]:
            if not f["ok"]:
                V.plain.append(f"CUDA {f['file']}: compile error:\n{f['error']}")
        by = {}
        for k in ks:
            by.setdefault((k["name"], k["arch"]), []).append(k)
        for (name, arch), rs in sorted(by.items()):
            lines.append(f"{name:28s} {len(rs):4d} {'sm_' + str(arch):>6s} {_fmt(*_rng(r['regs'] for r in rs)):>8s} "
                         f"{_fmt(*_rng(r['spills'] for r in rs)):>7s} {_fmt(*_rng(r['smem'] for r in rs)):>12s} "
                         f"{_fmt(*_rng(r['fma'] for r in rs)):>9s}")
            for r in rs:
                add = lambda rule, value, hint="": V.add("CUDA", name, rule, value, r["targs"], arch, None, hint)  # noqa
                if r["spills"] and name not in CUDA_SPILL_ALLOWED:
                    add("register spill bytes (stores+loads)", r["spills"])
                if r["smem"] > MAX_STATIC_SMEM:
                    add(f"static shared memory bytes > {MAX_STATIC_SMEM}", r["smem"])
                if name in CUDA_NO_FMA_KERNELS and r["fma"]:
                    add("fma in the PTX of a bit-exact kernel", r["fma"],
                        f"{CUDA_NO_FMA_KERNELS[name]}: use __fmul_rn / __fadd_rn")
                if r["fma"] is None:
                    add("no PTX found for the fma count", None)
        if ks:
            for table, what in ((CUDA_NO_FMA_KERNELS, "CUDA_NO_FMA_KERNELS"), (CUDA_SPILL_ALLOWED, "CUDA_SPILL_ALLOWED")):
                for k in sorted(set(table) - {k["name"] for k in ks}):
                    V.plain.append(f"{what} names {k}, which no csrc/cuda kernel has (renamed? update the list)")
    elif a.expect_cuda:
        V.plain.append("no CUDA results (cuda.json)")
    if cap:
        summary.insert(0, f"capture: {len(cap['launches'])} distinct launches of "
                          f"{len({r['kernel'] for r in cap['launches']})} Triton kernels from `pytest "
                          f"{' '.join(cap['pytest_args'])}` (exit {cap['pytest_rc']}) in {cap['seconds']} s")
    print("gpu-static-check: " + "\n                  ".join(summary))
    print("\n".join(lines))
    vl = V.lines()
    if vl:
        print(f"\ngpu-static-check: FAILED, {len(vl)} violation(s):")
        for v in vl:
            print("  - " + v)
        return 1
    print("\ngpu-static-check: passed")
    return 0


# --- check: everything ------------------------------------------------------------------------------------------

def cmd_check(a):
    os.makedirs(a.out, exist_ok=True)
    for p in os.listdir(a.out):
        if p.endswith(".json"):
            os.remove(os.path.join(a.out, p))
    me = os.path.abspath(__file__)
    t0 = time.time()
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    procs = []
    cuda_py = a.cuda_python if a.cuda_python and os.path.exists(a.cuda_python) else sys.executable
    if not a.no_cuda:
        procs.append(subprocess.Popen([cuda_py, me, "cuda", "--archs", a.archs, "--out",
                                       os.path.join(a.out, "cuda.json"), "--jobs", "1"], env=env))
    cap = subprocess.run([sys.executable, me, "capture", "--out", os.path.join(a.out, "launches.json"), "--",
                          *(a.pytest_args or DEFAULT_PYTEST_ARGS)], env=env, cwd=REPO,
                         stdout=subprocess.DEVNULL if not a.verbose else None)
    if cap.returncode:
        log(f"gpu-static-check: the capture run failed (exit {cap.returncode})")
    else:
        pythons = [(sys.executable, None, a.archs)]
        for p in a.triton_path or []:
            pythons.append((sys.executable, p, a.old_archs or a.archs))
        # one worker per triton version when both run side by side; the CUDA compile already holds a core
        per = max(1, a.jobs // len(pythons))
        for i, (py, path, archs) in enumerate(pythons):
            e = dict(env)
            if path:
                e["PYTHONPATH"] = os.path.abspath(path) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
            procs.append(subprocess.Popen([py, me, "triton", "--launches", os.path.join(a.out, "launches.json"),
                                           "--archs", archs, "--jobs", str(per),
                                           "--out", os.path.join(a.out, f"triton-{i}.json")], env=e, cwd=REPO))
    rcs = [p.wait() for p in procs]
    log(f"gpu-static-check: compiled in {time.time() - t0:.0f} s")
    if any(rcs):
        log(f"gpu-static-check: a compile stage crashed (exit codes {rcs})")
    ra = argparse.Namespace(dir=a.out, expect_triton=1 + len(a.triton_path or []), expect_cuda=not a.no_cuda)
    rc = cmd_report(ra)
    print(f"gpu-static-check: {time.time() - t0:.0f} s in all; results in {a.out}")
    return rc or int(bool(cap.returncode)) or int(any(rcs))


def main(argv=None):
    # the package of this tree, not whatever an editable install elsewhere points to
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture", help="record the Triton launches of a pytest run (under TRITON_INTERPRET=1)")
    c.add_argument("--out", required=True)
    c.add_argument("--list", action="store_true", help="print the distinct launches per kernel")
    c.add_argument("pytest_args", nargs="*")
    t = sub.add_parser("triton", help="AOT-compile the captured launches under the importable triton")
    t.add_argument("--launches", required=True)
    t.add_argument("--archs", default=",".join(map(str, ARCHS)))
    t.add_argument("--jobs", type=int, default=1)
    t.add_argument("--out", required=True)
    u = sub.add_parser("cuda", help="ptxas -v of every csrc/cuda/*.cu with torch's nvcc flags")
    u.add_argument("--archs", default=",".join(map(str, ARCHS)))
    u.add_argument("--jobs", type=int, default=1)
    u.add_argument("--out", required=True)
    r = sub.add_parser("report", help="table and violations of a results directory")
    r.add_argument("dir")
    r.add_argument("--expect-triton", type=int, default=0)
    r.add_argument("--expect-cuda", action="store_true")
    k = sub.add_parser("check", help="capture, compile (every triton given), cuda, report")
    k.add_argument("--out", default=os.path.join(REPO, "build", "gpu-static"))
    k.add_argument("--archs", default=",".join(map(str, ARCHS)))
    k.add_argument("--old-archs", default=None, help="archs for the --triton-path versions (default: --archs)")
    k.add_argument("--triton-path", action="append", help="a directory holding another triton (pip --target)")
    k.add_argument("--cuda-python", default=None, help="python of a CUDA torch, for torch's nvcc flags")
    k.add_argument("--no-cuda", action="store_true")
    k.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    k.add_argument("--verbose", action="store_true")
    k.add_argument("pytest_args", nargs="*")
    a = p.parse_args(argv)
    return {"capture": cmd_capture, "triton": cmd_triton, "cuda": cmd_cuda, "report": cmd_report,
            "check": cmd_check}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
