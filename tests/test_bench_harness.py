"""The benchmark harness (bench/harness.py, report.py, compare.py, `pytest --benchmark`) measures what it says, on CPU.

These test the machinery, not any kernel's speed: the result file, interleaved rounds and paired ratios, that a
deliberately slowed provider comes out slower, that the CPU peak-memory method sees torch allocations, the
paper comparison's arithmetic, the README tables, and that the real bench modules' providers produce rows.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import bench_blocks
import bench_pyramid_pool
import bench_short_attention
import compare
import harness
import pytest
import report
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Far above the toy op's cost and above the scheduling noise of a loaded, shared 2-core machine.
SLEEP_S = 0.25


def _toy(extra: float = 0.0, fail: bool = False):
    def make(shape, dtype, device):
        if fail:
            raise RuntimeError("this provider is broken on purpose")
        x = torch.randn(shape.dims["n"], shape.dims["n"], dtype=dtype, device=device, requires_grad=True)

        def forward():
            if extra:
                time.sleep(extra)
            return x @ x

        return harness.Workload(harness.autograd_passes(forward, [x]), flops={"fwd": 2 * shape.dims["n"] ** 3})

    return make


def _unsupported(shape, dtype, device):
    raise harness.Unsupported("not for this case")


TOY = harness.OpBench(
    "toy",
    [harness.Shape("small", dict(n=32)), harness.Shape("gpu_only", dict(n=32), cpu=False)],
    dtypes=("float32",),
    providers=lambda device: [
        harness.Provider("reference", _toy()),
        harness.Provider("slowed", _toy(extra=SLEEP_S), kind="peer"),
        harness.Provider("broken", _toy(fail=True)),
        harness.Provider("unsupported", _unsupported),
    ],
)


@pytest.fixture(scope="module")
def toy_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_results") / "toy"
    args = compare.get_args_parser().parse_args(["--device", "cpu", "--quick", "--output", str(out)])
    path = compare.run(args, benches=[TOY])
    return harness.read_results(path), path


def test_result_file_round_trips_typed_rows(toy_result):
    (env, config, rows), path = toy_result
    for key in ("device", "torch", "git_commit", "torch_threads", "load_avg_1m", "load_avg_1m_end", "timing"):
        assert key in env, key
    assert config["suite"] == "cpu" and config["quick"]
    assert len(rows) == 12  # gpu_only is not a CPU shape: 1 shape x 4 providers x 3 passes
    assert all(isinstance(row, harness.Row) for row in rows)
    status = {(r.provider, r.pass_): r.status for r in rows}
    assert status[("broken", "fwd")].startswith("error: RuntimeError: this provider is broken")
    assert status[("unsupported", "bwd")] == "skipped: not for this case"
    for row in rows:
        if row.ok:
            assert len(row.times_ms) == len(row.cpu_ms) >= 2 and row.p20_ms <= row.median_ms <= row.p80_ms
            assert row.peak_mib is not None and row.peak_mib >= 0
    fwd = next(r for r in rows if r.provider == "reference" and r.pass_ == "fwd")
    assert fwd.tflops == pytest.approx(2 * 32**3 / (fwd.median_ms * 1e-3) / 1e12)
    markdown = open(os.path.splitext(path)[0] + ".md").read()
    assert "| small | n=32 | float32 | fwd | slowed |" in markdown and "broken: error" in markdown


def test_ratios_are_paired_by_round(toy_result):
    (_, _, rows), _ = toy_result
    for pass_ in harness.PASSES:
        reference = next(r for r in rows if r.provider == "reference" and r.pass_ == pass_)
        for row in (r for r in rows if r.pass_ == pass_):
            if not row.ok:
                assert row.vs_reference is None
                continue
            ratios = [a / b for a, b in zip(reference.times_ms, row.times_ms, strict=True)]
            assert row.vs_reference == pytest.approx(harness.quantiles(ratios)[0])


def test_slowed_provider_is_slower(toy_result):
    (_, _, rows), _ = toy_result
    for pass_ in ("fwd", "full"):  # bwd does not re-run the forward, where the sleep is
        slowed = next(r for r in rows if r.provider == "slowed" and r.pass_ == pass_)
        assert min(slowed.times_ms) >= SLEEP_S * 1e3 and slowed.vs_reference < 1
        assert slowed.vs_reference_p80 < 1  # every round, not just the median
        assert max(slowed.cpu_ms) < SLEEP_S * 1e3  # sleeping costs wall time, not CPU time


def test_rounds_interleave_in_rotated_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = harness.time_group(fns, torch.device("cpu"), harness.Budget(0.0, 3, 3))
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")  # warm-up, then rounds 0, 1, 2
    assert all(len(wall) == len(cpu) == 3 for wall, cpu in times.values())


def test_cpu_peak_memory_sees_torch_allocations():
    kept = torch.ones(4 * 2**20, dtype=torch.uint8)  # allocated before: must not count

    def two_live_then_one():
        first = torch.ones(8 * 2**20, dtype=torch.uint8)
        second = torch.ones(4 * 2**20, dtype=torch.uint8)
        del first, second
        return torch.ones(2**20, dtype=torch.uint8)

    assert 12 * 2**20 <= harness.peak_memory_bytes(two_live_then_one, torch.device("cpu")) < 12.5 * 2**20
    assert kept.numel() == 4 * 2**20


def test_quantiles():
    assert harness.quantiles([5.0, 1.0, 3.0, 2.0, 4.0]) == (3.0, 1.8, 4.2)
    assert harness.quantiles([7.0]) == (7.0, 7.0, 7.0)


@pytest.mark.parametrize("bench, dims, peers", [
    (bench_pyramid_pool.BENCH, dict(B=1, C=8, H=9, W=13), {"torch_pool_cat"}),  # odd map: overlapping bins
    (bench_short_attention.BENCH, dict(B=1, N=40, S=11, Dk=8, Dv=8), {"sdpa", "gemm_only"}),
    (bench_blocks.BENCH, dict(B=1, C=16, H=5, W=7, mode="eval"), {"nonlocal_matmul", "nonlocal_sdpa", "fuse_only"}),
])
def test_real_providers_produce_rows(bench, dims, peers):
    shape = harness.Shape("tiny", dims)
    rows = []
    for pass_ in harness.PASSES:
        group = [harness.Case(bench.op, shape, "float32", provider, pass_) for provider in bench.providers("cpu")]
        rows += harness.measure_group(group, torch.device("cpu"), harness.Budget(0.0, 2, 2), memory=False)
    assert peers <= {row.provider for row in rows}
    assert all(row.ok for row in rows), [(row.provider, row.status) for row in rows if not row.ok]
    assert all(row.vs_reference is not None for row in rows)


def _apnb_row(provider, kind, times, mib, n=2048):
    dims = dict(B=1, C=2048, H=32, W=n // 32, mode="eval")
    return harness.Row("apnb", f"n{n}", dims, "float32", provider, kind, "fwd", times_ms=list(times),
                       median_ms=harness.quantiles(times)[0], peak_mib=mib)


def test_paper_comparison_raw_and_net_of_the_fuse():
    rows = [_apnb_row("cpu", "backend", [3.0, 6.0, 3.0], 110.0),
            _apnb_row("nonlocal_matmul", "peer", [12.0, 24.0, 9.0], 400.0),
            _apnb_row("fuse_only", "peer", [2.0, 4.0, 1.0], 100.0)]
    (item,) = report.paper_comparisons(rows)
    assert item["time"] == pytest.approx(4.0)  # per-round ratios 4, 4, 3
    assert item["time_net"] == pytest.approx(10.0)  # (12-2)/(3-2), (24-4)/(6-4), (9-1)/(3-1) = 10, 10, 4
    assert item["memory"] == pytest.approx(400 / 110) and item["memory_net"] == pytest.approx(30.0)
    table = "\n".join(report.paper_table([item]))
    assert "| 2048 = 32x64 | 2048 | cpu | nonlocal_matmul | 3 | 12 | 2 | **4x** | 10x |" in table


def test_paper_plot_and_readme_tables(tmp_path, monkeypatch):
    env = harness.environment(torch.device("cpu"))
    rows = []
    for n, scale in ((2048, 1.0), (8192, 3.0)):
        rows += [_apnb_row("cpu", "backend", [3.0 * scale] * 2, 110.0 * scale, n),
                 _apnb_row("nonlocal_matmul", "peer", [12.0 * scale**2] * 2, 400.0 * scale**2, n),
                 _apnb_row("fuse_only", "peer", [2.0 * scale] * 2, 100.0 * scale, n)]
    monkeypatch.setattr(report, "RESULTS_DIR", str(tmp_path))
    path = str(tmp_path / "paper-test.json")
    harness.write_results(path, env, {"suite": "paper"}, rows)
    assert report.write_report(path) == [str(tmp_path / "paper-test.md"), str(tmp_path / "paper-test.png")]
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:paper -->\nstale\n<!-- /bench:paper -->\nend\n")
    assert report.update_readmes([str(readme)]) == [str(readme)]
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro\n<!-- bench:paper -->\nMeasured: ") and text.endswith("end\n")
    assert "| 8192 = 32x256 | 2048 | cpu | nonlocal_matmul |" in text
    assert report.update_readmes([str(readme)]) == []  # regenerating changes nothing


def test_compare_runs_as_a_script_from_the_root(tmp_path):
    """`python bench/compare.py`: the bench modules find each other with no path edits."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "bench/compare.py", "--device", "cpu", "--ops", "pyramid_pool",
                           "--shapes", "small_kv", "--providers", "cpu", "--quick", "--no-memory",
                           "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    _, _, rows = harness.read_results(str(out) + ".json")
    assert {(row.provider, row.pass_) for row in rows if row.ok} == {(p, s) for p in ("reference", "cpu")
                                                                      for s in harness.PASSES}


