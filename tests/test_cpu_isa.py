"""CPU ISA dispatch (csrc/cpu/dispatch.cpp): one build holds the DEFAULT, AVX2 and AVX512 kernels, picks the
best level the CPU has, STABKERNELS_CPU_ISA forces a lower one, no vector code of a level can be reached
from the baseline, and every level passes the op suite against the torch reference (the direction stream bit
for bit)."""
import collections
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

from stabkernels import _ext

from .test_ext import REPO, run_python

X86 = platform.machine().lower() in ("x86_64", "amd64")
needs_ext = pytest.mark.skipif(not _ext.loaded, reason="needs the compiled extension")
LEVELS = _ext.ISA_LEVELS


def _lower_levels():
    """The levels at or below what this CPU supports."""
    if not _ext.loaded:
        return []
    return list(LEVELS[: LEVELS.index(_ext.cpu_isa_best) + 1])


@needs_ext
def test_every_level_is_compiled_and_the_best_supported_one_is_used():
    assert _ext.build_info["cpu_isa_levels"] == (list(LEVELS) if X86 else ["DEFAULT"])
    if os.environ.get(_ext.ISA_ENV) is None:
        assert _ext.cpu_isa == _ext.cpu_isa_best
    if X86 and hasattr(torch.cpu, "_is_avx2_supported"):  # ATen's own detection agrees
        best = "AVX512" if torch.cpu._is_avx512_supported() else "AVX2" if torch.cpu._is_avx2_supported() else "DEFAULT"
        assert _ext.cpu_isa_best == best


@needs_ext
@pytest.mark.parametrize("level", LEVELS)
def test_forcing_a_level_is_reported_by_info(level):
    r = run_python("import stabkernels; stabkernels.info()", {_ext.ISA_ENV: level.lower()})
    assert r.returncode == 0, r.stderr
    used = level if level in _lower_levels() else _ext.cpu_isa_best
    assert f"CPU ISA level in use: {used}" in r.stdout
    if used != level:  # above what the CPU has: the best supported, and a warning says so
        assert f"{_ext.ISA_ENV}={level} but this CPU supports {_ext.cpu_isa_best}" in r.stderr
    elif used != _ext.cpu_isa_best:
        assert "forced by STABKERNELS_CPU_ISA" in r.stdout


def test_a_value_that_names_no_level_is_an_error():
    r = run_python("import stabkernels", {_ext.ISA_ENV: "AVX3"})
    assert r.returncode != 0 and "STABKERNELS_CPU_ISA='AVX3' names no CPU ISA level" in r.stderr


def _functions_with_vector_code(so):
    """{function with VEX or EVEX instructions: [symbol type, uses EVEX]} from the disassembly of ``so``."""
    types = {}
    for line in subprocess.run(["nm", "--defined-only", so], capture_output=True, text=True, check=True).stdout.splitlines():
        addr, kind, name = line.split(maxsplit=2)
        types.setdefault(int(addr, 16), kind)
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", so], capture_output=True, text=True, check=True).stdout
    head = re.compile(r"^([0-9a-f]+) <(.+)>:$")
    evex = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b")
    found, cur = collections.defaultdict(lambda: [None, False]), None
    for line in dis.splitlines():
        m = head.match(line)
        if m:
            cur = (m.group(2), types.get(int(m.group(1), 16), "?"))
            continue
        if cur is None or "\t" not in line or cur[0].endswith("@plt"):
            continue
        ins = line.split("\t", 1)[1].strip()
        is_evex = bool(evex.search(ins))
        if is_evex or ins.startswith("v") or "%ymm" in ins:
            f = found[cur[0]]
            f[0], f[1] = cur[1], f[1] or is_evex
    return found


@needs_ext
@pytest.mark.skipif(not (X86 and sys.platform.startswith("linux") and shutil.which("objdump") and shutil.which("nm")),
                    reason="checks the x86-64 ELF binary with binutils")
def test_no_vector_code_is_reachable_from_the_baseline():
    """Every function with AVX (VEX) or AVX-512 (EVEX) instructions is local to its level's object: none is a
    global or weak symbol the baseline code could be linked to (setup.py: _localize), and the only symbols
    the levels export are their kernel tables. On an AVX2 CPU, AVX-512 code shared this way is a SIGILL."""
    import glob

    so = glob.glob(os.path.join(os.path.dirname(_ext.__file__), "_C*.so"))[0]
    found = _functions_with_vector_code(so)
    assert any(evex for _, evex in found.values()), "no AVX-512 code found: is the AVX512 level built?"
    shared = sorted(name for name, (kind, _) in found.items()
                    if kind not in ("t", "?") and not name.startswith("stabkernels_cpu_kernels_"))
    assert shared == [], f"vector code in non-local functions: {shared[:5]}"
    exported = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True, check=True).stdout
    tables = sorted(re.findall(r"stabkernels_cpu_kernels_\w+", exported))
    assert tables == [f"stabkernels_cpu_kernels_{level}" for level in sorted(LEVELS)]
    assert not re.search(r"stabkernels3cpu(4AVX2|6AVX512)", exported)


