"""The training script end to end on synthetic scenes: loss goes down, kill + resume continues exactly, DDP with
two CPU processes (gloo) shards the data and all-reduces the metric."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tqdm import tqdm

import models
from train import transforms as T
from train.config import resolve_config
from train.distributed import DistributedContext
from train.engine import MetricsLog, PolyLR
from train.synthetic import SyntheticScenes
from train.train import train_interval

REPO = Path(__file__).resolve().parents[1]

# Small and quick: ann_r18_d8 on 32x32 scenes, one thread per process so parallel jobs do not thrash.
TINY = ["--synthetic-size", "32", "--crop-size", "32", "32", "--scale", "32", "32", "--batch-size", "2",
        "--workers", "0", "--cpu-threads", "1", "--log-interval", "1", "--no-progress", "--num-preview", "1",
        "--no-eval-at-start", "--synthetic-val-length", "5"]


def records(work_dir, kind):
    lines = (Path(work_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def poly(iteration, total, lr=0.04, min_lr=1e-4, power=0.9):
    """lr of 1-based iteration `iteration` (ann-spec §3: t = iteration - 1, T = total - 1)."""
    return (lr - min_lr) * (1 - (iteration - 1) / (total - 1)) ** power + min_lr


def test_poly_schedule_matches_mmengine():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.01)
    scheduler = PolyLR(optimizer, total_iters=5, power=0.9, min_lr=1e-4)
    seen = []
    for _ in range(5):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [(0.01 - 1e-4) * (1 - t / 4) ** 0.9 + 1e-4 for t in range(5)]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)
    assert seen[-1] == pytest.approx(1e-4)


def test_training_loss_decreases(tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = resolve_config("synthetic", {}, dict(iterations=12, log_interval=1, crop_size=(32, 32)))
    dataset = SyntheticScenes("train", length=4, size=32, seed=0, transforms=T.train_transforms((32, 32), (32, 32)))
    batch = torch.utils.data.default_collate([dataset[i] for i in range(4)])
    model = models.build_segmentor("ann_r18_d8", 6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scheduler = PolyLR(optimizer, 12)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    log = MetricsLog(tmp_path, enabled=True)
    with tqdm(total=12, disable=True) as bar:
        train_interval(model, itertools.repeat(batch), optimizer, scheduler, scaler, config, DistributedContext(),
                       0, 12, log, bar)
    losses = [r["loss"] for r in records(tmp_path, "train")]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * losses[0] and losses[-1] < min(losses[:3]), losses
    assert scheduler.last_epoch == 12


def run_train(*arguments, timeout=600):
    return subprocess.run([sys.executable, "train/train.py", *arguments], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_resume_after_kill_continues_iterations_and_lr_exactly(tmp_path):
    work_dir = tmp_path / "work"
    arguments = [*TINY, "--iterations", "24", "--ckpt-interval", "8", "--eval-interval", "24", "--work-dir",
                 str(work_dir)]
    process = subprocess.Popen([sys.executable, "train/train.py", *arguments], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (work_dir / "iter_8.pth").exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()

    killed_at = torch.load(work_dir / "latest.pth", weights_only=True)["iteration"]
    assert killed_at in (8, 16), "killed after the last checkpoint: the test could not check a resume"
    before = {r["iteration"]: r["lr"] for r in records(work_dir, "train")}
    assert max(before) < 24

    result = run_train(*arguments, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {work_dir / 'latest.pth'} at iteration {killed_at}" in result.stdout
    after = [r for r in records(work_dir, "train") if r["iteration"] > killed_at][-(24 - killed_at):]
    assert [r["iteration"] for r in after] == list(range(killed_at + 1, 25))
    for record in after:
        assert record["lr"] == pytest.approx(poly(record["iteration"], 24), rel=1e-12)
        if record["iteration"] in before:  # the killed run reached it too: same lr
            assert record["lr"] == pytest.approx(before[record["iteration"]], rel=1e-12)
    final = torch.load(work_dir / "latest.pth", weights_only=True)
    assert final["iteration"] == 24 and final["lr_scheduler"]["last_epoch"] == 24
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    for name in ("predictions.png", "curves.png", "eval.json", "config.yaml"):
        assert (work_dir / name).is_file()


def test_ddp_two_cpu_processes(tmp_path):
    work_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "train/train.py", *TINY, "--iterations", "3", "--eval-interval", "3", "--ckpt-interval", "3",
               "--work-dir", str(work_dir)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch 2x2 process(es)" in result.stdout
    assert "SyncBatchNorm only runs on CUDA" in result.stdout
    assert result.stdout.count("iteration 3: mIoU") == 1  # rank 0 logs alone

    # The all-reduced confusion matrix counts every validation pixel exactly once (5 scenes over 2 ranks).
    labelled = sum(int((SyntheticScenes("val", length=5, size=32, seed=0)[i][1] != 255).sum()) for i in range(5))
    ddp_result = json.loads((work_dir / "eval.json").read_text())
    assert ddp_result["pixels"] == labelled
    assert len(records(work_dir, "train")) == 3

    # One process evaluating rank 0's checkpoint agrees with the two-process evaluation.
    single = subprocess.run([sys.executable, "train/eval.py", "--checkpoint", str(work_dir / "latest.pth"),
                             "--workers", "0", "--no-progress", "--out", str(tmp_path / "single.json")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    single_result = json.loads((tmp_path / "single.json").read_text())
    assert single_result["pixels"] == labelled
    assert single_result["mIoU"] == pytest.approx(ddp_result["mIoU"], abs=0.2)
