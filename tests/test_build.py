"""Build checks that need no GPU: the raw CUDA kernels compile with nvcc, and the CUDA glue (.cpp files
under csrc/cuda) is valid C++ against torch's headers, whenever a CUDA toolkit is present."""
import glob
import inspect
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
import torch.utils.cpp_extension as cpp_extension

from stabkernels._toolkit import NVCC_FLAGS, find_cuda_home

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(REPO, "csrc", "**", "*.cu"), recursive=True))
GLUE_FILES = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cpp")))
CUDA_HOME = find_cuda_home()
needs_toolkit = pytest.mark.skipif(shutil.which("nvcc") is None or CUDA_HOME is None, reason="no CUDA toolkit")


def test_there_are_cuda_kernels_and_glue():
    assert CU_FILES and GLUE_FILES


def torch_nvcc_flags(monkeypatch) -> list[str]:
    """The flags torch's BuildExtension gives nvcc for every .cu, taken from torch itself: COMMON_NVCC_FLAGS
    (no implicit half/bfloat16 conversions or operators), the arch flags of TORCH_CUDA_ARCH_LIST (9.0 when
    unset: there is no GPU to ask), the C++ standard BuildExtension appends, then our own NVCC_FLAGS."""
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    std = sorted(set(re.findall(r"c\+\+(\d\d)", inspect.getsource(cpp_extension.BuildExtension))))[-1]
    return (list(cpp_extension.COMMON_NVCC_FLAGS) + ["-Xcompiler", "-fPIC"] + NVCC_FLAGS
            + cpp_extension._get_cuda_arch_flags(NVCC_FLAGS) + [f"-std=c++{std}"])


def _nvcc(flags, path, out):
    return subprocess.run(["nvcc", "-c", *flags, "-I", os.path.dirname(path), path, "-o", str(out)],
                          capture_output=True, text=True, timeout=600)


@needs_toolkit
@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_cuda_kernel_compiles_with_torch_flags(path, tmp_path, monkeypatch):
    r = _nvcc(torch_nvcc_flags(monkeypatch), path, tmp_path / "k.o")
    assert r.returncode == 0, r.stderr


STREAM_KERNELS = ("sq_sums_kernel", "write_kernel", "dots_kernel")


