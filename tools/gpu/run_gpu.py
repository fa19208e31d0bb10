"""One command on a lent GPU machine: build, test, check large shapes and time the kernels, in 530 s.

    python3 tools/gpu/run_gpu.py                          # on the GPU machine, from the repository root; into $OUT
    python3 tools/gpu/run_gpu.py --dry-run --out DIR      # the same steps on their CPU stand-ins, anywhere

The GPU machine this is written for: Python 3.12 as `python3`, torch 2.11 (CUDA 13.0), triton 3.6, nvcc 13.0,
ninja, pytest with pytest-timeout, pytest-xdist and pytest-benchmark, 16 cores, no network; one command may
run 10 minutes and hand back at most 8 files. So every step runs in its own process group under its own
time limit, a step that runs out of time is killed and reported as timed out, and the next step still
runs. A step may use what earlier steps left of their budgets, never what later steps need.

Each step writes its files straight into the output folder as it runs, and the summary is rewritten
after every step, so whatever stops the command, what was done is there. The output folder gets exactly
these 8 files (OUTPUT_FILES): the summary, the build log, the log and JUnit file of the CUDA-backend tests
and of the Triton-backend tests (separate processes, so a device fault in one cannot poison the other),
and the benchmark's JSON and markdown. The preflight, the native-kernel check and the large-shape check
print into the summary. Nothing else is copied: no committed result file goes back.

--dry-run runs each step on its CPU stand-in: the pip call without the compile, the CUDA kernels under the
CPU emulator in place of the CUDA-backend tests (the CPU kernels' tests while the tree has no emulator:
cuda_stand_in), the Triton tests under the Triton interpreter, the large-shape check and the bench on the
CPU backend at small sizes. It proves the plumbing: limits, step reports, the files and their names.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from importlib.util import find_spec
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parents[2]
PYTHON = sys.executable

SUMMARY = "summary.md"
OUTPUT_FILES = (SUMMARY, "build.log", "tests-cuda.log", "tests-cuda.xml", "tests-triton.log", "tests-triton.xml",
                "bench.json", "bench.md")
TOTAL_S = 530  # under the 540 s target with a last step stopped late (2 x KILL_GRACE_S)
KILL_GRACE_S = 3
# Tests that have not started this long before their step's limit are skipped (tools/gpu/step_deadline.py), so
# pytest still writes its JUnit file and durations.
SOFT_STOP_S = 15
STEP_DEADLINE_ENV = "ANNKERNELS_STEP_DEADLINE"
# Correctness runs take one autotune config per kernel: the timing comes from the bench step.
TEST_ENV = {"ANNKERNELS_TRITON_AUTOTUNE": "0"}  # annkernels/triton/common.py: AUTOTUNE_SWITCH
NO_NETWORK_PIP = {"PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


@dataclasses.dataclass
class Step:
    name: str
    budget_s: float
    commands: Callable[[float], list]  # limit in seconds -> argv lists, run in turn within the limit
    result: Callable[[pathlib.Path, str], str]  # (output folder, step output) -> one-line result
    log: str | None = None  # output file in the output folder for stdout and stderr (else a scratch file)
    summary_tail: int | None = None  # lines of the output that go into the summary; None: all of it
    junit: str | None = None  # JUnit file the step's pytest writes
    files: tuple = ()  # other files of the output folder that the step writes
    env: dict = dataclasses.field(default_factory=dict)
    stand_in: str | None = None  # what the dry run runs in place of the GPU work, said in the summary


@dataclasses.dataclass
class Outcome:
    status: str = "pending"  # pending | running | ok | failed | timed out
    detail: str = ""
    seconds: float = 0.0
    limit_s: float = 0.0
    output: str = ""  # what goes into the summary under the step's heading


# ----------------------------------------------------------------------------------------------------------------
# The steps


def _pytest(selection: list, workers: int, per_test_s: int, junit: pathlib.Path) -> list:
    """pytest argv for one test step: per-test timeouts, failures and errors listed, durations, JUnit."""
    argv = [PYTHON, "-m", "pytest", *selection, "-v", "-rfE", "--durations=25", f"--junitxml={junit}",
            "-p", "no:cacheprovider", "-p", "tools.gpu.step_deadline"]
    if find_spec("pytest_timeout") is not None:
        # thread: also stops a test stuck in a CUDA call, which a signal could not interrupt.
        argv += [f"--timeout={per_test_s}", "--timeout-method=thread"]
    if workers and find_spec("xdist") is not None:
        # A worker that dies (timeout, device fault) is replaced; its test is reported as failed.
        argv += ["-n", str(workers)]
    return argv


# The CUDA kernels run by the CPU SIMT emulator: the dry run's stand-in for the CUDA-backend tests where the
# tree has them, on one small case (the emulator builds the kernels with g++ first).
EMULATED_CUDA_TESTS = ["tests/test_cuda_emulated.py", "-k", "pyramid_pool_strided"]


def cuda_stand_in() -> list:
    """What the dry run tests in place of the CUDA backend: the CUDA kernels under the emulator when the
    tree has that test file, else the CPU kernels' tests (the functions the CUDA backend runs on a GPU)."""
    if (ROOT / EMULATED_CUDA_TESTS[0]).is_file():
        return EMULATED_CUDA_TESTS
    return ["tests/test_pyramid_pool.py", "-k", "cpu-cpu and (strided or deterministic)"]


