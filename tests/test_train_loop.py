"""The training script end to end on synthetic scenes: loss goes down, kill + resume continues exactly, DDP with
two CPU processes (gloo) shards the data and all-reduces the metric, a worker killed under torchrun is restarted
and resumes, a diverging run stops keeping its last good checkpoint."""

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
from PIL import Image
from tqdm import tqdm

from annkernels import models
from annkernels.train import transforms as T
from annkernels.train.config import resolve_config
from annkernels.train.distributed import DistributedContext
from annkernels.train.metrics import MetricsLog
from annkernels.train.synthetic import SyntheticScenes
from annkernels.train.train import PolyLR, train_interval

REPO = Path(__file__).resolve().parents[1]

# Small and quick: ann_r18_d8 on 32x32 scenes, one thread per process so parallel jobs do not thrash.
TINY = ["--synthetic-size", "32", "--crop-size", "32", "32", "--scale", "32", "32", "--batch-size", "2",
        "--workers", "0", "--cpu-threads", "1", "--log-interval", "1", "--no-progress", "--num-preview", "1",
        "--no-eval-at-start", "--synthetic-val-length", "5"]


def records(work_dir, kind):
    lines = (Path(work_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def poly(iteration, total, lr=0.04, min_lr=1e-4, power=0.9):
    """lr of 1-based iteration `iteration` (docs/ann-spec.md §3: t = iteration - 1, T = total - 1)."""
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
    total = 16
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


def test_fast_flag_evaluates_and_infers_with_the_optimised_model(tmp_path):
    """eval.py and infer.py --fast go through models.optimize_for_inference and score as the plain model does.
    Dynamo is disabled so the wiring is checked without minutes of inductor compiling on a CPU."""
    work_dir = tmp_path / "run"
    trained = run_train(*TINY, "--iterations", "2", "--eval-interval", "2", "--ckpt-interval", "2",
                        "--work-dir", str(work_dir))
    assert trained.returncode == 0, trained.stderr[-3000:]
    environment = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    scores = {}
    for fast in (False, True):
        out = tmp_path / f"eval-{fast}.json"
        result = subprocess.run([sys.executable, "train/eval.py", "--checkpoint", str(work_dir / "latest.pth"),
                                 "--workers", "0", "--no-progress", "--out", str(out), *(["--fast"] if fast else [])],
                                cwd=REPO, capture_output=True, text=True, timeout=300, env=environment)
        assert result.returncode == 0, result.stderr[-3000:]
        scores[fast] = json.loads(out.read_text())
    assert scores[True]["pixels"] == scores[False]["pixels"]
    assert scores[True]["mIoU"] == pytest.approx(scores[False]["mIoU"], abs=0.2)

    image = tmp_path / "scene.png"
    Image.fromarray(SyntheticScenes("val", length=1, size=32, seed=0)[0][0]).save(image)
    inferred = subprocess.run([sys.executable, "train/infer.py", str(image), "--checkpoint",
                               str(work_dir / "latest.pth"), "--fast", "--out-dir", str(tmp_path / "predictions")],
                              cwd=REPO, capture_output=True, text=True, timeout=300, env=environment)
    assert inferred.returncode == 0, inferred.stderr[-3000:]
    assert "torch.compile (inductor, freezing)" in inferred.stdout
    assert (tmp_path / "predictions" / "scene_mask.png").is_file()
