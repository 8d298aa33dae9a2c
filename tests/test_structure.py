"""The package's module structure (docs/architecture.md, "Layers"): no import cycle, and the kernel and
infrastructure modules are leaves that never import the public API (the family ops, the optimizers, the demo).

Two checks: a static one over every ``import``, ``from ... import``, ``__import__("...")`` and
``importlib.import_module("...")`` in stabkernels/ (function-level, lazy imports included), and a dynamic one that
imports each kernel module alone in a fresh interpreter, without running ``stabkernels/__init__.py`` (which
imports the whole public API), and lists what it pulled in."""
import ast
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PKG = REPO / "stabkernels"

# Shared infrastructure a kernel module may import (docs/architecture.md): validation, host reads, launch plans,
# the direction stream's specification, OrthoGrad's coefficients, the compiled extension's loader, backend
# registry, op definition and the distribution helpers.
INFRASTRUCTURE = {
    "stabkernels", "stabkernels._checks", "stabkernels._hostread", "stabkernels._launch_plan", "stabkernels._stream",
    "stabkernels._orthograd", "stabkernels._ext", "stabkernels._C", "stabkernels.backend", "stabkernels._library",
    "stabkernels.distributed", "stabkernels.triton", "stabkernels.triton._common",
}
TRITON_MODULES = sorted(f"stabkernels.triton.{p.stem}" for p in (PKG / "triton").glob("*.py") if p.stem != "__init__")
KERNEL_MODULES = sorted(INFRASTRUCTURE - {"stabkernels", "stabkernels._C", "stabkernels.triton"}) + [
    m for m in TRITON_MODULES if m != "stabkernels.triton._common"]


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return mods


def import_graph(mods=None) -> dict[str, set[str]]:
    """module -> the stabkernels modules it imports anywhere in its source (``from pkg import mod`` counts as
    an import of ``pkg.mod``; the compiled ``stabkernels._C`` is a node of its own)."""
    mods = _modules() if mods is None else mods
    known = set(mods) | {"stabkernels._C"}

    def resolve(name: str) -> str:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for mod, (path, is_pkg) in mods.items():
        base = mod if is_pkg else mod.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out.update(resolve(a.name) for a in node.names if a.name.split(".")[0] == "stabkernels")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    target = base
                    for _ in range(node.level - 1):
                        target = target.rpartition(".")[0]
                    target += "." + node.module if node.module else ""
                else:
                    target = node.module or ""
                if target.split(".")[0] != "stabkernels":
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    out.add(sub if sub in known else resolve(target))
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                fn = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                arg = node.args[0].value
                if fn in ("__import__", "import_module") and isinstance(arg, str) and arg.startswith("stabkernels"):
                    out.add(resolve(arg))
        out.discard(mod)
        graph[mod] = out
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (edges into the root package ``stabkernels`` are
    left out: every submodule's import runs the package's __init__ first, which is not a dependency)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w == "stabkernels" or w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_cycle_detection_sees_a_lazy_upward_import():
    # the shape of the cycle this package had (triton/directional.py importing the public directional.py, which
    # imported it back lazily)
    graph = {"stabkernels.directional": {"stabkernels.triton.directional"},
             "stabkernels.triton.directional": {"stabkernels.directional", "stabkernels._launch_plan"},
             "stabkernels._launch_plan": set()}
    assert cycles(graph) == [["stabkernels.directional", "stabkernels.triton.directional"]]


def test_kernel_modules_import_only_infrastructure_statically():
    graph = import_graph()
    bad = {m: sorted(graph[m] - INFRASTRUCTURE) for m in KERNEL_MODULES if graph[m] - INFRASTRUCTURE}
    assert not bad, f"kernel/infrastructure modules importing the public API or other non-leaf modules: {bad}"


_ALONE = """
import importlib, json, sys, types
pkg = types.ModuleType("stabkernels")  # the package without its __init__ (which imports the public API)
pkg.__path__ = [sys.argv[1]]
sys.modules["stabkernels"] = pkg
importlib.import_module(sys.argv[2])
print(json.dumps(sorted(m for m in sys.modules if m == "stabkernels" or m.startswith("stabkernels."))))
"""


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_kernel_module_imports_alone(module):
    """Imports ``module`` alone in a fresh interpreter; it must load, and pull in infrastructure only."""
    if module.startswith("stabkernels.triton.") and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run([sys.executable, "-c", _ALONE, str(PKG), module], cwd=REPO / "tests", env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = set(json.loads(r.stdout.strip().splitlines()[-1]))
    assert module in loaded
    assert loaded <= INFRASTRUCTURE | {module}, f"{module} imported {sorted(loaded - INFRASTRUCTURE - {module})}"
