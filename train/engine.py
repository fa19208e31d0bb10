"""What train.py, eval.py and infer.py share: data loading, the model and its evaluation, checkpoint and RNG
I/O, the metrics log, the settings of a checkpoint to evaluate, and the command-line error handling."""

import functools
import json
import os
import random
import re
import resource
import shutil
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

import models
from models import zoo
from train import transforms as T
from train.classes import CLASSES, PALETTES
from train.config import ConfigError, resolve_config
from train.datasets import CorruptFileError, DatasetLayoutError, build_dataset
from train.distributed import DistributedContext, ShardSampler
from train.metrics import ConfusionMatrix
from train.prediction import predict_scores
from train.visualize import prediction_grid

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# How a DataLoader reports a worker process that died (killed, out of memory), as opposed to an error it raised.
_DEAD_WORKER = re.compile(r"DataLoader worker \(pid.*\) (exited unexpectedly|is killed by signal)")


class TrainingError(RuntimeError):
    """Training cannot go on (diverged loss, dead data worker, unwritable checkpoint); checkpoints are intact."""


# ----------------------------------------------------------------------------------------------------------------
# Data


def build_split(config: dict, split: str, transforms, synthetic_length: int):
    """One split of the configured dataset; for the synthetic scenes, `synthetic_length` of them."""
    options = {}
    if config["dataset"] == "synthetic":
        options = dict(size=config["synthetic_size"], seed=config["seed"], length=synthetic_length)
    return build_dataset(config["dataset"], config["data_root"], split, transforms, **options)


def build_loaders(config: dict, context: DistributedContext):
    """Training loader (shuffled; sharded over processes) and validation loader (each image scored once)."""
    train_transforms = T.train_transforms(config["scale"], config["crop_size"], config["ratio_range"],
                                          config["cat_max_ratio"], config["photometric"])
    train_set = build_split(config, config["train_split"], train_transforms, config["synthetic_train_length"])
    val_set = build_split(config, config["val_split"], T.eval_transforms(), config["synthetic_val_length"])
    workers = config["workers"]
    loader_options = dict(num_workers=workers, pin_memory=context.device.type == "cuda",
                          persistent_workers=workers > 0)
    if context.enabled:
        train_sampler = DistributedSampler(train_set, context.world_size, context.rank, shuffle=True,
                                           seed=config["seed"], drop_last=True)
    else:
        train_sampler = RandomSampler(train_set)
    train_loader = DataLoader(train_set, batch_size=config["batch_size"], sampler=train_sampler, drop_last=True,
                              **loader_options)
    val_loader = DataLoader(val_set, batch_size=1, sampler=ShardSampler(len(val_set), context), **loader_options)
    return train_loader, val_loader


def infinite_batches(loader: DataLoader, start_iteration: int):
    """Endless batches. A DistributedSampler is reshuffled for every pass with set_epoch(start_iteration + pass
    number): a resumed run draws a fresh order instead of replaying the one the first run began with."""
    shuffle = start_iteration
    while True:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(shuffle)
        yield from loader
        shuffle += 1


def next_batch(batches, iteration: int, config: dict):
    """next(batches), with a DataLoader worker that died turned into a TrainingError that says what to do."""
    try:
        return next(batches)
    except RuntimeError as error:
        if not _DEAD_WORKER.search(str(error)):
            raise
        raise TrainingError(f"data loading failed at iteration {iteration}: {short_error(error)}. "
                            f"{last_checkpoint_note(config)} A worker killed by the system is often out of "
                            "memory: try fewer --workers, then --resume auto.") from error


def diverged(loss: torch.Tensor, parts: dict, iteration: int, config: dict) -> TrainingError:
    """The error for a non-finite loss, naming the iteration and every loss term."""
    terms = ", ".join(f"{key} {float(value.detach()):.4g}" for key, value in parts.items())
    advice = "a lower --lr" + (" or --amp off" if config["amp"] != "off" else "")
    return TrainingError(f"loss is {loss.item()} at iteration {iteration} ({terms}); stopped before updating the "
                         f"weights. {last_checkpoint_note(config)} Try {advice}.")


# ----------------------------------------------------------------------------------------------------------------
# The model, its schedule and its evaluation


def build_model(config: dict, context: DistributedContext, log=print) -> nn.Module:
    model = models.build_segmentor(config["model"], config["num_classes"], norm_layer=nn.BatchNorm2d,
                                   align_corners=config["align_corners"], dropout=config["dropout"],
                                   backend=config["backend"])
    if context.enabled and config["sync_bn"]:
        if context.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log("note: SyncBatchNorm only runs on CUDA tensors; each CPU process keeps its own BatchNorm statistics")
    return model