def test_model_providers_produce_rows():
    pytest.importorskip("annkernels.models")
    import bench_model

    shape = harness.Shape("tiny", dict(model="ann_r18_d8", B=1, H=64, W=64), passes=("infer",))
    wanted = [p for p in bench_model.providers("cpu") if p.name in ("reference", "cpu", "folded", "onnxruntime")]
    rows = harness.measure_group([harness.Case("model", shape, "float32", p, "infer") for p in wanted],
                                 torch.device("cpu"), harness.Budget(0.0, 2, 2), memory=False)
    assert all(row.ok and row.items_per_s > 0 for row in rows), [(row.provider, row.status) for row in rows]


def test_pytest_benchmark_flag_runs_the_bench_and_prints_ratios(tmp_path):
    """`pytest --benchmark` from the root: bench/ with pytest-benchmark's table, then the x ref summary."""
    saved, storage = tmp_path / "run.json", f"--benchmark-storage={tmp_path / 'storage'}"

    def run_bench(*args):
        done = subprocess.run([sys.executable, "-m", "pytest", "--benchmark", "--bench-quick", "--bench-device", "cpu",
                               "-p", "no:cacheprovider", storage, *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    stdout = run_bench("-k", "pyramid_pool and small_kv and fwd", f"--benchmark-json={saved}", "--benchmark-autosave")
    group = "pyramid_pool[small_kv-B1-C512-H32-W64-fp32-cpu-fwd]"
    assert f"benchmark '{group}'" in stdout  # pytest-benchmark's table, one group per competing set
    summary = stdout[stdout.index("x ref: median over interleaved rounds"):]
    number = r"\d+(\.\d+)?"
    providers = r"\s+".join(f"{name} {number}" for name in ("cpu", "composite", "cpu_pair", "torch_pool_cat"))
    assert re.search(rf"^{re.escape(group)}\s+{providers}", summary, re.MULTILINE), summary
    cases = {bench["name"]: bench for bench in json.loads(saved.read_text())["benchmarks"]}
    ids = group[len("pyramid_pool["):-1]
    providers = ("reference", "cpu", "composite", "cpu_pair", "torch_pool_cat")
    assert set(cases) == {f"test_pyramid_pool[{ids}-{p}]" for p in providers}
    for bench in cases.values():
        assert bench["group"] == group and bench["extra_info"]["peak_mib"] >= 0
        assert bench["stats"]["rounds"] >= 2
    assert cases[f"test_pyramid_pool[{ids}-reference]"]["extra_info"]["x_ref"] == 1.0
    # pytest-benchmark's regression check finds the saved run's case under the same name.
    name = f"test_pyramid_pool[{ids}-reference]"
    compared = run_bench("-k", "pyramid_pool and small_kv and fwd and reference", "--benchmark-compare",
                         "--benchmark-compare-fail=median:1000%")
    assert f"{name} (NOW)" in compared and re.search(rf"{re.escape(name)} \(0001_", compared), compared
