"""The CUDA glue (csrc/cuda) never copies host data to the device nor reads the device inside an op, except in
``csrc/cuda/launch_plan.cpp`` (issue 24, item 5: the static half).

A host-to-device copy is invisible on a CPU-only machine, and no GPU is needed to see one in the source: this
test reads every C++/CUDA source of ``csrc/cuda`` (``*.cpp``, ``*.cu``, ``*.cuh``, ``*.h``; the glue may be
split into several files) with comments and string literals blanked out, and refuses, outside
``launch_plan.cpp`` / ``launch_plan.h`` (the one module that builds the launch tables once and uploads them;
it may not exist yet):

- tensors built from host data: ``at::tensor(...)`` / ``torch::tensor(...)`` / ``from_blob(...)``;
- any device-moving ``.to(...)``: a ``.to(`` whose first argument names a device (``device``, ``x.device()``,
  ``params[0].device()``, ``at::kCUDA``, ``at::kCPU``, ``c10::Device``, ...) or tensor options
  (``.to(x.options())`` moves to ``x``'s device). This is stricter than
  "host data only": ``step_scale.to(params[0].device(), at::kDouble)`` of a tensor that is already on the
  device is a harmless cast, but the glue cannot tell at compile time that its argument is on the device, and
  the same line moves a CPU tensor with a synchronising copy. Write ``.to(at::kDouble)`` (a dtype-only cast,
  accepted anywhere) and ``TORCH_CHECK`` the device instead, or move the tensor in Python where it is visible;
- ``.cpu()``, ``pinned_memory`` / ``pin_memory``, ``non_blocking`` (the staging of an upload);
- host reads: ``.item()`` / ``.item<T>()``, ``_local_scalar_dense``, ``.tolist``, ``at::equal`` /
  ``.equal(``, ``.is_nonzero()``, ``nonzero`` and ``masked_select`` (sized by the device's data);
- explicit transfers and waits: ``cudaMemcpy`` (every variant), ``cudaStreamSynchronize``,
  ``cudaDeviceSynchronize``, ``cudaEventSynchronize``, ``.synchronize()``.

Accepted: dtype-only ``.to(acc)`` / ``.to(at::kFloat)`` / ``.to(out.scalar_type())``; allocation on the
device (``at::empty``/``at::zeros(..., x.options())``); device-to-device ``copy_``/``index_copy_`` with a
device index tensor. Each failure names the file, line and the offending text.
"""
from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
EXTENSIONS = ("*.cpp", "*.cu", "*.cuh", "*.h", "*.hpp")
OWNER = {"launch_plan.cpp", "launch_plan.h", "launch_plan.cuh", "launch_plan.hpp"}

# a device-ish first argument of .to(...): something whose text names a device
_DEVICE_ARG = r"[^,()]*(?:\([^()]*\)[^,()]*)*?(?:device|Device|kCUDA|kCPU|\bcuda\b|\bcpu\b|options|Options)"
RULES = [
    ("tensor built from host data", r"\b(?:at|torch)::tensor\s*\("),
    ("tensor wrapping host memory", r"\bfrom_blob\s*\("),
    ("device-moving .to()", r"\.\s*to\s*\(\s*" + _DEVICE_ARG),
    ("copy to the host", r"\.\s*cpu\s*\(\s*\)"),
    ("pinned host staging", r"\bpinned_memory\b|\bpin_memory\b"),
    ("asynchronous host copy", r"\bnon_blocking\b"),
    ("host read", r"\.\s*item\s*(?:<[^>]*>)?\s*\(\s*\)|\b_local_scalar_dense\b|\.\s*tolist\b"),
    ("host read", r"\bat::equal\s*\(|\.\s*equal\s*\(|\.\s*is_nonzero\s*\(\s*\)"),
    ("data-dependent size (reads the device)", r"\bnonzero\b|\bmasked_select\b"),
    ("explicit transfer", r"\bcudaMemcpy\w*\s*\("),
    ("host wait", r"\bcuda(?:Stream|Device|Event)Synchronize\s*\(|\.\s*synchronize\s*\(\s*\)"),
]
COMPILED = [(why, re.compile(rx)) for why, rx in RULES]