@needs_toolkit
def test_cuda_stream_kernels_have_no_fma(tmp_path, monkeypatch):
    """The direction stream is promised bit-identical on every backend: nvcc contracts a * b + c into one FMA
    (one rounding) by default, so the CUDA stream kernels make every rounding explicit (rn_* in philox.h).
    Checked on the PTX of directional.cu compiled with torch's flags: no fma.rn.f32, no approximate
    division or square root, in the kernels that generate the stream."""
    path = os.path.join(REPO, "csrc", "cuda", "directional.cu")
    out = tmp_path / "d.ptx"
    r = subprocess.run(["nvcc", "-ptx", *torch_nvcc_flags(monkeypatch), "-I", os.path.dirname(path), path, "-o",
                        str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    ptx = out.read_text()
    entries = re.split(r"\.entry\s+", ptx)[1:]
    seen = set()
    for body in entries:
        name = next((k for k in STREAM_KERNELS if k in body.split("(")[0]), None)
        if name is None:
            continue
        seen.add(name)
        assert "fma.rn.f32" not in body, f"{name}: {body.count('fma.rn.f32')} fma.rn.f32"
        assert not re.search(r"(div|sqrt)\.(approx|full)", body), name
    assert seen == set(STREAM_KERNELS)


def _ptx_entries(name, tmp_path, monkeypatch):
    """{kernel entry name: PTX body} of csrc/cuda/<name> compiled with torch's flags."""
    path = os.path.join(REPO, "csrc", "cuda", name)
    out = tmp_path / (name + ".ptx")
    r = subprocess.run(["nvcc", "-ptx", *torch_nvcc_flags(monkeypatch), "-I", os.path.dirname(path), path, "-o",
                        str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return {body.split("(")[0]: body for body in re.split(r"\.entry\s+", out.read_text())[1:]}


# Kernels allowed to keep float atomics (each must say why in its comment): none today.
NONDETERMINISTIC_KERNELS = ()


@needs_toolkit
@pytest.mark.parametrize("name", ["update.cu", "spectral.cu", "directional.cu", "reduce.cu"])
def test_cuda_reductions_have_no_float_atomics(name, tmp_path, monkeypatch):
    """Sums that feed a step decision (sum of u^2, sq_norms, the stream's norms and directional dots,
    OrthoGrad's dots, power iteration's y = W^T x) are per-block partials plus a fixed-order pass: the same
    bits every run."""
    for entry, body in _ptx_entries(name, tmp_path, monkeypatch).items():
        if any(k in entry for k in NONDETERMINISTIC_KERNELS):
            continue
        assert not re.search(r"\b(atom|red)(\.global)?\.add\.f(32|64)", body), f"{name}: {entry}"


@needs_toolkit
def test_torch_flags_forbid_implicit_half_conversions(tmp_path, monkeypatch):
    # The check above is only worth something if the flags are torch's: a plain `nvcc -c` accepted the
    # double -> __half conversion that broke the real build.
    src = tmp_path / "half.cu"
    src.write_text("#include <cuda_fp16.h>\n__global__ void k(__half* o, double v) { o[0] = v; }\n")
    assert _nvcc(["-arch=sm_90"], str(src), tmp_path / "a.o").returncode == 0
    r = _nvcc(torch_nvcc_flags(monkeypatch), str(src), tmp_path / "b.o")
    assert r.returncode != 0 and "__half" in r.stderr, r.stderr


@needs_toolkit
@pytest.mark.parametrize("path", GLUE_FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_cuda_glue_is_valid_cpp(path, tmp_path):
    # A CPU torch wheel ships the c10/cuda headers but not the one header its CUDA build generates;
    # an empty stand-in suffices for a syntax check.
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = cpp_extension.include_paths() + [str(tmp_path), os.path.join(CUDA_HOME, "include"),
                                                sysconfig.get_paths()["include"]]
    cmd = ["g++", "-fsyntax-only", "-std=c++20", "-DSTABKERNELS_WITH_CUDA", path]
    cmd += [f"-I{p}" for p in includes]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


# Host-to-device copies and host reads that a CUDA step must not make: each is free on CPU tensors (so no
# CPU test sees it) and on CUDA a blocking copy or a device synchronisation that also breaks graph capture.
HOST_ROUND_TRIPS = {
    "at::tensor(": "a tensor built from host data",
    ".cpu()": "a device-to-host copy",
    "pinned_memory": "a host staging buffer",
    "non_blocking": "a host-to-device copy",
    ".item": "a host read of a device value",
    ".to(": "a copy or conversion that may move host data to the device",
    "index_copy_": "a per-call index scatter (write results at the tensor's index in the kernel instead)",
    "cudaMemcpy": "a raw copy",
    "cudaStreamSynchronize": "a host wait",
    "cudaDeviceSynchronize": "a host wait",
}


def _code(path):
    """The file's text without // comments (the rules name what they forbid)."""
    with open(path) as f:
        return "\n".join(line.split("//")[0] for line in f)


@pytest.mark.parametrize("path", [p for p in GLUE_FILES if os.path.basename(p) != "launch_plan.cpp"],
                         ids=lambda p: os.path.relpath(p, REPO))
def test_cuda_glue_makes_no_host_round_trip(path):
    """csrc/cuda/launch_plan.cpp is the one module of the CUDA glue that uploads host data (cached launch
    plans, built once per list of tensors); every other glue file gets its tables from it and passes per-step
    scalars as device tensors, so a step neither copies from the host nor waits for the device."""
    code = _code(path)
    found = {pattern: why for pattern, why in HOST_ROUND_TRIPS.items() if pattern in code}
    assert not found, f"{os.path.relpath(path, REPO)}: {found}"


def test_only_the_launch_plan_uploads():
    code = _code(os.path.join(REPO, "csrc", "cuda", "launch_plan.cpp"))
    assert "non_blocking=*/true" in code and "pinned_memory(true)" in code  # pinned, asynchronous: no host wait
    assert ".item" not in code and ".cpu()" not in code
