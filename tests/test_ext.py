"""The compiled extension: loaded when built, refused (one warning) when built for another torch or CPU,
and never required: the package imports and serves every op without it or without triton."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import stabkernels as sk
from stabkernels import _ext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, env_extra=None, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STABKERNELS_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=cwd or REPO, timeout=300)


@pytest.mark.skipif(os.environ.get("STABKERNELS_REQUIRE_EXT") != "1",
                    reason="make test sets STABKERNELS_REQUIRE_EXT=1: there the extension must be built")
def test_extension_is_loaded_when_required():
    assert _ext.loaded, _ext.load_error
    assert sk.backend.resolve("row_spread", "auto", "cpu") == "cpp"


@pytest.mark.skipif(os.environ.get("STABKERNELS_REQUIRE_CUDA_BUILD") != "1",
                    reason="make test-cuda-build sets STABKERNELS_REQUIRE_CUDA_BUILD=1: there _C has CUDA kernels")
def test_cuda_build_is_loaded_with_cuda_kernels():
    assert _ext.loaded, _ext.load_error
    assert _ext.has_cuda_kernels() and _ext.build_info["cuda"] == torch.version.cuda
    assert hasattr(torch.ops.stabkernels_C, "adam_step_")


@pytest.mark.skipif(not _ext.loaded, reason="no compiled extension")
def test_cuda_plan_cache_stats_exist_exactly_in_cuda_builds():
    from stabkernels import _C
    stats = _C.cuda_plan_cache_stats()
    if _ext.has_cuda_kernels():
        hits, misses, entries = stats
        assert min(hits, misses, entries) >= 0 and entries <= 16
    else:
        assert stats is None


def test_refusal_reasons():
    ok = {"torch": torch.__version__, "cpu_isa_levels": ["DEFAULT", "AVX2", "AVX512"]}
    assert _ext.refusal(ok) is None
    assert "built for torch 1.0.0" in _ext.refusal({**ok, "torch": "1.0.0"})
    # a build from before the ISA dispatch holds one level, possibly one this CPU lacks (SIGILL)
    assert "one CPU ISA level" in _ext.refusal({"torch": torch.__version__, "cpu_capability": "AVX512"})


@pytest.mark.skipif(not _ext.loaded, reason="needs a built extension to copy")
def test_extension_built_for_other_torch_is_refused_with_one_warning(tmp_path):
    pkg = tmp_path / "stabkernels"
    shutil.copytree(os.path.join(REPO, "stabkernels"), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    record = pkg / _ext.BUILD_INFO_NAME
    record.write_text(json.dumps({**json.loads(record.read_text()), "torch": "0.0.1"}))
    r = run_python("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import stabkernels, torch
            from stabkernels import _ext
            assert not _ext.loaded
            x = torch.randn(4, 5)
            assert torch.equal(stabkernels.row_spread(x), (x.amax(1) - x.amin(1)).max())
        msgs = [str(w.message) for w in caught if "stabkernels" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "built for torch 0.0.1" in msgs[0], msgs
        print("OK")
    """, cwd=tmp_path)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_works_without_extension_and_without_triton():
    r = run_python("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` fail, as if not installed
        import torch, stabkernels as sk
        x = torch.randn(6, 7)
        assert torch.equal(sk.row_spread(x, "none"), x.amax(1) - x.amin(1))
        assert sk.backend.resolve("row_spread", "auto", "cpu") == "torch"
        for b, why in [("cpp", "STABKERNELS_DISABLE_EXT"), ("triton", "triton")]:
            try:
                sk.row_spread(x, backend=b)
            except sk.BackendUnavailable as e:
                assert why in str(e), e
            else:
                raise AssertionError(b)
        sk.info()
        print("OK")
    """, env_extra={"STABKERNELS_DISABLE_EXT": "1"})
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr


def test_info_command_prints_versions_and_backend_table():
    r = run_python("import runpy, sys; sys.argv = ['stabkernels', 'info']; runpy.run_module('stabkernels', run_name='__main__')")
    assert r.returncode == 0, r.stderr
    for needle in ("torch " + torch.__version__, "triton", "_C:", "row_spread", "cpp"):
        assert needle in r.stdout, r.stdout
    d = sk.info(print_=False)
    assert d["torch"] == torch.__version__ and "row_spread" in d["backends"]
    assert d["backends"]["row_spread"]["torch"] == "yes"


def test_supported_versions_agree_with_pyproject_and_info():
    import re

    from stabkernels import _info

    with open(os.path.join(REPO, "pyproject.toml")) as f:
        text = f.read()
    for package in ("torch", "triton"):
        (lo_major, lo_minor), (hi_major, hi_minor) = _info.SUPPORTED[package]
        want = f'"{package}>={lo_major}.{lo_minor},<{hi_major}.{hi_minor + 1}"'
        assert want in text, (want, re.findall(rf'"{package}[^"]*"', text))
    assert _info.support_note("torch", "2.11.0+cu130") == "" and _info.support_note("torch", "2.14.1") == ""
    assert "outside" in _info.support_note("torch", "2.10.0") and "outside" in _info.support_note("triton", "3.10.0")
    assert "supported: torch 2.11-2.14, triton 3.6-3.9" in _info.format_info(sk.info(print_=False))
