"""tools/gpu_static_check.py (make gpu-static-check): the launch capture honours launch options, the AOT compile
sees what the launch asked for (enable_fp_fusion=False leaves no fma in the PTX), and the report's rules."""
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import gpu_static_check as gsc  # noqa: E402

sys.path.pop(0)

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402


@triton.jit
def _axpy_kernel(x, y, out, a, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(out + i, a * tl.load(x + i, mask=m) + tl.load(y + i, mask=m), mask=m)


needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="the capture hooks the Triton interpreter (CPU runs)")


@needs_interpreter
def test_capture_and_compile_honour_enable_fp_fusion(tmp_path, monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", InterpretedFunction.run)  # undone after the test
    cap = gsc.Capture()
    cap.install()
    x, y = torch.randn(100), torch.randn(100)
    for fusion in (True, False, False):
        out = torch.empty(100)
        _axpy_kernel[(4,)](x, y, out, 2.0, 100, BLOCK=32, enable_fp_fusion=fusion)
        torch.testing.assert_close(out, 2.0 * x + y)  # the hook still runs the kernel
    assert not cap.errors
    recs = list(cap.launches.values())
    assert len(recs) == 2 and sorted(r["launches"] for r in recs) == [1, 2]
    assert all(r["kernel"] == f"{__name__}:_axpy_kernel" for r in recs)
    with open(tmp_path / "launches.json", "w") as f:
        json.dump({"launches": recs}, f)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "gpu_static_check.py"), "triton", "--launches",
                        str(tmp_path / "launches.json"), "--archs", "90", "--out", str(tmp_path / "t.json")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.load(open(tmp_path / "t.json"))["results"]
    assert all(x["ok"] for x in res), res
    fma = {x["fp_fusion"]: x["fma"] for x in res}
    assert fma[True] > 0 and fma[False] == 0
    assert all(x["regs"] and x["spills"] == 0 for x in res)


def _write_results(d, name, **kw):
    base = dict(ok=True, regs=32, spills=0, smem=0, fma=0, mma=0, mma_bad=0, tf32=0, fp_fusion=True, variant="v",
                idx=0, arch=90, seconds=0.1)
    base.update(kw)
    kernel = f"stabkernels.triton.x:{name}"
    with open(os.path.join(d, "launches.json"), "w") as f:
        json.dump({"pytest_args": ["tests"], "pytest_rc": 0, "seconds": 1, "errors": [], "unlaunched_kernels": [],
                   "launches": [{"kernel": kernel, "first_test": "t"}]}, f)
    with open(os.path.join(d, "triton-0.json"), "w") as f:
        json.dump({"triton": "3.x", "archs": [90], "seconds": 1, "results": [dict(base, kernel=kernel)]}, f)


@pytest.mark.parametrize("name, fields, expect", [
    ("_k", {}, None),
    ("_k", {"spills": 8}, "register spill"),
    ("_tangent_spread_kernel", {"spills": 8}, None),
    ("_tangent_spread_kernel", {"spills": 4096}, "more than"),
    ("_k", {"smem": 100 * 1024}, "dynamic shared memory"),
    ("_write_kernel", {"fma": 3}, "fma in the PTX of a bit-exact kernel"),
    ("_tangent_spread_kernel", {"mma": 16, "mma_bad": 0}, None),  # fp64 DMMA is IEEE
    ("_tangent_spread_kernel", {"mma": 16, "mma_bad": 16, "tf32": 16}, "TF32"),
    ("_k", {"ok": False, "error": "CompilationError: boom"}, "compile error"),
])
def test_report_rules(tmp_path, monkeypatch, capsys, name, fields, expect):
    # the report also flags list entries no launch has; keep the lists to the kernel under test
    for table in ("NO_FMA_KERNELS", "IEEE_KERNELS", "SPILL_ALLOWED"):
        monkeypatch.setattr(gsc, table, {k: v for k, v in getattr(gsc, table).items() if k == name})
    _write_results(str(tmp_path), name, **fields)
    import argparse

    rc = gsc.cmd_report(argparse.Namespace(dir=str(tmp_path), expect_triton=1, expect_cuda=False))
    out = capsys.readouterr().out
    assert rc == (0 if expect is None else 1), out
    if expect:
        assert expect in out


def test_non_f64_mma_count():
    ptx = ("  mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%fd1, %fd2}, {%fd3}, {%fd4}, {%fd5, %fd6};\n"
           "  @%p1 mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1}, {%r1}, {%r2}, {%f2};\n"
           "  wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2;\n")
    assert gsc.non_f64_mma(ptx) == 2
    assert len(gsc.FMA.findall("  fma.rn.f32 %f1, %f2, %f3, %f4;\n  @%p2 fma.rn.f64 %fd1, %fd2, %fd3, %fd4;\n"
                                "  mul.rn.f32 %f5, %f6, %f7;\n")) == 2
