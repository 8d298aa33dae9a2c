"""Locating the CUDA toolkit, shared by setup.py (loaded by path, before the package is installed) and the
build tests. Plain Python only: no torch import.

Here, as on many machines, the ``nvcc`` on PATH is a wrapper script, so the toolkit root cannot be derived
from its location; ``nvcc --dryrun`` names the real root (``#$ TOP=...``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

# Our own nvcc flags, on top of torch's (setup.py passes them; tests/test_build.py compiles with them and torch's
# COMMON_NVCC_FLAGS / arch flags, so the compile test sees what the real build sees).
NVCC_FLAGS = ["-O3", "-DSTABKERNELS_WITH_CUDA", "-lineinfo"]


def _toolkit_root(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.M)
        if m:
            return os.path.realpath(m.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME or $CUDA_PATH, else the real root behind nvcc, else /usr/local/cuda;
    None when no candidate holds cuda_runtime.h."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    for root in ([_toolkit_root(nvcc)] if nvcc else []) + ["/usr/local/cuda"]:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
            return root
    return None
