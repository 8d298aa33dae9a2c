"""Loads the compiled extension ``stabkernels._C`` safely.

``_C`` holds the C++ CPU kernels and, in a CUDA build, the CUDA kernels. It is optional: without it the
torch reference and Triton backends serve every op. Before importing it we read the record the build wrote
next to it (``_C_build.json``) and refuse, with one warning, a ``_C`` built for another torch (its symbols
would not match).

The CPU kernels are compiled for every ISA level (DEFAULT, AVX2, AVX512 on x86-64); ``_C`` registers the
best one this CPU supports. ``STABKERNELS_CPU_ISA=DEFAULT|AVX2|AVX512`` forces a lower level (tests,
benchmarks); a level above what the CPU supports falls back to the best supported, with a warning.

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
ISA_LEVELS = ("DEFAULT", "AVX2", "AVX512")
ISA_ENV = "STABKERNELS_CPU_ISA"

loaded: bool = False
"""Whether ``stabkernels._C`` is loaded and its ops are registered."""
load_error: str | None = None
"""Why ``_C`` is not loaded (``None`` when it is)."""
build_info: dict = {}
"""What ``_C`` was built against: torch, cuda, with_cuda, cpu_isa_levels."""
cpu_isa: str = ""
"""The ISA level of the CPU kernels in use ("" when ``_C`` is not loaded)."""
cpu_isa_best: str = ""
"""The best ISA level this CPU supports, as ``_C`` detected it ("" when ``_C`` is not loaded)."""


def requested_isa() -> str | None:
    """The level STABKERNELS_CPU_ISA asks for (upper case), or None; a value that names no level is an error."""
    value = os.environ.get(ISA_ENV, "").strip()
    if not value:
        return None
    if value.upper() not in ISA_LEVELS:
        raise ValueError(f"{ISA_ENV}={value!r} names no CPU ISA level; expected one of {', '.join(ISA_LEVELS)}")
    return value.upper()


def refusal(info: dict) -> str | None:
    """Why a ``_C`` with this build record must not be loaded here, or None."""
    if info.get("torch") != torch.__version__:
        return (
            f"stabkernels._C was built for torch {info.get('torch')} but torch {torch.__version__} is running; "
            "rebuild it (pip install --no-build-isolation .)"
        )
    if "cpu_isa_levels" not in info:
        return (
            "stabkernels._C is an older build compiled for one CPU ISA level only; rebuild it "
            "(pip install --no-build-isolation .)"
        )
    return None


def _load() -> None:
    global loaded, load_error, build_info, cpu_isa, cpu_isa_best
    requested = requested_isa()
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
        load_error = refusal(info)
    if load_error is None:
        try:
            module = importlib.import_module("stabkernels._C")
        except (ImportError, OSError) as e:
            load_error = f"importing it failed: {e}"
        else:
            cpu_isa, cpu_isa_best = module.cpu_isa()
            if requested is not None and requested != cpu_isa:
                warnings.warn(
                    f"stabkernels: {ISA_ENV}={requested} but this CPU supports {cpu_isa_best} at most; "
                    f"the CPU kernels run at {cpu_isa}",
                    RuntimeWarning,
                    stacklevel=3,
                )
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
