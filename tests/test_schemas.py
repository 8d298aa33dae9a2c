"""Each op's schema is written twice, in Python (``define_op`` in stabkernels/*.py: the public, backend-selecting
op ``torch.ops.stabkernels.<op>``, ending in ``str backend``) and in C++ (``m.def`` in ``TORCH_LIBRARY(stabkernels_C,
m)``, csrc/stabkernels.cpp: the raw kernels). These tests fail when the two disagree: argument names, types,
mutability/alias annotations, defaults and returns are compared after parsing with ``torch._C.parse_schema``.

One check reads the C++ source, so it runs without a compiled extension; the other compares the schemas
registered by the loaded ``stabkernels._C``."""
import pathlib
import re

import pytest
import torch

import stabkernels  # noqa: F401  (defines torch.ops.stabkernels.*)
from stabkernels import _ext

REPO = pathlib.Path(__file__).resolve().parent.parent
CPP = REPO / "csrc" / "stabkernels.cpp"


def _alias(info):
    return None if info is None else (sorted(info.before_set), sorted(info.after_set), info.is_write)


def signature(schema: torch._C.FunctionSchema, *, drop_backend: bool) -> dict:
    """The parts of a schema that must agree, as plain data (for readable assertion messages)."""
    args = list(schema.arguments)
    if drop_backend:
        assert args and args[-1].name == "backend" and str(args[-1].type) == "str", \
            f"{schema.name}: a Python op's schema must end in 'str backend': {schema}"
        args = args[:-1]
    return {
        "overload": schema.overload_name,
        "arguments": [(a.name, str(a.type), _alias(a.alias_info), a.default_value, a.kwarg_only) for a in args],
        "returns": [(r.name, str(r.type), _alias(r.alias_info)) for r in schema.returns],
    }


def cpp_schemas(text: str | None = None) -> dict[str, torch._C.FunctionSchema]:
    """The ``m.def("...")`` schemas of TORCH_LIBRARY(stabkernels_C, m) in csrc/stabkernels.cpp, parsed (adjacent
    string literals joined, comments dropped)."""
    text = CPP.read_text() if text is None else text
    body = text[text.index("TORCH_LIBRARY(stabkernels_C, m)"):]
    body = re.sub(r"//[^\n]*", "", body)
    out = {}
    for call in re.findall(r'm\.def\(\s*((?:"(?:[^"\\]|\\.)*"\s*)+)\)', body):
        schema = torch._C.parse_schema("".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call)))
        name = schema.name
        assert name not in out, f"{name} defined twice in {CPP.name}"
        out[name] = schema
    return out


def python_schema(op: str) -> torch._C.FunctionSchema:
    return getattr(torch.ops.stabkernels, op).default._schema


def python_ops() -> set[str]:
    return {name.split("::", 1)[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
            if name.startswith("stabkernels::")}


def test_cpp_source_declares_the_ops():
    ops = cpp_schemas()
    assert len(ops) >= 14 and "sq_norms" in ops and "adam_step_" in ops, sorted(ops)


def test_every_cpp_op_has_a_python_op():
    missing = sorted(set(cpp_schemas()) - python_ops())
    assert not missing, f"ops declared in {CPP.name} without a define_op in stabkernels/: {missing}"


@pytest.mark.parametrize("op", sorted(cpp_schemas()))
def test_python_and_cpp_source_schemas_agree(op):
    py = signature(python_schema(op), drop_backend=True)
    cpp = signature(cpp_schemas()[op], drop_backend=False)
    assert py == cpp, f"{op}: Python {python_schema(op)} vs C++ {cpp_schemas()[op]}"


def test_registered_schemas_agree():
    """The same check on what the loaded extension registered under torch.ops.stabkernels_C."""
    if not _ext.loaded:
        pytest.skip("compiled extension not loaded")
    registered = {name.split("::", 1)[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("stabkernels_C::")}
    assert registered == set(cpp_schemas()), "the loaded _C is stale: rebuild it"
    for op in sorted(registered & python_ops()):
        py = signature(python_schema(op), drop_backend=True)
        cpp = signature(getattr(torch.ops.stabkernels_C, op).default._schema, drop_backend=False)
        assert py == cpp, f"{op}: Python {python_schema(op)} vs C++ {cpp}"


def test_a_changed_schema_is_caught():
    """The comparison sees a dropped mutability annotation, a renamed argument and a changed type."""
    base = cpp_schemas()["power_iteration_"]
    for changed in ("Tensor[] mats, Tensor[] us, Tensor(b!)[] vs, int iters, float eps",
                    "Tensor[] mats, Tensor(a!)[] us, Tensor(b!)[] v, int iters, float eps",
                    "Tensor[] mats, Tensor(a!)[] us, Tensor(b!)[] vs, float iters, float eps"):
        other = torch._C.parse_schema(f"power_iteration_({changed}) -> Tensor")
        assert signature(other, drop_backend=False) != signature(base, drop_backend=False), changed
