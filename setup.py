"""Build script for stabkernels and its compiled extension ``stabkernels._C``.

Environment switches:
  STABKERNELS_NO_EXT=1          pure-Python install (torch reference and Triton backends only)
  STABKERNELS_CUDA=auto|0|1     CUDA kernels: auto = when torch is a CUDA build and a toolkit is found
  STABKERNELS_CPU_CAPABILITY    AVX512 | AVX2 | DEFAULT: the SIMD level of the CPU kernels; default is the
                                best this build machine supports. The build records it and the package
                                refuses to load ``_C`` on a CPU that lacks it.
  TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME   as usual for torch extensions.

Install after your own torch:  pip install --no-build-isolation .
"""
import glob
import json
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO_NAME = "_C_build.json"

# Flags that match what ATen uses for its own capability-specific kernels.
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "DEFAULT": [],
}


def _record(ext_path):
    """Path of the build record written next to a built extension file."""
    return os.path.join(os.path.dirname(ext_path), BUILD_INFO_NAME)


def _sources(pattern):
    return sorted(glob.glob(os.path.join("csrc", pattern)))


def _cpu_capability(torch):
    wanted = os.environ.get("STABKERNELS_CPU_CAPABILITY", "").upper()
    if wanted:
        if wanted not in CAPABILITY_FLAGS:
            raise RuntimeError(f"STABKERNELS_CPU_CAPABILITY={wanted!r}; expected one of {sorted(CAPABILITY_FLAGS)}")
        return wanted
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return "DEFAULT"
    if torch.cpu._is_avx512_supported():
        return "AVX512"
    if torch.cpu._is_avx2_supported():
        return "AVX2"
    return "DEFAULT"


def _load_toolkit_helpers():
    """stabkernels/_toolkit.py, loaded by path: the package is not importable while it is being built."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_stabkernels_toolkit", os.path.join(ROOT, "stabkernels", "_toolkit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _want_cuda(torch):
    mode = os.environ.get("STABKERNELS_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"STABKERNELS_CUDA={mode!r}; expected auto, 0 or 1")
    if mode == "0":
        return False, None
    cuda_home = _load_toolkit_helpers().find_cuda_home()
    ok = torch.version.cuda is not None and cuda_home is not None
    if mode == "1" and not ok:
        why = "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit found (set CUDA_HOME)"
        raise RuntimeError(f"STABKERNELS_CUDA=1 but CUDA kernels cannot be built: {why}")
    return ok, cuda_home


def _extensions():
    if os.environ.get("STABKERNELS_NO_EXT") == "1":
        return [], {}
    import torch

    with_cuda, cuda_home = _want_cuda(torch)
    if with_cuda:
        # Set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import time, and its own
        # guess from a wrapper nvcc on PATH is wrong.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils import cpp_extension

    capability = _cpu_capability(torch)
    # -ffp-contract=off: no fused multiply-adds the torch reference does not make either (the direction
    # stream and the perturbations are meant to agree bit for bit across CPU backends).
    cxx = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", *CAPABILITY_FLAGS[capability]]
    if capability != "DEFAULT":
        # Selects the matching ATen Vectorized<T> implementation, exactly as ATen's own kernels do.
        cxx += [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
    sources = _sources("*.cpp") + _sources("cpu/*.cpp")
    kwargs = dict(extra_compile_args={"cxx": cxx})
    if with_cuda:
        sources += _sources("cuda/*.cpp") + _sources("cuda/*.cu")
        include = os.path.join(cuda_home, "include")
        kwargs["extra_compile_args"]["cxx"].append("-DSTABKERNELS_WITH_CUDA")
        kwargs["extra_compile_args"]["nvcc"] = list(_load_toolkit_helpers().NVCC_FLAGS)
        # Toolkit headers first: the nvidia wheels' include dirs only fill in what the toolkit lacks.
        extra = sorted(glob.glob(os.path.join(os.path.dirname(torch.__path__[0]), "nvidia", "*", "include")))
        kwargs["include_dirs"] = [include, *extra]
        ext = cpp_extension.CUDAExtension("stabkernels._C", sources, **kwargs)
    else:
        ext = cpp_extension.CppExtension("stabkernels._C", sources, **kwargs)

    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda if with_cuda else None,
        "with_cuda": with_cuda,
        "cpu_capability": capability,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
    }

    class BuildExt(cpp_extension.BuildExtension):
        """Builds _C, then records what it was built against next to it (read by stabkernels/_ext.py).

        The record must travel wherever the binary goes: into wheels (it sits in build_lib) and into the
        source tree for in-place and editable builds (copied along with the binary)."""

        def build_extension(self, extension):
            super().build_extension(extension)
            with open(_record(self.get_ext_fullpath(extension.name)), "w") as f:
                json.dump(info, f, indent=1)

        def _record_pairs(self):
            build_py = self.get_finalized_command("build_py")
            for extension in self.extensions:
                inplace_file, regular_file = self._get_inplace_equivalent(build_py, extension)
                yield _record(regular_file), _record(inplace_file)

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()
            for regular, inplace in self._record_pairs():
                self.copy_file(regular, inplace, level=self.verbose)

        def _get_output_mapping(self):
            yield from super()._get_output_mapping()
            if self.inplace:
                yield from self._record_pairs()

        def get_outputs(self):
            outputs = super().get_outputs()
            if not self.inplace:
                outputs += [regular for regular, _ in self._record_pairs()]
            return outputs

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