def plan(out: pathlib.Path, dry_run: bool) -> list:
    """The steps in order, with the GPU machine's commands or, in a dry run, their CPU stand-ins."""
    install = [PYTHON, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    if dry_run:
        install.append("--dry-run")  # what pip and setup.py decide, without replacing the extension in use
    native = [PYTHON, "-m", "tools.gpu.preflight", "--native"]
    if dry_run:  # two shared cores: small selections, no pytest-xdist workers
        cuda_tests = cuda_stand_in()
        triton_tests = ["tests/test_pyramid_pool.py", "-k", "cpu-triton and strided"]
        large = ["--device", "cpu", "--backends", "cpu", "--sizes", "391", "--batches", "1",
                 "--dtypes", "float32,bfloat16"]
        bench = ["--device", "cpu", "--ops", "pyramid_pool", "--shapes", "small_kv", "--providers", "cpu"]
        cuda_workers = triton_workers = 0
    else:
        cuda_tests = ["tests", "-m", "cuda", "-k", "not triton"]
        triton_tests = ["tests", "-m", "cuda", "-k", "triton"]
        large = []
        bench = ["--device", "cuda", "--ops", "short_attention,pyramid_pool,apnb",
                 "--shapes", "train,crop769,infer,train_kv,crop769_kv,infer_kv",
                 "--providers", "cuda,triton,composite,cuda_pair,triton_pair,sdpa_flash,sdpa_efficient,sdpa_cudnn,"
                 "sdpa_math,gemm_only"]
        # Triton's compiles are CPU work: 8 workers on the machine's 16 cores.
        cuda_workers, triton_workers = 4, 8

    def bench_commands(limit_s):
        # --max-seconds stops starting cases in time to write the files; the limit is the hard stop.
        return [[PYTHON, "bench/compare.py", *bench, "--quick", "--no-plots", "--output", str(out / "bench"),
                 "--max-seconds", str(max(1, int(limit_s - 20)))]]

    def tests_result(junit):
        return lambda folder, output: describe_junit(folder / junit)

    return [
        Step("preflight", 15, lambda limit_s: [[PYTHON, "-m", "tools.gpu.preflight"]], _line_starting("gpu:")),
        Step("build", 90, lambda limit_s: [install, native], _line_starting("annkernels native kernels:"),
             log="build.log", summary_tail=25, env={"TORCH_CUDA_ARCH_LIST": "9.0a", "MAX_JOBS": "16", **NO_NETWORK_PIP},
             stand_in="pip install --dry-run (no compile)"),
        Step("cuda-tests", 85, lambda limit_s: [_pytest(cuda_tests, cuda_workers, 60, out / "tests-cuda.xml")],
             tests_result("tests-cuda.xml"), log="tests-cuda.log", summary_tail=40, junit="tests-cuda.xml",
             env=TEST_ENV, stand_in=shlex.join(cuda_tests)),
        Step("triton-tests", 190,
             lambda limit_s: [_pytest(triton_tests, triton_workers, 120, out / "tests-triton.xml")],
             tests_result("tests-triton.xml"), log="tests-triton.log", summary_tail=40, junit="tests-triton.xml",
             env=TEST_ENV, stand_in="the Triton interpreter: " + shlex.join(triton_tests)),
        Step("large-shapes", 30, lambda limit_s: [[PYTHON, "-m", "tools.gpu.large_shapes", *large]],
             _line_starting("large shapes:"), env=TEST_ENV, stand_in="CPU backend: " + shlex.join(large)),
        Step("bench", 115, bench_commands, lambda folder, output: describe_bench(folder / "bench.json"),
             summary_tail=25, files=("bench.json", "bench.md"), env={"TQDM_DISABLE": "1"},
             stand_in="CPU: " + shlex.join(bench)),
    ]


def _line_starting(prefix: str) -> Callable:
    """Result of a step whose output has a "prefix ..." line: that line's rest."""
    def result(folder, output):
        found = [line[len(prefix):].strip() for line in output.splitlines() if line.startswith(prefix)]
        return found[-1] if found else ""

    return result


# ----------------------------------------------------------------------------------------------------------------
# Running a step


def _stop_group(process: subprocess.Popen) -> None:
    """SIGINT first: pytest then stops as after Ctrl-C and still writes its JUnit file and summary. What
    is left of the process group after a grace time (a call stuck in a driver) is killed."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, limit_s: float, out: pathlib.Path, scratch: pathlib.Path) -> Outcome:
    """Runs the step's commands in turn, all within ``limit_s``; stops at the first that fails."""
    outcome = Outcome(status="running", limit_s=limit_s)
    log_path = out / step.log if step.log else scratch / f"{step.name}.log"
    start = time.monotonic()
    deadline = start + limit_s
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.env,
           STEP_DEADLINE_ENV: f"{time.time() + limit_s - min(SOFT_STOP_S, limit_s / 4):.1f}"}
    status = "ok"
    with open(log_path, "w") as log:
        for argv in step.commands(limit_s):
            log.write(f"$ {shlex.join(argv)}\n")
            log.flush()
            process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                returncode = process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _stop_group(process)
                status = "timed out"
                log.write(f"\n[stopped: the step's limit of {limit_s:.0f} s was reached]\n")
                break
            if returncode != 0:
                status = "failed"
                log.write(f"\n[exit status {returncode}]\n")
                break
    outcome.seconds = time.monotonic() - start
    outcome.status = status
    if step.junit and not (out / step.junit).exists():
        write_junit_stub(out / step.junit, step.name,
                         f"{step.name} {status} after {outcome.seconds:.0f} s without writing its JUnit file; see "
                         f"{step.log}")
    text = log_path.read_text(errors="replace")
    outcome.detail = step.result(out, text)
    outcome.output = text if step.summary_tail is None else "\n".join(text.splitlines()[-step.summary_tail:])
    return outcome