# The op suite's reference tests of the C++ kernels (float64 references, odd shapes, non-contiguous
# inputs, every float dtype; the direction stream bit for bit), run again at each lower level.
OP_TESTS = ["test_directional.py", "test_spread_row_spread.py", "test_spread_radius.py", "test_update.py",
            "test_losses.py", "test_losses_linear.py", "test_spectral.py", "test_tangent_attention.py",
            "test_attention.py"]


@needs_ext
@pytest.mark.slow  # make test runs it; the CUDA-torch suite (make test-cuda-build) skips it for CI's time
@pytest.mark.parametrize("level", [lv for lv in LEVELS if lv != "AVX512"])
def test_op_suite_passes_at_a_lower_level(level):
    if level not in _lower_levels() or level == _ext.cpu_isa_best:
        pytest.skip(f"{level} is not a lower level on this CPU (best: {_ext.cpu_isa_best})")
    env = {k: v for k, v in os.environ.items() if k != _ext.ISA_ENV}
    env[_ext.ISA_ENV] = level
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-k", "cpp and not triton",
           *OP_TESTS]
    r = subprocess.run(cmd, cwd=os.path.join(REPO, "tests"), env=env, capture_output=True, text=True, timeout=900)
    tail = r.stdout[-3000:]
    assert r.returncode == 0, tail
    assert re.search(r"(\d+) passed", tail) and int(re.search(r"(\d+) passed", tail).group(1)) >= 50, tail


STREAM_CHECK = """
import torch
from stabkernels import _ext, directional as D
assert _ext.cpu_isa == {level!r}, _ext.cpu_isa
sizes = [1, 3, 4, 5, 15, 16, 17, 31, 33, 64, 100_003]
like = [torch.empty(n) for n in sizes] + [torch.empty(7, 9, dtype=torch.float64)]
want = D.random_directions(like, 11, 2, backend="torch")
got = D.random_directions(like, 11, 2, backend="cpp")
assert all(torch.equal(a, b) for a, b in zip(got, want)), "random_directions"
params = [torch.randn(n) for n in sizes]
out = D.perturb(params, 5, 1, 0.01, backend="cpp")
ref = D.perturb(params, 5, 1, 0.01, backend="torch")
assert all(torch.equal(a, b) for a, b in zip(out, ref)), "perturb"
# a shard's normals are the slice of the whole tensor's, for any offset
keys = torch.tensor([D.stream_key(3, 0, 0)] * 4, dtype=torch.int64)
whole = torch.empty(1000)
torch.ops.stabkernels_C.shard_normals([whole], keys[:1], [0])
outs = [torch.empty(n) for n in (1, 37, 250, 5)]
torch.ops.stabkernels_C.shard_normals(outs, keys, [0, 3, 501, 995])
for o, off in zip(outs, (0, 3, 501, 995)):
    assert torch.equal(o, whole[off:off + o.numel()]), ("shard_normals", off)
print("ok")
"""


@needs_ext
@pytest.mark.parametrize("level", LEVELS)
def test_the_direction_stream_is_bit_identical_at_every_level(level):
    if level not in _lower_levels():
        pytest.skip(f"this CPU lacks {level}")
    r = run_python(STREAM_CHECK.format(level=level), {_ext.ISA_ENV: level})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def _setup_isa_flags() -> dict:
    """setup.py's ISA_SOURCES (level -> (source, flags)), read without running setup.py."""
    import ast

    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "ISA_SOURCES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no ISA_SOURCES")


@pytest.mark.skipif(not (X86 and shutil.which("g++")), reason="builds x86-64 code with g++")
@pytest.mark.parametrize("level", [lv for lv in LEVELS if lv != "DEFAULT"])
def test_simd_box_muller_matches_the_definition_for_every_word(level, tmp_path):
    """tests/cpp/box_muller_every_word.cpp: the level's Box-Muller equals csrc/philox.h's for all 2^23 radius
    and 2^26 angle words (the random tests above see a few hundred thousand), compiled with the level's flags
    and the extension's -ffp-contract=off."""
    if level not in _lower_levels():
        pytest.skip(f"this CPU lacks {level}")
    flags = _setup_isa_flags()[level][1]
    exe = tmp_path / "box_muller_every_word"
    subprocess.run(["g++", "-O2", "-std=c++17", "-ffp-contract=off", "-fno-math-errno", f"-DCPU_CAPABILITY={level}",
                    f"-DCPU_CAPABILITY_{level}", *flags, "-I", os.path.join(REPO, "csrc"),
                    os.path.join(REPO, "tests", "cpp", "box_muller_every_word.cpp"), "-o", str(exe)], check=True)
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:]
    assert r.stdout.strip() == f"{(1 << 23) + (1 << 26)} checked, 0 mismatches"
