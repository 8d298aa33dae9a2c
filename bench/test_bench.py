"""Every family's kernel benchmarks under pytest-benchmark (the cases of ``python -m stabkernels bench``):

    python -m pytest bench --benchmark-only [--quick] [-k spectral]
"""
import torch


def test_bench(benchmark, family, bench_case, impl, fn):
    benchmark.group = f"{family}: {bench_case.op} {bench_case.shape} {bench_case.dtype}"
    if torch.cuda.is_available():
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    benchmark.pedantic(timed, rounds=20, warmup_rounds=2)
    benchmark.extra_info["GB/s"] = bench_case.nbytes / benchmark.stats.stats.median / 1e9
