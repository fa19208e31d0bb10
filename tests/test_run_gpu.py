"""The GPU machine's one command (tools/gpu/run_gpu.py) and its parts, proven here on their CPU stand-ins.

The dry run is the whole script on CPU: it must leave exactly the 8 files the machine hands back, report
a step that ran out of time as such, and still run the steps after it.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest
import torch

from tools.gpu import large_shapes, run_gpu, step_deadline

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_out")
    # cuda-tests gets half a second: pytest cannot even import torch in that time, so the step is killed.
    done = subprocess.run([sys.executable, "tools/gpu/run_gpu.py", "--dry-run", "--out", str(out),
                           "--budget", "cuda-tests=0.5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    return out, done


def _summary_rows(summary: str) -> dict:
    rows = {}
    for line in summary.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 7 and cells[0] in {step.name for step in run_gpu.plan(pathlib.Path("."), True)}:
            rows[cells[0]] = cells
    return rows


def test_dry_run_leaves_exactly_the_eight_files(dry_run):
    out, done = dry_run
    assert sorted(path.name for path in out.iterdir()) == sorted(run_gpu.OUTPUT_FILES)
    assert len(run_gpu.OUTPUT_FILES) == 8
    assert all(path.is_file() and path.stat().st_size > 0 for path in out.iterdir())
    assert "Output folder: 8 of 8 files\n" in (out / "summary.md").read_text()
    assert done.stdout.rstrip().endswith(f"Output folder: 8 of 8 files ({out})")  # the verdict ends the output


def test_a_step_out_of_time_is_reported_and_the_next_one_runs(dry_run):
    out, done = dry_run
    assert done.returncode == 1, done.stdout[-3000:]  # not every step ok
    rows = _summary_rows((out / "summary.md").read_text())
    assert list(rows) == [step.name for step in run_gpu.plan(out, True)]
    assert rows["cuda-tests"][1] == "timed out"
    assert float(rows["cuda-tests"][2]) < 5 and rows["cuda-tests"][3] == "0"  # limit printed as whole seconds
    assert "[stopped: the step's limit" in (out / "tests-cuda.log").read_text()
    # Stopped while it imported torch, pytest wrote no JUnit file: the script leaves one that says so.
    error = ElementTree.parse(out / "tests-cuda.xml").getroot().find(".//testcase/error")
    assert error is not None and "timed out" in error.get("message")
    for step in ("preflight", "build", "triton-tests", "large-shapes", "bench"):
        assert rows[step][1] == "ok", (step, rows[step], done.stdout[-3000:])
    assert re.match(r"\d+ passed$", rows["triton-tests"][5])
    assert ElementTree.parse(out / "tests-triton.xml").getroot().find(".//testcase") is not None
    assert re.match(r"\d+ passed, 0 failed, 0 not run", rows["large-shapes"][5])
    assert re.match(r"\d+ rows: \d+ ok$", rows["bench"][5])
    summary = (out / "summary.md").read_text()
    assert "annkernels native kernels: loaded" in summary and "Stand-in: the Triton interpreter" in summary


def test_dry_run_bench_files_come_from_this_run(dry_run):
    out, _ = dry_run
    import json

    document = json.loads((out / "bench.json").read_text())
    assert document["env"]["device_type"] == "cpu" and not document["config"]["plots"]
    assert {row["op"] for row in document["rows"]} == {"pyramid_pool"}
    assert document["env"]["date_utc"] in (out / "bench.md").read_text()


def test_step_deadline_skips_tests_not_started_in_time(tmp_path):
    (tmp_path / "test_three.py").write_text("def test_a():\n    pass\n\n\ndef test_b():\n    pass\n")
    junit = tmp_path / "junit.xml"
    env = {**os.environ, step_deadline.DEADLINE_ENV: "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "tools.gpu.step_deadline", "-p", "no:cacheprovider",
                           "-q", f"--junitxml={junit}", "test_three.py"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "2 skipped" in done.stdout, done.stdout
    assert run_gpu.describe_junit(junit) == "2 skipped (2 not run: time limit)"
    env.pop(step_deadline.DEADLINE_ENV)
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "tools.gpu.step_deadline", "-p", "no:cacheprovider",
                           "-q", "test_three.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "2 passed" in done.stdout, done.stdout


def test_a_pytest_step_stopped_at_its_limit_keeps_its_junit_file(tmp_path):
    """SIGINT at the limit: pytest stops as after Ctrl-C and writes the JUnit file of what it ran."""
    (tmp_path / "test_slow.py").write_text("import time\n\n\ndef test_quick():\n    pass\n\n\n"
                                           "def test_stuck():\n    time.sleep(120)\n")
    junit = tmp_path / "junit.xml"
    step = run_gpu.Step("stuck-tests", 0, lambda limit_s: [run_gpu._pytest([str(tmp_path / "test_slow.py")], 0, 300,
                                                                            junit)],
                        lambda folder, output: run_gpu.describe_junit(junit), log="stuck.log", junit=junit.name)
    outcome = run_gpu.run_step(step, 8.0, tmp_path, tmp_path)
    assert outcome.status == "timed out" and outcome.seconds < 8.0 + 2 * run_gpu.KILL_GRACE_S
    assert ElementTree.parse(junit).getroot().get("name") == "pytest tests"  # pytest's own file, not a stand-in
    assert outcome.detail == "1 passed, 1 interrupted"


def test_junit_description_names_the_failures(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(
        '<testsuites><testsuite name="pytest" tests="3">'
        '<testcase classname="tests.test_x" name="test_ok"/>'
        '<testcase classname="tests.test_x" name="test_bad[cuda-cuda]"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_x" name="test_skip"><skipped message="no GPU"/></testcase>'
        '<testcase time="0.001"/>'  # how pytest records the test it was running when stopped by SIGINT
        "</testsuite></testsuites>")
    assert run_gpu.describe_junit(path) == ("1 passed, 1 failed, 1 skipped, 1 interrupted; "
                                            "failed: tests.test_x::test_bad[cuda-cuda]")
    assert run_gpu.describe_junit(tmp_path / "absent.xml").startswith("unreadable JUnit file")


def test_device_plan_fits_the_machine():
    """The GPU plan: budgets within the total, separate test processes, no network, the 9.0a build."""
    steps = run_gpu.plan(pathlib.Path("/out"), dry_run=False)
    assert sum(step.budget_s for step in steps) <= run_gpu.TOTAL_S <= 540
    commands = {step.name: step.commands(step.budget_s) for step in steps}
    install = commands["build"][0]
    assert install[1:4] == ["-m", "pip", "install"] and "--no-index" in install and "--dry-run" not in install
    build = next(step for step in steps if step.name == "build")
    assert build.env["TORCH_CUDA_ARCH_LIST"] == "9.0a" and build.env["MAX_JOBS"] == "16"
    cuda, triton = commands["cuda-tests"][0], commands["triton-tests"][0]
    assert cuda[cuda.index("-k") + 1] == "not triton" and triton[triton.index("-k") + 1] == "triton"
    for argv in (cuda, triton):
        assert {"-rfE", "--durations=25", "-p"} <= set(argv) and any(a.startswith("--junitxml=/out/") for a in argv)
    for step in steps:
        if step.junit:
            assert step.env["ANNKERNELS_TRITON_AUTOTUNE"] == "0"
    bench = commands["bench"][0]
    assert bench[bench.index("--output") + 1] == "/out/bench" and "--no-plots" in bench
    written = {name for step in steps for name in (step.log, step.junit, *step.files) if name}
    assert written | {run_gpu.SUMMARY} == set(run_gpu.OUTPUT_FILES)


# ----------------------------------------------------------------------------------------------------------------
# The large-shape checker must be able to fail.


def _attention_inputs(n=40):
    return [torch.randn(2, 8, n).transpose(1, 2), torch.randn(2, 8, 11).transpose(1, 2),
            torch.randn(2, 8, 11).transpose(1, 2)]


def _reference(q, k, v):
    import annkernels

    return annkernels.short_attention(q, k, v, 0.3, backend="reference")


def test_large_shape_check_passes_the_reference_against_itself():
    result = large_shapes.check("reference", _reference, _reference, _attention_inputs(), ["out", "dQ", "dK", "dV"])
    assert result.passed and result.line().startswith("PASS") and "deterministic=yes" in result.line()


@pytest.mark.parametrize("flaw", ["wrong scale", "unwritten element", "not deterministic"])
def test_large_shape_check_catches_a_flawed_kernel(flaw):
    calls = []

    def flawed(q, k, v):
        calls.append(1)
        if flaw == "wrong scale":
            return _reference(q * 1.01, k, v)
        out = _reference(q, k, v)
        if flaw == "unwritten element":
            return out + torch.empty_like(out)  # NaN under the checker's deterministic mode
        return out * (1 + 1e-6 * len(calls))

    result = large_shapes.check(flaw, flawed, _reference, _attention_inputs(), ["out", "dQ", "dK", "dV"])
    assert not result.passed and result.line().startswith("FAIL")
    if flaw == "unwritten element":
        assert "NaN" in result.problem
    if flaw == "not deterministic":
        assert not result.deterministic
