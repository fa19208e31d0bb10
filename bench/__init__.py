"""Benchmarks for annkernels: per-op scripts (pytest-benchmark) and the comparison runner (compare.py)."""