class PolyLR(torch.optim.lr_scheduler.LRScheduler):
    """lr_t = (lr0 - min_lr) * (1 - t/T)^power + min_lr with T = total_iters - 1 (mmengine PolyLR), so the
    last iteration runs at min_lr. Stepped once per iteration."""

    def __init__(self, optimizer, total_iters: int, power: float = 0.9, min_lr: float = 1e-4, last_epoch: int = -1):
        self.total_iters, self.power, self.min_lr = total_iters, power, min_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        span = max(self.total_iters - 1, 1)
        progress = min(self.last_epoch, span) / span
        return [(base - self.min_lr) * (1 - progress) ** self.power + self.min_lr for base in self.base_lrs]


def autocast(config: dict, device: torch.device):
    dtype = AMP_DTYPES[config["amp"]]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def class_names_for(config: dict):
    names = CLASSES.get(config["dataset"])
    if names is None or len(names) != config["num_classes"]:
        return [str(i) for i in range(config["num_classes"])]
    return names


def slide_windows(config: dict):
    """(window, stride) of slide-mode inference: eval_crop_size or the training crop, eval_stride or 2/3 of it."""
    crop_size = config["eval_crop_size"] or config["crop_size"]
    return crop_size, config["eval_stride"] or tuple(max(1, 2 * c // 3) for c in crop_size)


@torch.no_grad()
def evaluate(model, loader, config, context, class_names, progress=True, aug_test=False):
    """mIoU/aAcc/per-class IoU over the loader's dataset (sharded over processes; confusion matrix all-reduced).

    Every process first takes rank 0's buffers: with per-process BatchNorm (CPU) the running statistics differ
    after the last step, and the result must be the one rank 0's checkpoint gives.
    """
    if context.enabled:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)
    was_training = model.training
    model.eval()
    device = context.device
    confusion = ConfusionMatrix(config["num_classes"], device=device)
    crop_size, stride = slide_windows(config)
    for image, target in tqdm(loader, desc="eval", leave=False, disable=not (progress and context.is_main)):
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast(config, device):
            scores = predict_scores(model, image, config["scale"], config["num_classes"], mode=config["eval_mode"],
                                    crop_size=crop_size, stride=stride, aug_test=aug_test,
                                    align_corners=config["align_corners"], channels_last=config["channels_last"])
        confusion.update(scores.argmax(1), target)
    confusion.all_reduce()
    model.train(was_training)
    return confusion.compute(class_names)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and random streams


def rng_states() -> dict:
    """Every random stream of this process, as plain Python values and tensors (loadable with weights_only)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), position, has_gauss, cached_gaussian],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather_rng_states(context: DistributedContext) -> list:
    """Every process's rng_states(), in rank order, on every process."""
    if not context.enabled:
        return [rng_states()]
    states = [None] * context.world_size
    torch.distributed.all_gather_object(states, rng_states())
    return states


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: a reader never sees a
    half-written checkpoint, even if this process is killed mid-write."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions of a new file
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def save_checkpoint(state: dict, work_dir: Path, iteration: int) -> Path:
    """Writes iter_{n}.pth, then points latest.pth at the same bytes (hard link, or copy), both atomically."""
    path = work_dir / f"iter_{iteration}.pth"
    atomic_save(state, path)
    handle, temporary = tempfile.mkstemp(dir=work_dir, prefix=".latest.pth.", suffix=".tmp")
    os.close(handle)
    os.unlink(temporary)
    try:
        try:
            os.link(path, temporary)
        except OSError:
            shutil.copyfile(path, temporary)
        os.replace(temporary, work_dir / "latest.pth")
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


def last_checkpoint_note(config: dict) -> str:
    latest = Path(config["work_dir"]) / "latest.pth"
    if not latest.is_file():
        return "No checkpoint had been written yet."
    return f"The last checkpoint, {latest}, is intact."


def save_training_state(work_dir: Path, iteration: int, model, optimizer, lr_scheduler, scaler, config: dict,
                        metrics, context: DistributedContext):
    """Every process's RNG states, then (rank 0) the checkpoint iter_{iteration}.pth + latest.pth; its path.

    A failed write (disk full, ...) raises TrainingError and leaves the previous checkpoints as they were.
    """
    states = gather_rng_states(context)
    if not context.is_main:
        return None
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "lr_scheduler": lr_scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
             "iteration": iteration, "rng_states": states, "config": config, "metrics": metrics}
    try:
        return save_checkpoint(state, work_dir, iteration)
    except OSError as error:
        raise TrainingError(f"cannot write checkpoint {work_dir / f'iter_{iteration}.pth'}: {error}. "
                            f"{last_checkpoint_note(config)}") from error


