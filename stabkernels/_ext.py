"""Loads the compiled extension ``stabkernels._C`` safely.

``_C`` holds the C++ CPU kernels and, in a CUDA build, the CUDA kernels. It is optional: without it the
torch reference and Triton backends serve every op. Before importing it we read the record the build wrote
next to it (``_C_build.json``) and refuse, with one warning, a ``_C`` built for another torch (its symbols
would not match) or for SIMD instructions this CPU lacks (it would crash with SIGILL).

Set ``STABKERNELS_DISABLE_EXT=1`` to ignore a built ``_C`` (useful to compare backends or to debug).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import warnings

import torch

BUILD_INFO_NAME = "_C_build.json"
_CAPABILITY_ORDER = ("DEFAULT", "AVX2", "AVX512")

loaded: bool = False
"""Whether ``stabkernels._C`` is loaded and its ops are registered."""
load_error: str | None = None
"""Why ``_C`` is not loaded (``None`` when it is)."""
build_info: dict = {}
"""What ``_C`` was built against: torch, cuda, with_cuda, cpu_capability."""


def _machine_capability() -> str:
    if torch.cpu._is_avx512_supported():
        return "AVX512"
    if torch.cpu._is_avx2_supported():
        return "AVX2"
    return "DEFAULT"


def _refusal(info: dict) -> str | None:
    """Why a ``_C`` with this build record must not be loaded here, or None."""
    if info.get("torch") != torch.__version__:
        return (
            f"stabkernels._C was built for torch {info.get('torch')} but torch {torch.__version__} is running; "
            "rebuild it (pip install --no-build-isolation .)"
        )
    need = info.get("cpu_capability", "DEFAULT")
    have = _machine_capability()
    if need in _CAPABILITY_ORDER and _CAPABILITY_ORDER.index(need) > _CAPABILITY_ORDER.index(have):
        return (
            f"stabkernels._C was built for {need} CPUs but this CPU supports {have}; rebuild it here "
            f"(or with STABKERNELS_CPU_CAPABILITY={have})"
        )
    return None


def _load() -> None:
    global loaded, load_error, build_info
    if os.environ.get("STABKERNELS_DISABLE_EXT") == "1":
        load_error = "disabled by STABKERNELS_DISABLE_EXT=1"
        return
    spec = importlib.util.find_spec("stabkernels._C")
    if spec is None or spec.origin is None:
        load_error = "not compiled (installed with STABKERNELS_NO_EXT=1, or the build failed)"
        return
    record = os.path.join(os.path.dirname(spec.origin), BUILD_INFO_NAME)
    try:
        with open(record) as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        info = {}
        load_error = f"its build record {record} is missing or unreadable ({e}); rebuild stabkernels"
    else:
        load_error = _refusal(info)
    if load_error is None:
        try:
            importlib.import_module("stabkernels._C")
        except (ImportError, OSError) as e:
            load_error = f"importing it failed: {e}"
    build_info = info
    loaded = load_error is None
    if not loaded:
        warnings.warn(
            f"stabkernels: not loading the compiled extension: {load_error}. "
            "The torch reference and Triton backends serve instead.",
            RuntimeWarning,
            stacklevel=3,
        )


def has_cuda_kernels() -> bool:
    """Whether the loaded ``_C`` contains CUDA kernels."""
    return loaded and bool(build_info.get("with_cuda"))


_load()
