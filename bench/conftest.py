"""pytest-benchmark suites over the same cases as ``python -m stabkernels bench``.

    python -m pytest bench --benchmark-only [--quick]

Each group holds one case: the torch baseline and every compiled backend, so pytest-benchmark's table
shows them side by side (its "(x.x)" columns are ratios to the fastest in the group)."""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="CI-size shapes")


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    from stabkernels.benchmarks.cases import FAMILIES

    device = "cuda" if torch.cuda.is_available() else "cpu"
    params = []
    for family, cases in FAMILIES.items():
        for case in cases(device, metafunc.config.getoption("--quick")):
            for name, fn in {"baseline": case.baseline, **case.candidates}.items():
                params.append(pytest.param(family, case, name, fn,
                                           id=f"{family}-{case.op}-{case.shape}-{case.dtype}-{name}"))
    metafunc.parametrize("family,bench_case,impl,fn", params)