def resume_path(config: dict, work_dir: Path, log):
    """The checkpoint to continue from: after a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) the work dir's
    latest.pth; else --resume PATH, or with --resume auto latest.pth if there is one. None: start from scratch."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart > 0 and (work_dir / "latest.pth").is_file():
        log(f"torchrun restart {restart}: continuing from the last checkpoint")
        return work_dir / "latest.pth"
    resume = config.get("resume")
    if resume == "auto":
        resume = work_dir / "latest.pth"
        if not resume.is_file():
            log(f"--resume auto: no {resume} yet, starting from scratch")
            return None
    if resume and not Path(resume).is_file():
        raise ConfigError(f"--resume checkpoint not found: {resume}")
    return resume


def load_training_state(path, model, optimizer, lr_scheduler, scaler, context, log) -> int:
    """Restores everything save_training_state wrote; returns the checkpoint's iteration."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    states = checkpoint.get("rng_states") or []
    if len(states) == context.world_size:
        set_rng_states(states[context.rank])
    else:
        log(f"note: checkpoint holds RNG states of {len(states)} processes, this run has {context.world_size}; "
            "random streams restart from the seed")
    log(f"resumed from {path} at iteration {checkpoint['iteration']}")
    return checkpoint["iteration"]


# ----------------------------------------------------------------------------------------------------------------
# Outputs: the predictions preview and the metrics log


@torch.no_grad()
def save_predictions_png(model, dataset, config, device, path: Path) -> None:
    """image | ground truth | prediction for the first validation images."""
    model.eval()
    rows = []
    for index in range(min(config["num_preview"], len(dataset))):
        image, target = dataset[index]
        with autocast(config, device):
            scores = predict_scores(model, image[None].to(device), config["scale"], config["num_classes"],
                                    align_corners=config["align_corners"])
        prediction = scores.argmax(1)[0].cpu().numpy().astype(np.uint8)
        rows.append((image.permute(1, 2, 0).numpy(), target.numpy().astype(np.uint8), prediction))
    prediction_grid(rows, PALETTES.get(config["dataset"], PALETTES["synthetic"]), path)


class MetricsLog:
    """JSONL metrics file (one flushed line per record) plus TensorBoard scalars when tensorboard is installed."""

    def __init__(self, work_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = work_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(work_dir / "tensorboard"))
            except ImportError:
                self.writer = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    self.writer.add_scalar(f"{record['kind']}/{key}", value, record["iteration"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------------------------------------------
# Settings of a checkpoint to evaluate or run (eval.py, infer.py)

# Taken from one of our checkpoints' saved config when the command line leaves them out.
MODEL_KEYS = ("model", "num_classes", "align_corners", "scale", "synthetic_size", "seed", "synthetic_val_length")


def read_saved_config(checkpoint_path) -> dict:
    """The saved config of one of our checkpoints; {} for anything else (mmseg checkpoints, bare state dicts)."""
    checkpoint = models.read_checkpoint(checkpoint_path)
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    return config if isinstance(config, dict) else {}


def checkpoint_config(source, dataset, cli_values: dict):
    """(config, local file) of a checkpoint source (path, URL or zoo name; downloaded if need be).

    The config is the recipe of `dataset` (default: the checkpoint's own, else synthetic), then the checkpoint's
    model settings when it was trained on that dataset (saved in ours; the zoo's test settings for a released
    mmseg model), then the command line's values (None = not given).
    """
    path = models.checkpoint_file(source)
    saved = read_saved_config(path)
    released = zoo.RELEASED.get(str(source))
    dataset = dataset or saved.get("dataset") or (released.dataset if released else "synthetic")
    if saved.get("dataset") == dataset:
        inherited = {k: saved[k] for k in MODEL_KEYS if k in saved}
    elif released is not None and released.dataset == dataset:
        inherited = released.test_settings()
    else:
        inherited = {}
    return resolve_config(dataset, inherited, cli_values), path


# ----------------------------------------------------------------------------------------------------------------
# Command-line errors

# Problems with the user's data, files or options, or a run that cannot go on: one line on stderr, exit status
# 1, no traceback.
REPORTED_ERRORS = (DatasetLayoutError, CorruptFileError, ConfigError, models.CheckpointError, TrainingError)


def short_error(error: BaseException) -> str:
    """The message of an error, without the worker traceback a DataLoader wraps around errors it re-raises."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught "):
        prefix = f"{type(error).__name__}: "
        for line in reversed(lines):
            if prefix in line:
                return line.split(prefix, 1)[1]
    return str(error).strip()


def exit_status(main):
    """Wraps a script's main(args): returns its exit status, and prints REPORTED_ERRORS as `error: <message>`
    (status 1) instead of a traceback."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except REPORTED_ERRORS as error:
            print(f"error: {short_error(error)}", file=sys.stderr)
            return 1

    return run
