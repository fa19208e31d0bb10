"""Repository-wide pytest options.

`pytest` runs tests/ (testpaths); `pytest --benchmark` runs the benchmark suite in bench/ instead, with
pytest-benchmark's table at the end. The bench's own options live here because pytest reads options
only from the conftest files it loads before collection, and bench/conftest.py is loaded later when
bench/ is reached through `--benchmark`.
"""

from __future__ import annotations

import pathlib

import pytest

BENCH_DIR = pathlib.Path(__file__).parent / "bench"


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true",
                     help="run the kernel benchmarks in bench/ (pytest-benchmark) instead of tests/")
    group = parser.getgroup("annkernels bench")
    group.addoption("--bench-large", action="store_true", help="also time GPU-sized cases on CPU")
    group.addoption("--bench-device", default="all", choices=("all", "cpu", "cuda"), help="devices to enumerate")
    group.addoption("--bench-quick", action="store_true", help="fewer repetitions (smoke run)")
    group.addoption("--bench-dtypes", default=None, help="comma-separated dtypes (default: per device)")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if not config.getoption("--benchmark"):
        return
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError("--benchmark needs pytest-benchmark: pip install -e '.[test]'")
    if config.args_source != pytest.Config.ArgsSource.ARGS:  # no paths given: bench/ instead of testpaths
        config.args[:] = [str(BENCH_DIR)]
