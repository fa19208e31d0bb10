"""pytest-benchmark front end: `pytest --benchmark` (or `pytest bench --benchmark-only`) times every case of
every bench_*.py module.

Each `test_<op>(bench_case)` is parametrized over the op's OpBench matrix for CPU and CUDA. Ids and
pytest-benchmark groups are stable across runs, so `--benchmark-compare` matches cases of two commits:
the group `short_attention[train-B2-N8192-fp32-cpu-fwd]` holds the competing providers, each case
`test_short_attention[train-B2-N8192-fp32-cpu-fwd-reference]`. CUDA cases skip without a GPU; GPU-sized
cases skip on CPU unless --bench-large (the options are defined in the repository's conftest.py).

Times come from utils.time_case, the path compare.py uses too (CUDA events around each call with the L2
flushed on GPU, perf_counter on CPU), and are handed to pytest-benchmark's statistics. Peak memory,
roofline numbers, the back-to-back time and the same-run ratio to the reference (x_ref) go to
extra_info, so --benchmark-json and --benchmark-autosave keep them; the ratios are also summarised at
the end of the run.
"""

from __future__ import annotations

import pytest
import torch

from bench import utils

_WORKLOADS = utils.WorkloadCache()
_MEDIANS: dict = {}  # group name -> {provider: (median seconds, extra_info)}, in run order


def pytest_collect_file(file_path, parent):
    # Files named on the command line are already collected by pytest itself.
    if file_path.name.startswith("bench_") and file_path.suffix == ".py" and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _bench_for(metafunc) -> utils.OpBench:
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
        for case, skip in bench.cases(device, include_large=large, dtypes=dtypes):
            if device == "cuda" and not torch.cuda.is_available():
                skip = "no CUDA device"
            marks = [pytest.mark.skip(reason=skip)] if skip else []
            group = bench.group_name(case.shape, case.dtype, device, case.pass_)
            case_id = f"{group.removeprefix(bench.op)[1:-1]}-{case.provider.name}"
            params.append(pytest.param((case, device, group), id=case_id, marks=marks))
    metafunc.parametrize("bench_case", params, indirect=True)


def _record_times(benchmark, times_ms: list) -> None:
    """Per-call times measured by utils.time_case become this case's pytest-benchmark statistics.

    pytest-benchmark has no public call for times measured elsewhere (CUDA events); its fixture's
    statistics factory and mode flag, stable since pytest-benchmark 3, are what pedantic() itself uses.
    """
    if not hasattr(benchmark, "_make_stats") or not hasattr(benchmark, "_mode"):
        raise RuntimeError("this pytest-benchmark's fixture has no _make_stats/_mode; bench/conftest.py was "
                           "written against pytest-benchmark 3 to 5")
    benchmark._mode = "bench.utils.time_case"
    stats = benchmark._make_stats(1)
    for ms in times_ms:
        stats.update(ms * 1e-3)


@pytest.fixture
def bench_case(request, benchmark):
    case, device_type, group = request.param
    device = torch.device(device_type)

    def run():
        torch.manual_seed(0)
        if benchmark.disabled:  # --benchmark-disable: a smoke run, pedantic() calls each pass once
            try:
                benchmark.pedantic(_WORKLOADS.get(case, device).passes[case.pass_]())
            except utils.Unsupported as exc:
                pytest.skip(str(exc))
            return
        budget = utils.Budget.for_device(device, quick=request.config.getoption("--bench-quick"))
        try:
            row, times = utils.time_case(case, device, budget, _WORKLOADS)
        except utils.Unsupported as exc:
            pytest.skip(str(exc))
        benchmark.group = group
        _record_times(benchmark, times)
        benchmark.extra_info.update(
            dims=case.shape.label(),
            cache=row["cache"],
            peak_mem_mb=row["peak_mem_mb"],
            **{key: row[key] for key in ("peak_mem_total_mb", "b2b_ms", "b2b_method", "note", "achieved_gbps",
                                         "achieved_tflops", "floor_us", "fraction_of_floor")
               if row[key] is not None},
        )
        _MEDIANS.setdefault(group, {})[case.provider.name] = (row["median_ms"] * 1e-3, benchmark.extra_info)

    return run


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session):
    # Before pytest-benchmark's own sessionfinish writes --benchmark-json / --benchmark-autosave files.
    for providers in _MEDIANS.values():
        reference = providers.get(utils.REFERENCE)
        for median, extra_info in providers.values():
            if reference is not None:
                extra_info.update(x_ref=reference[0] / median, reference_median_s=reference[0])
    yield


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if not _MEDIANS:
        return
    terminalreporter.write_sep("-", "x ref: reference median / case median, same run (> 1: faster than reference)")
    width = max(map(len, _MEDIANS))
    for group, providers in _MEDIANS.items():
        ratios = [f"{name} {extra['x_ref']:.3g}" for name, (_, extra) in providers.items()
                  if "x_ref" in extra and name != utils.REFERENCE]
        if utils.REFERENCE not in providers:
            ratios = ["no reference case in this run"]
        terminalreporter.write_line(f"{group:<{width}}  " + "  ".join(ratios))
