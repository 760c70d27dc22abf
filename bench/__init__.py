"""Macula benchmarks: raw model throughput (bench_models.py) and serving under load (run_serving.py).

Scripts, not tests: they measure and report, they never assert a speed. See docs/benchmarks.md.
"""
