"""Build script for stabkernels and its compiled extension ``stabkernels._C``.

Environment switches:
  STABKERNELS_NO_EXT=1          pure-Python install (torch reference and Triton backends only)
  STABKERNELS_CUDA=auto|0|1     CUDA kernels: auto = when torch is a CUDA build and a toolkit is found
  TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME   as usual for torch extensions.

The CPU kernels are compiled for every ISA level of the target architecture (x86-64: DEFAULT, AVX2,
AVX512) into the one binary, which picks the best level the running CPU supports at import (see
csrc/cpu/dispatch.cpp; STABKERNELS_CPU_ISA forces a lower one). So a build made on any machine runs on all.

Install after your own torch:  pip install --no-build-isolation .
"""
import glob
import json
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO_NAME = "_C_build.json"

# The CPU kernels above baseline: level -> (source, flags). The flags are those ATen compiles its own
# capability-specific kernels with. The DEFAULT level (csrc/cpu/isa/default.cpp) is an ordinary source.
ISA_SOURCES = {
    "AVX2": ("csrc/cpu/isa/avx2.cpp", ["-mavx2", "-mfma", "-mf16c"]),
    "AVX512": ("csrc/cpu/isa/avx512.cpp", ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]),
}


def _record(ext_path):
    """Path of the build record written next to a built extension file."""
    return os.path.join(os.path.dirname(ext_path), BUILD_INFO_NAME)


def _sources(pattern):
    return sorted(glob.glob(os.path.join("csrc", pattern)))


def _isa_levels():
    """The CPU ISA levels compiled into _C: all of ISA_SOURCES on x86-64, the baseline elsewhere."""
    import platform

    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["DEFAULT", *ISA_SOURCES]
    return ["DEFAULT"]


def _localize(obj, keep):
    """An object made of ``obj`` with every symbol it defines local except ``keep`` (ELF only).

    An AVX2/AVX512 object defines the inline header code it uses (torch's, the standard library's) as weak
    symbols, compiled with that level's instructions; at link time one copy of each serves every caller,
    the baseline code's too, and a copy built for AVX-512 would crash an AVX2 CPU with SIGILL. Merging the
    object's section groups into plain sections (ld -r --force-group-allocation) and making its symbols
    local gives the level its own private copies; what it exports is its kernel table only."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        return obj
    for tool in ("ld", "nm", "objcopy"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"building the CPU ISA levels needs {tool} (GNU binutils) on PATH")
    out = obj[: -len(".o")] + ".local.o"
    subprocess.run(["ld", "-r", "--force-group-allocation", "-o", out, obj], check=True)
    # Data with one instance per program (static locals of inline functions: STB_GNU_UNIQUE) cannot be made
    # local; weak, they resolve to the baseline's instance, which is what the program wants anyway.
    listing = subprocess.run(["nm", "--defined-only", "-P", out], check=True, capture_output=True, text=True).stdout
    unique = [line.split()[0] for line in listing.splitlines() if line.split()[1:2] == ["u"]]
    names = out + ".weaken"
    with open(names, "w") as f:
        f.write("".join(name + "\n" for name in unique))
    subprocess.run(["objcopy", f"--keep-global-symbol={keep}", f"--weaken-symbols={names}", out], check=True)
    return out


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

    levels = _isa_levels()
    # -ffp-contract=off: no fused multiply-adds the torch reference does not make either (the direction
    # stream and the perturbations are meant to agree bit for bit across CPU backends and ISA levels).
    cxx = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]
    # The baseline sources; the AVX2/AVX512 objects are compiled and linked by BuildExt below.
    sources = ["csrc/stabkernels.cpp", "csrc/list_checks.cpp", "csrc/cpu/dispatch.cpp", "csrc/cpu/isa/default.cpp"]
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
        "cpu_isa_levels": levels,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
    }

    class BuildExt(cpp_extension.BuildExtension):
        """Builds _C, then records what it was built against next to it (read by stabkernels/_ext.py).

        The record must travel wherever the binary goes: into wheels (it sits in build_lib) and into the
        source tree for in-place and editable builds (copied along with the binary)."""

        def build_extension(self, extension):
            self._compile_isa_objects(extension)
            super().build_extension(extension)
            with open(_record(self.get_ext_fullpath(extension.name)), "w") as f:
                json.dump(info, f, indent=1)

        def _compile_isa_objects(self, extension):
            """Compiles each level above baseline with its own flags (one extension has one set of flags)
            and adds the localised objects to the link."""
            objects = []
            args = extension.extra_compile_args
            for level in levels[1:]:
                source, flags = ISA_SOURCES[level]
                objects += self.compiler.compile(
                    [source], output_dir=os.path.join(self.build_temp, "isa-" + level.lower()),
                    macros=extension.define_macros, include_dirs=extension.include_dirs, debug=self.debug,
                    extra_postargs={"cxx": args["cxx"] + flags, "nvcc": args.get("nvcc", [])},
                    depends=extension.depends)
            objects = [_localize(o, f"stabkernels_cpu_kernels_{level}") for o, level in zip(objects, levels[1:])]
            extension.extra_objects = [o for o in extension.extra_objects if o not in objects] + objects

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
