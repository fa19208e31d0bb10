"""The benchmark harness (bench/utils.py, bench/compare.py, `pytest --benchmark`) measures what it says, on CPU.

These test the machinery, not any kernel's speed: the result file schema, ratios taken from one run,
that a deliberately slowed provider comes out slower, that the CPU peak-memory method sees torch
allocations, and that the real bench modules' providers produce rows.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from bench import compare, utils

# Far above the toy op's cost and above the scheduling noise of a loaded, shared 2-core machine, where a
# 32x32 matmul was seen to take 50-120 ms of wall time.
SLEEP_S = 0.25


def _toy_workload(extra: float = 0.0, fail: bool = False):
    def make(shape, dtype, device):
        if fail:
            raise RuntimeError("this provider is broken on purpose")
        x = torch.randn(shape.dims["n"], shape.dims["n"], dtype=dtype, device=device, requires_grad=True)

        def forward():
            if extra:
                time.sleep(extra)
            return x @ x

        flops = {"fwd": 2 * shape.dims["n"] ** 3}
        return utils.Workload(utils.autograd_passes(forward, [x]), flops=flops, bytes={"fwd": 3 * x.numel() * 4})

    return make


def _unsupported(shape, dtype, device):
    raise utils.Unsupported("not for this case")


TOY = utils.OpBench(
    "toy",
    [utils.Shape("small", dict(n=32)), utils.Shape("gpu_only", dict(n=32), cpu=False)],
    dtypes=("float32",),
    providers=lambda device: [
        utils.Provider("reference", _toy_workload()),
        utils.Provider("slowed", _toy_workload(extra=SLEEP_S), kind="peer"),
        utils.Provider("broken", _toy_workload(fail=True)),
        utils.Provider("unsupported", _unsupported),
    ],
)


@pytest.fixture(scope="module")
def toy_result(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench_results")
    args = compare.get_args_parser().parse_args(["--device", "cpu", "--quick", "--out-dir", str(out_dir)])
    stem = compare.run(args, benches=[TOY])
    with open(stem + ".json") as handle:
        return json.load(handle), stem


def test_result_file_schema(toy_result):
    document, stem = toy_result
    assert os.path.basename(stem).endswith(datetime.date.today().isoformat())
    assert document["schema_version"] == utils.SCHEMA_VERSION
    assert len(document["run_id"]) == 32
    for key in ("device", "torch", "triton", "git_commit", "torch_threads", "date_utc", "tf32_matmul",
                "peak_memory_method", "timing"):
        assert key in document["env"], key
    assert document["fields"] == list(utils.ROW_FIELDS)
    # gpu_only is size-gated on CPU: 1 shape x 4 providers x 3 passes.
    assert len(document["rows"]) == 12
    for row in document["rows"]:
        assert list(row) == list(utils.ROW_FIELDS)
        assert row["pass"] in utils.PASSES
        if row["status"] == "ok":
            assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
            assert row["reps"] >= 2 and row["peak_mem_mb"] >= 0 and row["cache"] == "hot"
    statuses = {(r["backend"], r["pass"]): r["status"] for r in document["rows"]}
    assert statuses[("broken", "fwd")].startswith("error: RuntimeError: this provider is broken")
    assert statuses[("unsupported", "bwd")] == "skipped: not for this case"
    fwd = next(r for r in document["rows"] if r["backend"] == "reference" and r["pass"] == "fwd")
    assert fwd["gflop"] == pytest.approx(2 * 32**3 / 1e9)
    assert fwd["achieved_tflops"] == pytest.approx(2 * 32**3 / (fwd["median_ms"] * 1e-3) / 1e12)
    assert fwd["floor_us"] is None  # no floors for CPUs
    markdown = open(stem + ".md").read()
    assert "| small | n=32 | float32 | slowed | fwd |" in markdown
    assert "broken fwd: error" in markdown and "Noise" in markdown


def test_ratios_come_from_the_same_run(toy_result):
    document, _ = toy_result
    rows = document["rows"]
    reference = {r["pass"]: r for r in rows if r["backend"] == "reference"}
    for row in rows:
        if row["status"] != "ok":
            assert row["speedup_vs_reference"] is None
            continue
        ref = reference[row["pass"]]
        assert row["reference_median_ms"] == ref["median_ms"]
        assert row["speedup_vs_reference"] == pytest.approx(ref["median_ms"] / row["median_ms"])


def test_slowed_provider_is_slower(toy_result):
    document, _ = toy_result
    for pass_ in utils.PASSES:
        slowed = next(r for r in document["rows"] if r["backend"] == "slowed" and r["pass"] == pass_)
        if pass_ == "bwd":  # the sleep is in the forward, which bwd does not re-run
            continue
        assert slowed["median_ms"] >= SLEEP_S * 1e3
        assert slowed["speedup_vs_reference"] < 1
        assert slowed["cpu_time_ms"] < SLEEP_S * 1e3  # sleeping costs wall time, not CPU time


def test_cpu_peak_memory_sees_torch_allocations():
    kept = torch.ones(4 * 2**20, dtype=torch.uint8)  # allocated before: must not count

    def two_live_then_one():
        first = torch.ones(8 * 2**20, dtype=torch.uint8)
        second = torch.ones(4 * 2**20, dtype=torch.uint8)
        del first, second
        return torch.ones(2**20, dtype=torch.uint8)

    delta, total = utils.peak_memory_bytes(two_live_then_one, torch.device("cpu"))
    assert 12 * 2**20 <= delta < 12.5 * 2**20
    assert total is None and kept.numel() == 4 * 2**20


def test_quantiles_and_roofline_arithmetic():
    assert utils.quantiles([5.0, 1.0, 3.0, 2.0, 4.0]) == {"median_ms": 3.0, "p20_ms": 1.8, "p80_ms": 4.2}
    peaks = utils.DEVICE_PEAKS["H100"]
    # docs/performance.md section 4: N=8192 Dv=256 bf16 forward is memory-bound at 2.8 us.
    floor, bound = utils.floor_seconds(0.93e9, 8.5e6, "bfloat16", peaks)
    assert bound == "memory" and floor * 1e6 == pytest.approx(2.83, abs=0.01)
    floor, bound = utils.floor_seconds(0.93e9, 17e6, "float32", peaks)
    assert (bound == "compute") != utils.tf32_enabled()
    # The H200 moves the same bytes 4.3 / 3.0 times faster: about 2.0 us per image.
    h200 = utils.device_peaks("NVIDIA H200")
    floor, bound = utils.floor_seconds(0.93e9, 8.5e6, "bfloat16", h200)
    assert bound == "memory" and floor * 1e6 == pytest.approx(1.98, abs=0.01)
    assert utils.device_peaks("NVIDIA H100 80GB HBM3") is peaks and utils.device_peaks("AMD EPYC") is None


@pytest.mark.parametrize(
    "module_name, dims, peer",
    [
        ("bench_pyramid_pool", dict(B=1, C=8, H=9, W=13), "torch_pool_cat"),  # odd map: overlapping bins
        ("bench_short_attention", dict(B=1, N=40, S=11, Dk=8, Dv=8), "sdpa"),
    ],
)
def test_real_providers_produce_rows(module_name, dims, peer):
    module = __import__(f"bench.{module_name}", fromlist=["BENCH"])
    shape = utils.Shape("tiny", dims)
    cases = [utils.Case(module.BENCH.op, shape, "float32", provider, pass_)
             for provider in module.BENCH.providers("cpu") for pass_ in utils.PASSES]
    rows = utils.run_cases(cases, torch.device("cpu"), utils.Budget(0.0, 0.0, 2, 2), memory=False)
    assert peer in {r["backend"] for r in rows}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows if r["status"] != "ok"]
    utils.attach_reference_ratios(rows)
    if any(r["backend"] == "reference" for r in rows):
        assert all(r["speedup_vs_reference"] is not None for r in rows)


def test_from_json_redraws_report(toy_result, tmp_path):
    document, stem = toy_result
    copy = tmp_path / "copy.json"
    copy.write_text(json.dumps(document))
    compare.main(["--from-json", str(copy)])
    assert (tmp_path / "copy.md").read_text() == open(stem + ".md").read()
    assert not glob.glob(str(tmp_path / "*.png"))  # the toy op has nothing to plot


def test_gpu_report_paths_render(tmp_path):
    """Rows shaped like a GPU run (floors, paper comparison, model memory) render into all three plots."""
    env = utils.environment(torch.device("cpu"))
    env.update(device="NVIDIA H200", device_type="cuda")
    rows = []
    providers = (("reference", "backend", 1.0), ("triton", "backend", 0.5), ("sdpa_flash", "peer", 0.7))
    for backend, kind, scale in providers:
        for n in (8192, 32768):
            shape = utils.Shape(f"n{n}", dict(B=1, N=n, S=110, Dk=256, Dv=256))
            row = utils.empty_row(utils.Case("short_attention", shape, "bfloat16", utils.Provider(backend, None, kind),
                                             "fwd"))
            row.update(status="ok", median_ms=scale * n / 1e3, p20_ms=0.0, p80_ms=1.0, peak_mem_mb=n / 1e3,
                       b2b_ms=scale * n / 2e3, b2b_method="cuda-graph")
            utils.add_roofline(row, 2 * n * 110 * 512, 2 * n * 512, env["device"])
            rows.append(row)
    for backend, kind, ms, mib in (("triton", "backend", 10.0, 100.0), ("nonlocal_matmul", "peer", 60.0, 2800.0)):
        shape = utils.Shape("paper", dict(B=1, C=2048, H=128, W=256, mode="eval"))
        row = utils.empty_row(utils.Case("apnb", shape, "float32", utils.Provider(backend, None, kind), "fwd"))
        row.update(status="ok", median_ms=ms, p20_ms=ms, p80_ms=ms, peak_mem_mb=mib)
        rows.append(row)
    utils.attach_reference_ratios(rows)
    assert rows[2]["fraction_of_floor"] is not None  # H200 floors apply
    rows[4]["b2b_method"] = "calls (graph capture failed: operation not permitted when stream is capturing)"
    stem = str(tmp_path / "gpu")
    written = compare.report(utils.result_document(rows, env, {}), stem)
    assert [os.path.basename(path) for path in written] == ["gpu.json", "gpu.md", "gpu-scaling.png",
                                                            "gpu-paper.png", "gpu-floor.png"]
    markdown = open(stem + ".md").read()
    paper_row = "| paper | B=1 C=2048 H=128 W=256 mode=eval | float32 | triton | nonlocal_matmul | 10 | 60 | 6x |"
    assert paper_row in markdown
    assert "Noise" not in markdown
    assert "| n8192 | B=1 N=8192 S=110 Dk=256 Dv=256 | bfloat16 | reference | fwd | 8.19 | 0-1 | 4.1 |" in markdown
    assert "- n8192 bfloat16 fwd sdpa_flash: calls (graph capture failed" in markdown


def test_pytest_benchmark_flag_runs_the_bench_and_prints_ratios(tmp_path):
    """`pytest --benchmark` from the root: bench/ with pytest-benchmark's table, then the x ref summary."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved, storage = tmp_path / "run.json", f"--benchmark-storage={tmp_path / 'storage'}"

    def run_bench(*args):
        done = subprocess.run([sys.executable, "-m", "pytest", "--benchmark", "--bench-quick", "--bench-device", "cpu",
                               "-p", "no:cacheprovider", storage, *args],
                              cwd=root, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    done = run_bench("-k", "pyramid_pool and small_kv and fwd", f"--benchmark-json={saved}", "--benchmark-autosave")
    group = "pyramid_pool[small_kv-B1-C512-H32-W64-fp32-cpu-fwd]"
    assert f"benchmark '{group}'" in done.stdout  # pytest-benchmark's table, one group per competing set
    summary = done.stdout[done.stdout.index("x ref: reference median"):]
    assert re.search(rf"^{re.escape(group)}\s+cpu \d+(\.\d+)?\s+composite \d+(\.\d+)?\s+torch_pool_cat \d", summary,
                     re.MULTILINE), summary
    cases = {bench["name"]: bench for bench in json.loads(saved.read_text())["benchmarks"]}
    assert set(cases) == {f"test_pyramid_pool[{group[13:-1]}-{provider}]"
                          for provider in ("reference", "cpu", "composite", "torch_pool_cat")}
    for bench in cases.values():
        assert bench["group"] == group
        extra = bench["extra_info"]
        assert extra["x_ref"] == pytest.approx(extra["reference_median_s"] / bench["stats"]["median"])
        assert extra["cache"] == "hot" and extra["peak_mem_mb"] >= 0
    assert cases[f"test_pyramid_pool[{group[13:-1]}-reference]"]["extra_info"]["x_ref"] == 1.0
    # pytest-benchmark's regression check finds the saved run's case under the same name.
    compared = run_bench("-k", "pyramid_pool and small_kv and fwd and reference", "--benchmark-compare",
                     "--benchmark-compare-fail=median:1000%").stdout
    name = f"test_pyramid_pool[{group[13:-1]}-reference]"
    assert f"{name} (NOW)" in compared and re.search(rf"{re.escape(name)} \(0001_", compared), compared
