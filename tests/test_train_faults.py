"""Faults a long run meets, in-process: a loss that turns non-finite, fp16 gradient overflow, a dead DataLoader
worker, a disk that fills up while checkpointing. (The elastic restart under torchrun and a diverging run of the
script are in test_train_loop.py.)"""

import errno
import io
import itertools
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from annkernels.train import train as train_module
from annkernels.train import transforms as T
from annkernels.train.cli import TrainingError
from annkernels.train.config import resolve_config
from annkernels.train.distributed import DistributedContext
from annkernels.train.metrics import MetricsLog
from annkernels.train.synthetic import SyntheticScenes
from annkernels.train.train import PolyLR, next_batch, save_training_state, train_interval


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
    return config, batch, model, optimizer, PolyLR(optimizer, config.iterations)


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


# torch warns when the scheduler steps after a step the scaler skipped; skipping is what this test provokes.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_fp16_overflow_skips_are_logged_not_failures(tmp_path):
    config, batch, model, optimizer, scheduler = tiny_setup(tmp_path, amp="fp16", log_interval=3)
    # A loss scale of 2^100 overflows fp16 gradients until the scaler has backed off far enough.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    weights = {name: value.clone() for name, value in model.named_parameters()}
    with tqdm(disable=True) as bar:
        train_interval(model, itertools.repeat(batch), optimizer, scheduler, scaler, config, DistributedContext(), 0,
                       3, MetricsLog(tmp_path, enabled=True), bar)
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
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
    batches = iter(DataLoader(DiesInWorker(), batch_size=2, num_workers=1))
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
    with pytest.raises(TrainingError, match=r"cannot write checkpoint .*iter_2.pth: No space left on "
                                            r"device\. The last checkpoint, .*latest.pth, is intact\."):
        save_training_state(tmp_path, 2, model, optimizer, scheduler, scaler, config, None, context)
    assert (tmp_path / "latest.pth").read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["iter_1.pth", "latest.pth"]
    assert torch.load(tmp_path / "latest.pth", weights_only=True)["iteration"] == 1


def _checkpoint_on_rank(rank: int, work_dir: str, init_file: str):
    """One process of a two-rank gloo group saving a checkpoint; rank 0's disk is full. Each rank writes the
    error it raised, if any, to rank<r>.txt."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        config, _, model, optimizer, scheduler = tiny_setup(work_dir)
        if rank == 0:
            def disk_full(state, work_dir, iteration):
                raise OSError(errno.ENOSPC, "No space left on device")

            train_module.save_training_checkpoint = disk_full
        context = DistributedContext(rank=rank, world_size=2)
        try:
            save_training_state(Path(work_dir), 2, model, optimizer, scheduler,
                                torch.amp.GradScaler("cpu", enabled=False), config, None, context)
        except TrainingError as error:
            Path(work_dir, f"rank{rank}.txt").write_text(str(error))
    finally:
        torch.distributed.destroy_process_group()
    # The outcome is on disk. A spawned process that built the training objects and then ran a gloo collective
    # aborts now and then in interpreter teardown, after this function has returned ("terminate called without
    # an active exception", no Python frame; about 1 run in 4 here, with or without a barrier, whether the write
    # fails or not; not seen with either half alone). Leaving without the teardown keeps that out of the test.
    os._exit(0)


@pytest.mark.timeout(180)
def test_under_torchrun_a_checkpoint_rank_0_cannot_write_stops_every_rank(tmp_path):
    """Rank 0 alone writes checkpoints; if its write fails, the other ranks must stop too, not train on into an
    all-reduce that rank 0 never joins."""
    torch.multiprocessing.spawn(_checkpoint_on_rank, args=(str(tmp_path), str(tmp_path / "rendezvous")), nprocs=2)
    assert (tmp_path / "rank0.txt").read_text().startswith(f"cannot write checkpoint {tmp_path / 'iter_2.pth'}: "
                                                           "No space left on device.")
    assert (tmp_path / "rank1.txt").read_text() == (f"rank 0 could not write checkpoint {tmp_path / 'iter_2.pth'}; "
                                                    "stopping with it")
