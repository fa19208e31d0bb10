"""pytest-benchmark wiring: `pytest bench --benchmark-only` times every case of every bench_*.py module.

Each `test_<op>(bench_case)` is parametrized over the op's OpBench matrix for CPU and CUDA. CUDA cases
skip without a GPU; GPU-sized cases skip on CPU unless --bench-large. Timing goes through
pytest-benchmark's pedantic mode (its own stats and JSON); the call synchronizes on GPU and the L2 flush
runs in the untimed setup. Peak memory, roofline numbers and the cache label go to extra_info.
compare.py runs the same matrix with CUDA-event timing and writes the result files.
"""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import utils  # noqa: E402

_WORKLOADS: dict = {}  # one live workload, reused across the passes of a provider


def pytest_addoption(parser):
    group = parser.getgroup("annkernels bench")
    group.addoption("--bench-large", action="store_true", help="also time GPU-sized cases on CPU")
    group.addoption("--bench-device", default="all", choices=("all", "cpu", "cuda"), help="devices to enumerate")
    group.addoption("--bench-quick", action="store_true", help="fewer repetitions (smoke run)")
    group.addoption("--bench-dtypes", default=None, help="comma-separated dtypes (default: per device)")


def pytest_collect_file(file_path, parent):
    # Files named on the command line are already collected by pytest itself.
    if file_path.name.startswith("bench_") and file_path.suffix == ".py" and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _bench_for(metafunc):
    op = metafunc.function.__name__.removeprefix("test_")
    module = metafunc.module
    for bench in getattr(module, "BENCHES", (module.BENCH,)):
        if bench.op == op:
            return bench
    raise LookupError(f"{module.__name__} has no OpBench for {metafunc.function.__name__}")


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    bench = _bench_for(metafunc)
    choice = metafunc.config.getoption("--bench-device")
    devices = ("cpu", "cuda") if choice == "all" else (choice,)
    large = metafunc.config.getoption("--bench-large")
    dtypes = metafunc.config.getoption("--bench-dtypes")
    dtypes = dtypes.split(",") if dtypes else None
    params = []
    for device in devices:
        for shape, dtype, provider, pass_, skip in bench.cases(device, include_large=large, dtypes=dtypes):
            if device == "cuda" and not torch.cuda.is_available():
                skip = "no CUDA device"
            marks = [pytest.mark.skip(reason=skip)] if skip else []
            case_id = f"{device}-{shape.name}-{dtype}-{provider.name}-{pass_}"
            params.append(pytest.param((bench.op, shape, dtype, provider, pass_, device), id=case_id, marks=marks))
    metafunc.parametrize("bench_case", params, indirect=True)


@pytest.fixture
def bench_case(request, benchmark):
    op, shape, dtype, provider, pass_, device_type = request.param
    device = torch.device(device_type)
    key = (op, shape.name, dtype, provider.name, device_type)

    def run():
        torch.manual_seed(0)
        if key not in _WORKLOADS:
            _WORKLOADS.clear()
            try:
                _WORKLOADS[key] = provider.make(shape, utils.DTYPES[dtype], device)
            except utils.Unsupported as exc:
                pytest.skip(str(exc))
        workload = _WORKLOADS[key]
        fn = workload.passes[pass_]()
        budget = utils.Budget.for_device(device, quick=request.config.getoption("--bench-quick"))
        start = time.perf_counter()
        fn()  # one-time costs (Triton compile, library setup) land here, untimed by pytest-benchmark
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        estimate = max(time.perf_counter() - start, 1e-6)
        rounds = int(min(budget.max_reps, max(budget.min_reps, budget.measure_s / estimate)))
        # On GPU the first call may have been a compile: always one more warm-up there.
        warmup = max(int(device.type == "cuda"), int(budget.warmup_s / estimate))

        def timed():
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        def flush():
            if device.type == "cuda":
                utils.flush_l2(device)
                torch.cuda.synchronize(device)

        benchmark.group = f"{op}-{shape.name}-{dtype}-{pass_}-{device_type}"
        benchmark.pedantic(timed, setup=flush, rounds=rounds, warmup_rounds=warmup, iterations=1)
        row = utils.empty_row(op, shape, dtype, provider, pass_)
        row["median_ms"] = benchmark.stats.stats.median * 1e3
        delta, total = utils.peak_memory_bytes(fn, device)
        utils.add_roofline(row, workload.flops.get(pass_), workload.bytes.get(pass_), utils.device_name(device))
        benchmark.extra_info.update(
            dims=shape.label(),
            peak_mem_mb=delta / 2**20,
            peak_mem_total_mb=None if total is None else total / 2**20,
            cache="cold-L2" if device.type == "cuda" else "hot",
            **{k: row[k] for k in ("achieved_gbps", "achieved_tflops", "floor_us", "fraction_of_floor") if row[k]},
        )

    return run
