"""Build checks that need no GPU: the raw CUDA kernels compile with nvcc, and the CUDA glue (.cpp files
under csrc/cuda) is valid C++ against torch's headers, whenever a CUDA toolkit is present."""
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch.utils.cpp_extension as cpp_extension

from stabkernels._toolkit import find_cuda_home

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(REPO, "csrc", "**", "*.cu"), recursive=True))
GLUE_FILES = sorted(glob.glob(os.path.join(REPO, "csrc", "cuda", "*.cpp")))
CUDA_HOME = find_cuda_home()
needs_toolkit = pytest.mark.skipif(shutil.which("nvcc") is None or CUDA_HOME is None, reason="no CUDA toolkit")


def test_there_are_cuda_kernels_and_glue():
    assert CU_FILES and GLUE_FILES


@needs_toolkit
@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: os.path.relpath(p, REPO))
def test_cuda_kernel_compiles(path, tmp_path):
    r = subprocess.run(["nvcc", "-c", "-std=c++17", "-arch=sm_90", "-I", os.path.dirname(path), path,
                        "-o", str(tmp_path / "k.o")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


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