def strip_comments_and_strings(src: str) -> str:
    """The source with comments, string and character literals replaced by spaces (newlines kept, so offsets
    and line numbers stay those of the file)."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c == 'R' and src.startswith('R"', i):  # raw string R"delim( ... )delim"
            m = re.match(r'R"([^(\s]*)\(', src[i:])
            end = src.find(")" + m.group(1) + '"', i) if m else -1
            j = n if end < 0 else end + len(m.group(1)) + 2
            out.append(re.sub(r"[^\n]", " ", src[i:j]))
            i = j
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(c + re.sub(r"[^\n]", " ", src[i + 1:j - 1]) + (c if j - i > 1 else ""))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def violations(src: str, name: str = "<src>") -> list[str]:
    """'name:line: why: `source line`' for every forbidden pattern in ``src``."""
    code = strip_comments_and_strings(src)
    lines = src.splitlines()
    found: dict[int, list[str]] = {}
    for why, rx in COMPILED:
        for m in rx.finditer(code):
            whys = found.setdefault(code.count("\n", 0, m.start()) + 1, [])
            if why not in whys:
                whys.append(why)
    return [f"{name}:{ln}: {', '.join(found[ln])}: `{lines[ln - 1].strip()}`" for ln in sorted(found)]


def glue_files(cuda_dir: pathlib.Path = CUDA_DIR) -> list[pathlib.Path]:
    return sorted(p for ext in EXTENSIONS for p in cuda_dir.glob(ext) if p.name not in OWNER)


def test_no_host_copy_or_host_read_in_the_cuda_glue():
    files = glue_files()
    # the glue is there (not moved away, which would make this test pass vacuously)
    assert any("TORCH_LIBRARY_IMPL(stabkernels_C, CUDA" in p.read_text() for p in files + list(
        CUDA_DIR.glob("launch_plan.*"))), f"no CUDA op registrations found under {CUDA_DIR}"
    bad = [v for p in files for v in violations(p.read_text(), str(p.relative_to(ROOT)))]
    assert not bad, (f"{len(bad)} host copies/reads in the CUDA glue (only csrc/cuda/launch_plan.cpp may upload "
                     "tables; index with a cached device index tensor, keep scalars as kernel arguments or device "
                     "tensors, cast with a dtype-only .to(dtype)):\n  " + "\n  ".join(bad))


def cuda_registrations(cuda_dir: pathlib.Path = CUDA_DIR) -> dict[str, list[str]]:
    """op -> the files of ``cuda_dir`` whose ``TORCH_LIBRARY_IMPL(stabkernels_C, CUDA, m)`` blocks ``m.impl`` it
    (the glue is one file per family, each registering its own ops)."""
    found: dict[str, list[str]] = {}
    for p in glue_files(cuda_dir):
        code = strip_comments_and_strings(p.read_text())
        text = p.read_text()  # the op names are string literals: read them at the blanked code's offsets
        for block in re.finditer(r"TORCH_LIBRARY_IMPL\(\s*stabkernels_C\s*,\s*CUDA\s*,\s*m\s*\)\s*\{([^}]*)\}", code):
            body = text[block.start(1):block.end(1)]
            for op in re.findall(r'm\.impl\(\s*"(\w+)"', body):
                found.setdefault(op, []).append(p.name)
    return found


def test_each_op_with_a_cuda_kernel_is_registered_once_for_cuda():
    """The CUDA kernels that Python's backend table promises (``register_kernels(..., cuda=True)``) are exactly
    those the glue files register for the CUDA key, each in one file: a registration lost or doubled when the
    glue is reorganised would otherwise show only on a GPU (a missing kernel, or a load-time error)."""
    import stabkernels  # noqa: F401  (registers every op's backends)
    from stabkernels import backend

    regs = cuda_registrations()
    assert {op: files for op, files in regs.items() if len(files) > 1} == {}
    defined = set(re.findall(r'm\.def\(\s*"(\w+)', (ROOT / "csrc" / "stabkernels.cpp").read_text()))
    assert set(regs) <= defined, sorted(set(regs) - defined)

    def has_cuda(op):
        try:
            backend.implementation(op, "cuda")
        except KeyError:
            return False
        return True

    promised = {op for op in backend.ops() if has_cuda(op)}
    assert set(regs) == promised, (sorted(promised - set(regs)), sorted(set(regs) - promised))


# --------------------------------------------------------------------------------------------------
# the scanner itself


@pytest.mark.parametrize("line", [
    "out.index_copy_(0, at::tensor(idx, at::kLong).to(out.device()), sums);",
    "auto t = torch::tensor({1, 2});",
    "at::Tensor dev = host.to(device, /*non_blocking=*/true);",
    "at::Tensor s = step_scale.to(params[0].device(), at::kDouble);",
    "auto g = grad_scale.to(logits.device(), acc).reshape({1});",
    "auto g = x.to(at::kCUDA);",
    "auto g = x.to(y.options());",
    "auto g = x.to(c10::Device(c10::kCUDA, 0));",
    "auto g = x.to(\n    sigma.device());",
    "const at::Tensor keys = keys_in.cpu();",
    "auto h = at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));",
    "double v = t.item<double>();",
    "double v = t.item().toDouble();",
    "if (at::equal(a, b)) {}",
    "auto nz = mask.nonzero();",
    "cudaMemcpyAsync(d, h, n, cudaMemcpyHostToDevice, stream);",
    "cudaStreamSynchronize(stream);",
    "auto w = at::from_blob(ptr, {n}, at::kLong);",
])
def test_the_scanner_refuses(line):
    assert violations(line), line


@pytest.mark.parametrize("line", [
    "sums.to(out.scalar_type());",
    "auto s = h_in.to(acc);",
    "return (1.0 / (sums.sqrt() + 1e-12)).to(at::kFloat).to(at::kDouble);",
    "at::Tensor out = at::zeros({T}, params[0].options().dtype(grouped_acc(params)));",
    "out.index_copy_(0, plan.index(dtype), sums.to(out.scalar_type()));",
    '  TORCH_CHECK(ok, "pass a device tensor, not x.cpu() or at::tensor(...)");',
    "  // was: at::tensor(idx, at::kLong).to(out.device())",
    "  /* keys.cpu() */ auto k = keys;",
    "auto to_device = 3;  // a name containing to, not a call",
])
def test_the_scanner_accepts(line):
    assert violations(line) == [], line


def test_launch_plan_is_the_exception(tmp_path):
    (tmp_path / "launch_plan.cpp").write_text("auto t = at::tensor(cols, at::kLong).to(device, true);\n")
    (tmp_path / "glue.cpp").write_text("// TORCH_LIBRARY_IMPL(stabkernels_C, CUDA, m)\nauto x = y.to(acc);\n")
    (tmp_path / "losses.cpp").write_text("\n\nauto k = keys.cpu();\n")
    files = glue_files(tmp_path)
    assert [p.name for p in files] == ["glue.cpp", "losses.cpp"]
    assert [v for p in files for v in violations(p.read_text(), p.name)] == [
        "losses.cpp:3: copy to the host: `auto k = keys.cpu();`"]
