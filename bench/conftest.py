"""pytest-benchmark front end: `pytest --benchmark` (or `pytest bench --benchmark-only`) times every case of every
bench_*.py module, through the same harness as compare.py.

Each `test_<op>(bench_case)` is parametrized over the op's matrix, one test per provider, named
`test_short_attention[train-B2-N8192-S110-Dk256-Dv256-fp32-cpu-fwd-reference]`; pytest-benchmark's group is
the competing set, so `--benchmark-compare` matches cases across commits. The first test of a group that runs
measures all of the group's selected providers together in interleaved rounds (harness.measure_group), and
each test then hands its provider's per-round times to pytest-benchmark. Peak memory, the same-run ratio to
the reference (x_ref) and GB/s or TFLOP/s go to extra_info, and the ratios are summarised at the end.
CUDA cases skip without a GPU; GPU-sized cases skip on CPU unless --bench-large (options: ../conftest.py).
"""

from __future__ import annotations

import harness
import pytest
import torch

_SELECTED: dict = {}  # group name -> [Case] whose tests were collected (after -k / -m deselection)
_MEASURED: dict = {}  # group name -> {provider: Row}


def pytest_collect_file(file_path, parent):
    # bench_*.py are benchmark modules; files named on the command line are collected by pytest itself.
    if file_path.name.startswith("bench_") and file_path.suffix == ".py" and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    op = metafunc.function.__name__.removeprefix("test_")
    bench = next(value for value in vars(metafunc.module).values()
                 if isinstance(value, harness.OpBench) and value.op == op)
    choice = metafunc.config.getoption("--bench-device")
    dtypes = metafunc.config.getoption("--bench-dtypes")
    params = []
    for device in ("cpu", "cuda") if choice == "all" else (choice,):
        large = metafunc.config.getoption("--bench-large")
        for case in bench.cases(device, dtypes=dtypes.split(",") if dtypes else None, large=large):
            group = case.group(device)
            no_gpu = device == "cuda" and not torch.cuda.is_available()
            marks = [pytest.mark.skip(reason="no CUDA device")] if no_gpu else []
            case_id = f"{group[len(case.op) + 1:-1]}-{case.provider.name}"
            params.append(pytest.param((case, device, group), id=case_id, marks=marks))
    metafunc.parametrize("bench_case", params, indirect=True)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "bench_case" in callspec.params:
            case, _, group = callspec.params["bench_case"]
            _SELECTED.setdefault(group, []).append(case)


def _record_times(benchmark, times_ms: list) -> None:
    """The one private touch point: per-round times measured by the harness (interleaved, or by CUDA events)
    become this test's pytest-benchmark statistics. pytest-benchmark has no public call for times measured
    elsewhere; its fixture's statistics factory and mode flag, what pedantic() itself uses, are stable since
    pytest-benchmark 3."""
    if not hasattr(benchmark, "_make_stats"):
        raise RuntimeError("this pytest-benchmark's fixture has no _make_stats; bench/conftest.py was written "
                           "against pytest-benchmark 3 to 5")
    benchmark._mode = "harness.measure_group"
    stats = benchmark._make_stats(1)
    for ms in times_ms:
        stats.update(ms * 1e-3)


@pytest.fixture
def bench_case(request, benchmark):
    case, device_type, group = request.param
    device = torch.device(device_type)

    def run():
        if benchmark.disabled:  # --benchmark-disable: a smoke run, each pass called once
            try:
                workload = case.provider.make(case.shape, harness.DTYPES[case.dtype], device)
                benchmark.pedantic(workload.passes[case.pass_]())
            except (harness.Unsupported, KeyError) as exc:
                pytest.skip(str(exc))
            return
        if group not in _MEASURED:
            budget = harness.Budget.for_device(device, quick=request.config.getoption("--bench-quick"))
            rows = harness.measure_group(_SELECTED.get(group, [case]), device, budget)
            _MEASURED[group] = {row.provider: row for row in rows}
        row = _MEASURED[group].get(case.provider.name)
        if row is None or not row.ok:
            pytest.skip(row.status if row else "not measured")
        benchmark.group = group
        _record_times(benchmark, row.times_ms)
        extra = {"dims": " ".join(f"{k}={v}" for k, v in row.dims.items()), "peak_mib": row.peak_mib,
                 "x_ref": row.vs_reference, "gbps": row.gbps, "tflops": row.tflops, "note": row.note}
        benchmark.extra_info.update({key: value for key, value in extra.items() if value is not None})

    return run


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter):
    if not _MEASURED:
        return
    terminalreporter.write_sep("-", "x ref: median over interleaved rounds of reference time / case time (> 1: faster)")
    width = max(map(len, _MEASURED))
    for group, rows in _MEASURED.items():
        ratios = [f"{name} {row.vs_reference:.3g}" for name, row in rows.items()
                  if row.vs_reference is not None and name != harness.REFERENCE]
        terminalreporter.write_line(f"{group:<{width}}  " + ("  ".join(ratios) or "no reference case in this run"))