def write_junit_stub(path: pathlib.Path, step: str, reason: str) -> None:
    """A JUnit file with one errored case, for a pytest that was killed before it could write its own."""
    suites = ElementTree.Element("testsuites")
    suite = ElementTree.SubElement(suites, "testsuite", name=step, tests="1", errors="1", failures="0", skipped="0")
    case = ElementTree.SubElement(suite, "testcase", classname="tools.gpu.run_gpu", name=step)
    ElementTree.SubElement(case, "error", message=reason)
    ElementTree.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)


def describe_junit(path: pathlib.Path) -> str:
    """"120 passed, 2 failed, 1 error, 4 skipped, 1 interrupted (3 not run: time limit); failed: ..."."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as exc:
        return f"unreadable JUnit file: {exc}"
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "interrupted": 0}
    kinds = {"failure": "failed", "error": "error", "skipped": "skipped", None: "passed"}
    not_run, broken = 0, []
    for case in root.iter("testcase"):
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        # A test stopped mid-way (SIGINT at the step's limit) is written without a name.
        kind = kinds[getattr(outcome, "tag", None)] if case.get("name") else "interrupted"
        counts[kind] += 1
        if kind == "skipped" and "time limit" in (outcome.get("message") or ""):
            not_run += 1
        elif kind in ("failed", "error"):
            broken.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    text = ", ".join(f"{count} {kind}" for kind, count in counts.items() if count) or "no tests ran"
    if not_run:
        text += f" ({not_run} not run: time limit)"
    if broken:
        text += "; failed: " + ", ".join(broken[:12]) + (f" and {len(broken) - 12} more" if len(broken) > 12 else "")
    return text


def describe_bench(path: pathlib.Path) -> str:
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError) as exc:
        return f"no readable bench JSON: {exc}"
    statuses = [row["status"].split(":")[0] for row in rows]
    return f"{len(rows)} rows: " + ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))


# ----------------------------------------------------------------------------------------------------------------
# The summary


def _commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5)
        return done.stdout.strip() or "unknown (no git checkout)"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"


def summary_table(steps: list, outcomes: dict) -> list:
    lines = ["| step | status | seconds | limit s | budget s | result | file |", "|---|---|---|---|---|---|---|"]
    for step in steps:
        outcome = outcomes[step.name]
        files = ", ".join(name for name in (step.log, step.junit, *step.files) if name) or SUMMARY
        lines.append(f"| {step.name} | {outcome.status} | {outcome.seconds:.1f} | {outcome.limit_s:.0f} | "
                     f"{step.budget_s:.0f} | {outcome.detail} | {files} |")
    return lines


def write_summary(path: pathlib.Path, steps: list, outcomes: dict, header: dict) -> None:
    lines = [f"# GPU check{' (dry run: CPU stand-ins)' if header['dry_run'] else ''}: {header['host']}, "
             f"{header['started']}", "",
             f"commit {header['commit']}; total limit {TOTAL_S} s; elapsed {time.monotonic() - header['t0']:.0f} s",
             "", *summary_table(steps, outcomes)]
    for step in steps:
        outcome = outcomes[step.name]
        if outcome.status in ("pending", "running"):
            continue
        lines += ["", f"## {step.name}: {outcome.status}", ""]
        if header["dry_run"] and step.stand_in:
            lines += [f"Stand-in: {step.stand_in}", ""]
        if outcome.output:
            lines += ["```text", outcome.output.rstrip(), "```"]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="run every step on its CPU stand-in")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default: $OUT)")
    parser.add_argument("--budget", action="append", default=[], metavar="STEP=SECONDS",
                        help="give STEP exactly SECONDS, without what earlier steps left over (repeatable)")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("no output folder: pass --out or set OUT")
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = plan(out, args.dry_run)
    pinned = {}
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in {step.name for step in steps}:
            parser.error(f"--budget: no step named {name!r}; steps: {', '.join(step.name for step in steps)}")
        pinned[name] = float(seconds)
    for step in steps:
        step.budget_s = pinned.get(step.name, step.budget_s)
    header = {"dry_run": args.dry_run, "host": platform.node(), "commit": _commit(), "t0": time.monotonic(),
              "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    outcomes = {step.name: Outcome() for step in steps}
    summary = out / SUMMARY
    write_summary(summary, steps, outcomes, header)
    total_deadline = header["t0"] + TOTAL_S
    with tempfile.TemporaryDirectory(prefix="run_gpu-") as scratch:
        for index, step in enumerate(steps):
            reserved = sum(later.budget_s for later in steps[index + 1:])
            limit_s = step.budget_s if step.name in pinned else total_deadline - time.monotonic() - reserved
            limit_s = max(0.1, min(limit_s, total_deadline - time.monotonic()))
            outcomes[step.name] = Outcome(status="running", limit_s=limit_s)
            write_summary(summary, steps, outcomes, header)
            outcomes[step.name] = run_step(step, limit_s, out, pathlib.Path(scratch))
            outcome = outcomes[step.name]
            print(f"[{step.name}] {outcome.status} in {outcome.seconds:.1f} s (limit {limit_s:.0f} s)"
                  + (f": {outcome.detail}" if outcome.detail else ""), flush=True)
            write_summary(summary, steps, outcomes, header)
    unexpected = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
    missing = [name for name in OUTPUT_FILES if not (out / name).exists()]
    files = (f"Output folder: {len(OUTPUT_FILES) - len(missing)} of {len(OUTPUT_FILES)} files"
             + (f"; missing: {', '.join(missing)}" if missing else "")
             + (f"; unexpected: {', '.join(unexpected)}" if unexpected else ""))
    with open(summary, "a") as handle:
        handle.write(f"\n{files}\n")
    # The verdict last: a caller that keeps only the end of the output still sees it; the rest is in the summary.
    print("\n".join(["", *summary_table(steps, outcomes), "", f"{files} ({out})"]), flush=True)
    return 0 if all(outcome.status == "ok" for outcome in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
