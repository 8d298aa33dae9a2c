"""Kernel benchmarks: each family's cases (op, shape, dtype, torch baseline, one function per backend),
timed side by side in one run. Used by ``python -m stabkernels bench`` and by the pytest-benchmark suites
in the repository's ``bench/`` folder, so both measure exactly the same thing."""
