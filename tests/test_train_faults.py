"""Faults a long run meets: a worker process killed under torchrun (elastic restart resumes), a loss that turns
non-finite, fp16 gradient overflow, a dead DataLoader worker, a disk that fills up while checkpointing."""

import errno
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from train import transforms as T
from train.config import resolve_config
from train.distributed import DistributedContext
from train.engine import (
    MetricsLog,
    PolyLR,
    TrainingError,
    infinite_batches,
    next_batch,
    save_training_state,
)
from train.synthetic import SyntheticScenes
from train.train import train_interval

REPO = Path(__file__).resolve().parents[1]
TINY = ["--synthetic-size", "32", "--crop-size", "32", "32", "--scale", "32", "32", "--batch-size", "2",
        "--workers", "0", "--cpu-threads", "1", "--log-interval", "1", "--no-progress", "--num-preview", "1",
        "--no-eval-at-start", "--synthetic-val-length", "4"]


def records(work_dir, kind):
    lines = (Path(work_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def poly(iteration, total, lr=0.04, min_lr=1e-4, power=0.9):
    return (lr - min_lr) * (1 - (iteration - 1) / (total - 1)) ** power + min_lr


def children_with_rank(parent_pid: int, rank: int) -> list[int]:
    """Processes started by `parent_pid` whose environment says RANK=`rank` (torchrun's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environment = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == parent_pid and f"RANK={rank}".encode() in environment:
            found.append(int(entry.name))
    return found


def test_elastic_restart_resumes_from_the_last_checkpoint(tmp_path):
    work_dir = tmp_path / "elastic"
    total = 30
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--max-restarts=1", "--monitor-interval=0.2", "train/train.py", *TINY, "--iterations", str(total),
               "--ckpt-interval", "4", "--eval-interval", str(total), "--work-dir", str(work_dir)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (work_dir / "iter_4.pth").exists():
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        (victim,) = children_with_rank(process.pid, rank=1)
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert "torchrun restart 1: continuing from the last checkpoint" in stdout
    resumed_at = int(stdout.split("resumed from ")[1].split(" at iteration ")[1].split()[0])
    assert 4 <= resumed_at < total and resumed_at % 4 == 0

    # Same end as an uninterrupted run: every iteration once after the resume point, on the same schedule.
    after = [r for r in records(work_dir, "train") if r["iteration"] > resumed_at][-(total - resumed_at):]
    assert [r["iteration"] for r in after] == list(range(resumed_at + 1, total + 1))
    for record in after:
        assert record["lr"] == pytest.approx(poly(record["iteration"], total), rel=1e-12)
    final = torch.load(work_dir / "latest.pth", weights_only=True)
    assert final["iteration"] == total and final["lr_scheduler"]["last_epoch"] == total
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)
    assert len(final["rng_states"]) == 2


class PixelClassifier(nn.Module):
    """A stand-in segmentor (a 1x1 conv per head): the loop's logic at a fraction of ann_r18_d8's CPU time."""

    def __init__(self, num_classes=6):
        super().__init__()
        self.out, self.aux = nn.Conv2d(3, num_classes, 1), nn.Conv2d(3, num_classes, 1)

    def forward(self, images):
        return {"out": self.out(images), "aux": self.aux(images)}


def tiny_setup(tmp_path, **overrides):
    config = resolve_config("synthetic", {}, dict(dict(iterations=4, log_interval=1, crop_size=(32, 32),
                                                       work_dir=str(tmp_path)), **overrides))
    dataset = SyntheticScenes("train", length=2, size=32, seed=0, transforms=T.train_transforms((32, 32), (32, 32)))
    batch = torch.utils.data.default_collate([dataset[i] for i in range(2)])
    model = PixelClassifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return config, batch, model, optimizer, PolyLR(optimizer, config["iterations"])


def test_non_finite_loss_stops_before_the_update_naming_iteration_and_terms(tmp_path):
    config, batch, model, optimizer, scheduler = tiny_setup(tmp_path)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    poisoned = (torch.full_like(batch[0], float("nan")), batch[1])
    log = MetricsLog(tmp_path, enabled=True)
    with tqdm(disable=True) as bar:
        train_interval(model, iter([batch]), optimizer, scheduler, scaler, config, DistributedContext(), 0, 1, log, bar)
        weights = {name: value.clone() for name, value in model.named_parameters()}
        with pytest.raises(TrainingError, match=r"loss is nan at iteration 2 \(loss_out nan, .*loss_aux nan"):
            train_interval(model, iter([poisoned]), optimizer, scheduler, scaler, config, DistributedContext(), 1, 2,
                           log, bar)
    assert all(torch.equal(value, weights[name]) for name, value in model.named_parameters())
    assert scheduler.last_epoch == 1


def test_diverging_run_exits_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
    work_dir = tmp_path / "work"
    result = subprocess.run([sys.executable, "train/train.py", *TINY, "--lr", "1e30", "--iterations", "6",
                             "--ckpt-interval", "1", "--eval-interval", "6", "--work-dir", str(work_dir)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: loss is ") and "(loss_out " in last_line
    failed_at = int(last_line.split(" at iteration ")[1].split()[0])
    assert f"The last checkpoint, {work_dir / 'latest.pth'}, is intact." in last_line
    kept = torch.load(work_dir / "latest.pth", weights_only=True)
    assert kept["iteration"] == failed_at - 1
    assert all(torch.isfinite(value).all() for value in kept["model"].values() if value.is_floating_point())


def test_fp16_overflow_skips_are_logged_not_failures(tmp_path):
    config, batch, model, optimizer, scheduler = tiny_setup(tmp_path, amp="fp16", log_interval=3)
    # A loss scale of 2^100 overflows fp16 gradients until the scaler has backed off far enough.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    weights = {name: value.clone() for name, value in model.named_parameters()}
    with tqdm(disable=True) as bar:
        train_interval(model, itertools.repeat(batch), optimizer, scheduler, scaler, config, DistributedContext(), 0,
                       3, MetricsLog(tmp_path, enabled=True), bar)
    (record,) = records(tmp_path, "train")
    assert record["skipped_steps"] == 3 and record["loss_scale"] == 2.0**97
    assert all(torch.equal(value, weights[name]) for name, value in model.named_parameters())


class DiesInWorker(Dataset):
    """Its worker process kills itself, as the kernel's out-of-memory killer would."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.long)


def test_dead_dataloader_worker_is_a_clear_error(tmp_path):
    config = resolve_config("synthetic", {}, dict(work_dir=str(tmp_path)))
    batches = infinite_batches(DataLoader(DiesInWorker(), batch_size=2, num_workers=1), start_iteration=0)
    with pytest.raises(TrainingError, match=r"data loading failed at iteration 7: DataLoader worker .* "
                                            r"No checkpoint had been written yet.*fewer --workers"):
        next_batch(batches, 7, config)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    config, _, model, optimizer, scheduler = tiny_setup(tmp_path)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    context = DistributedContext()
    save_training_state(tmp_path, 1, model, optimizer, scheduler, scaler, config, None, context)
    before = (tmp_path / "latest.pth").read_bytes()

    real_save = torch.save

    def save_half_then_fill_the_disk(obj, file):
        whole = io.BytesIO()
        real_save(obj, whole)
        file.write(whole.getvalue()[: len(whole.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half_then_fill_the_disk)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(TrainingError, match=r"cannot write checkpoint .*iter_2.pth: \[Errno 28\] No space left on "
                                            r"device\. The last checkpoint, .*latest.pth, is intact\."):
        save_training_state(tmp_path, 2, model, optimizer, scheduler, scaler, config, None, context)
    assert (tmp_path / "latest.pth").read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["iter_1.pth", "latest.pth"]
    assert torch.load(tmp_path / "latest.pth", weights_only=True)["iteration"] == 1
