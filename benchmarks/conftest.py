"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only`` (see test_bench_providers.py).

Kept apart from tests/ (pytest.ini's testpaths): no Triton interpreter here, real kernels only.
"""
