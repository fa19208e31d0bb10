"""train.py stopped by real signals and resumed: SIGINT/SIGTERM checkpoint the iteration they interrupt and exit
130/143 with one line; a second SIGINT exits at once; a run interrupted and resumed ends bit-identical to an
uninterrupted one; --resume auto skips corrupt checkpoints; a failed start leaves the work dir as it was."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# ann_r18_d8 on 32x32 scenes, one thread, one DataLoader worker, the synthetic recipe's augmentations (random
# resize 0.75-1.5, crop, flip, photometric distortion) and the head's dropout.
TINY = ["--synthetic-size", "32", "--crop-size", "32", "32", "--scale", "32", "32", "--batch-size", "2",
        "--workers", "1", "--cpu-threads", "1", "--log-interval", "1", "--no-progress", "--num-preview", "1",
        "--no-eval-at-start", "--synthetic-val-length", "2"]


def start_training(*arguments):
    """train.py in its own session, as a terminal runs it: killpg reaches its DataLoader worker too."""
    return subprocess.Popen([sys.executable, "train/train.py", *arguments], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def logged_iterations(work_dir) -> list[int]:
    path = Path(work_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["iteration"] for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


def wait_for_iteration(process, work_dir, iteration, timeout=300):
    deadline = time.monotonic() + timeout
    while not logged_iterations(work_dir) or max(logged_iterations(work_dir)) < iteration:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"iteration {iteration} not reached within {timeout} s"
        time.sleep(0.02)


def assert_same_tensors(first, second, what):
    if isinstance(first, dict):
        assert first.keys() == second.keys(), what
        for key in first:
            assert_same_tensors(first[key], second[key], f"{what}.{key}")
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second), what
        for index, (a, b) in enumerate(zip(first, second, strict=True)):
            assert_same_tensors(a, b, f"{what}[{index}]")
    elif torch.is_tensor(first):
        assert torch.equal(first, second), f"{what} differs"
    else:
        assert first == second, f"{what}: {first} != {second}"


def test_sigint_checkpoints_its_iteration_and_the_resumed_run_is_bit_exact(tmp_path):
    total = 10
    flags = [*TINY, "--iterations", str(total), "--eval-interval", str(total), "--ckpt-interval", str(total)]
    whole = start_training(*flags, "--work-dir", str(tmp_path / "whole"))
    work_dir = tmp_path / "interrupted"
    interrupted = start_training(*flags, "--work-dir", str(work_dir))
    wait_for_iteration(interrupted, work_dir, 3)
    os.killpg(interrupted.pid, signal.SIGINT)  # Ctrl-C: the main process and its DataLoader worker
    _, stderr = interrupted.communicate(timeout=300)
    assert interrupted.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    stopped = int(line.split(" at iteration ")[1].split("/")[0])
    assert 3 <= stopped < total, "the run ended before the signal: no interruption to test"
    assert line.startswith(f"SIGINT at iteration {stopped}/{total}: saved {work_dir / f'iter_{stopped}.pth'}; to "
                           "continue: python train/train.py ")
    assert torch.load(work_dir / "latest.pth", weights_only=True)["iteration"] == stopped

    command = shlex.split(line.split("to continue: ")[1])
    assert command[-2:] == ["--resume", "auto"]
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert whole.wait(timeout=600) == 0, whole.communicate()[1][-3000:]

    expected = torch.load(tmp_path / "whole" / "latest.pth", weights_only=True)
    actual = torch.load(work_dir / "latest.pth", weights_only=True)
    assert actual["iteration"] == expected["iteration"] == total
    assert_same_tensors(actual["model"], expected["model"], "model")
    assert_same_tensors(actual["optimizer"], expected["optimizer"], "optimizer")
    assert_same_tensors(actual["rng_states"], expected["rng_states"], "rng_states")
    assert logged_iterations(work_dir) == list(range(1, total + 1))


def test_sigterm_exits_143_and_a_second_sigint_exits_at_once_keeping_the_last_checkpoint(tmp_path):
    flags = [*TINY, "--iterations", "200", "--ckpt-interval", "2"]
    terminated = start_training(*flags, "--eval-interval", "200", "--work-dir", str(tmp_path / "terminated"))
    # The second run evaluates 300 scenes after iteration 3: a first SIGINT then waits for the evaluation, a second
    # one ends the run at once.
    work_dir = tmp_path / "twice"
    twice = start_training(*flags, "--eval-interval", "3", "--synthetic-val-length", "300", "--work-dir", str(work_dir))

    wait_for_iteration(terminated, tmp_path / "terminated", 2)
    terminated.send_signal(signal.SIGTERM)
    _, stderr = terminated.communicate(timeout=300)
    assert terminated.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("SIGTERM at iteration ")

    wait_for_iteration(twice, work_dir, 3)
    kept = (work_dir / "latest.pth").read_bytes()
    # Signals that arrive while one long C++ call runs reach Python's handler as one: repeat until it exits.
    for _ in range(100):
        twice.send_signal(signal.SIGINT)
        try:
            twice.wait(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            pass
    _, stderr = twice.communicate(timeout=300)
    assert twice.returncode == 130, stderr[-3000:]
    assert stderr.strip() == (f"SIGINT again: stopped at once, without a checkpoint of this iteration. The last "
                              f"checkpoint, {work_dir / 'latest.pth'}, is intact.")
    assert (work_dir / "latest.pth").read_bytes() == kept
    assert torch.load(work_dir / "latest.pth", weights_only=True)["iteration"] == 2


def run_train(*arguments):
    return subprocess.run([sys.executable, "train/train.py", *arguments], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def test_resume_skips_corrupt_checkpoints_and_failed_starts_change_nothing(tmp_path):
    work_dir = tmp_path / "work"
    flags = [*TINY, "--workers", "0", "--eval-interval", "100", "--ckpt-interval", "2", "--work-dir", str(work_dir)]
    first = run_train(*flags, "--iterations", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    latest = work_dir / "latest.pth"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated, and with it its hard link iter_4.pth
    settings = {path.name: path.read_bytes() for path in work_dir.iterdir() if path.is_file()}

    # A corrupt --resume PATH, a missing one, and a checkpoint of another model: one line each, nothing changed.
    for resume, message in [(str(latest), f"error: cannot read checkpoint file {latest} (corrupt or not a "
                                          "torch.save file)"),
                            (str(tmp_path / "missing.pth"), f"error: --resume checkpoint not found: "
                                                            f"{tmp_path / 'missing.pth'}")]:
        failed = run_train(*flags, "--iterations", "2", "--lr", "0.5", "--resume", resume)
        assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
        assert failed.stderr.strip().splitlines() == [failed.stderr.strip().splitlines()[-1]]
        assert failed.stderr.startswith(message), failed.stderr
    other = run_train(*flags, "--iterations", "6", "--num-classes", "4", "--resume", str(work_dir / "iter_2.pth"))
    assert other.returncode == 1, other.stderr[-3000:]
    assert other.stderr.strip() == (f"error: {work_dir / 'iter_2.pth'} holds ann_r18_d8 with 6 classes; this run "
                                    "builds ann_r18_d8 with 4 (--model, --num-classes)")
    assert {path.name: path.read_bytes() for path in work_dir.iterdir() if path.is_file()} == settings

    resumed = run_train(*flags, "--iterations", "6", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    skipped = [line for line in resumed.stdout.splitlines() if line.startswith("skipping")]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipping {latest}: cannot read checkpoint file"), skipped
    assert f"resumed from {work_dir / 'iter_2.pth'} at iteration 2" in resumed.stdout
    assert logged_iterations(work_dir) == [1, 2, 3, 4, 5, 6]
    assert torch.load(latest, weights_only=True)["iteration"] == 6


def test_under_torchrun_a_signal_to_one_rank_stops_every_rank_at_the_same_iteration(tmp_path):
    from test_train_loop import children_with_rank

    work_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--monitor-interval=0.2", "train/train.py", *TINY, "--workers", "0", "--iterations", "200",
               "--eval-interval", "200", "--ckpt-interval", "200", "--work-dir", str(work_dir)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_iteration(process, work_dir, 2)
        (rank_1,) = children_with_rank(process.pid, rank=1)
        os.kill(rank_1, signal.SIGTERM)  # rank 0 receives nothing: it learns of the stop from the all-reduce
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    (line,) = [line for line in stderr.splitlines() if line.startswith("SIGTERM at iteration ")]
    stopped = int(line.split(" at iteration ")[1].split("/")[0])
    assert "to continue: torchrun --nproc_per_node=2 train/train.py " in line
    checkpoint = torch.load(work_dir / "latest.pth", weights_only=True)
    assert checkpoint["iteration"] == stopped and len(checkpoint["rng_states"]) == 2
    assert logged_iterations(work_dir) == list(range(1, stopped + 1))
