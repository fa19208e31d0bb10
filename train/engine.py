"""What train.py, eval.py and infer.py share: data loading, the model and its evaluation, checkpoint and RNG
I/O, the metrics log, the settings of a checkpoint to evaluate, and the command-line error handling."""

import json
import os
import random
import re
import resource
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import models
from models import zoo
from models.checkpoint import newest_training_checkpoint, read_training_checkpoint, save_training_checkpoint
from train.classes import CLASSES, PALETTES
from train.cli import TrainingError, short_error, unwritable
from train.config import ConfigError, resolve_config
from train.distributed import DistributedContext
from train.metrics import ConfusionMatrix
from train.prediction import predict_scores
from train.visualize import prediction_grid

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# How a DataLoader reports a worker process that died (killed, out of memory), as opposed to an error it raised.
_DEAD_WORKER = re.compile(r"DataLoader worker \(pid.*\) (exited unexpectedly|is killed by signal)")


# ----------------------------------------------------------------------------------------------------------------
# The training loop's pieces


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


def last_checkpoint_note(config: dict) -> str:
    latest = Path(config["work_dir"]) / "latest.pth"
    if not latest.is_file():
        return "No checkpoint had been written yet."
    return f"The last checkpoint, {latest}, is intact."


def save_training_state(work_dir: Path, iteration: int, model, optimizer, lr_scheduler, scaler, config: dict,
                        metrics, context: DistributedContext):
    """Every process's RNG states, then (rank 0) the checkpoint iter_{iteration}.pth + latest.pth; its path.

    A failed write (disk full, read-only, ...) raises TrainingError and leaves the previous checkpoints as they were.
    """
    states = gather_rng_states(context)
    if not context.is_main:
        return None
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "lr_scheduler": lr_scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
             "iteration": iteration, "rng_states": states, "config": config, "metrics": metrics}
    try:
        return Path(save_training_checkpoint(state, work_dir, iteration))
    except OSError as error:
        raise TrainingError(f"cannot write checkpoint {work_dir / f'iter_{iteration}.pth'}: "
                            f"{error.strerror or error}. "
                            f"{last_checkpoint_note(config)}") from error


def resume_checkpoint(config: dict, work_dir: Path, log):
    """(path, checkpoint) to continue from, read and checked, or None to start from scratch.

    After a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) and with --resume auto: the newest readable
    checkpoint of the work dir, each unreadable one named in one line and skipped. --resume PATH: that file, or
    CheckpointError.
    """
    resume = config.get("resume")
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart > 0 or resume == "auto":
        found = newest_training_checkpoint(work_dir, lambda path, error: log(f"skipping {path}: {error}"))
        if found is None:
            log(f"{'torchrun restart' if restart else '--resume auto'}: no readable checkpoint in {work_dir}, "
                "starting from scratch")
        elif restart > 0:
            log(f"torchrun restart {restart}: continuing from the last checkpoint")
        return found
    if not resume:
        return None
    if not Path(resume).is_file():
        raise ConfigError(f"--resume checkpoint not found: {resume}")
    return resume, read_training_checkpoint(resume)


def load_training_state(path, checkpoint: dict, config: dict, model, optimizer, lr_scheduler, scaler, context,
                        log) -> int:
    """Restores everything save_training_state wrote; returns the checkpoint's iteration. A checkpoint of another
    architecture or class count is a CheckpointError naming both, before anything changes."""
    saved = checkpoint.get("config") or {}
    trained = (saved.get("model"), saved.get("num_classes"))
    if None not in trained and trained != (config["model"], config["num_classes"]):
        raise models.CheckpointError(f"{path} holds {trained[0]} with {trained[1]} classes; this run builds "
                                     f"{config['model']} with {config['num_classes']} (--model, --num-classes)")
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise models.CheckpointError(f"{path} does not fit this run: {short_error(error).splitlines()[0]}") from None
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


def _iteration_of(line: str, unreadable: int) -> int:
    """The iteration of a metrics.jsonl line; `unreadable` for a line cut off by a killed run."""
    try:
        return json.loads(line)["iteration"]
    except (ValueError, KeyError, TypeError):
        return unreadable


class MetricsLog:
    """JSONL metrics file (one flushed line per record) plus TensorBoard scalars when tensorboard is installed.

    Records of iterations after `start_iteration` (those of a run that went on past the checkpoint this one resumes
    from, or of an earlier run in the same work dir) are dropped, from the file and from TensorBoard, so every
    iteration appears once. A record that cannot be written raises TrainingError, ending with `note()`.
    """

    def __init__(self, work_dir: Path, enabled: bool, start_iteration: int = 0, note=lambda: ""):
        self.enabled, self.note = enabled, note
        self.path = work_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if start_iteration and _iteration_of(line, start_iteration + 1) <= start_iteration]
            temporary = self.path.with_name(".metrics.jsonl.tmp")
            temporary.write_text("".join(line + "\n" for line in kept))
            os.replace(temporary, self.path)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(work_dir / "tensorboard"), purge_step=start_iteration + 1)
        except ImportError:
            self.writer = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as file:
                file.write(json.dumps(record) + "\n")
        except OSError as error:
            raise TrainingError(f"{unwritable(error)} at iteration {record['iteration']}. {self.note()}") from None
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
    settings, then the command line's values (None = not given). One of our checkpoints always gives its
    architecture and class count: an option or dataset contradicting them is a ConfigError saying so. Its other
    model and test settings apply when it was trained on `dataset`; for a released mmseg model, the zoo's test
    settings apply on its own dataset.
    """
    path = models.checkpoint_file(source)
    saved = read_saved_config(path)
    released = zoo.RELEASED.get(str(source))
    dataset = dataset or saved.get("dataset") or (released.dataset if released else "synthetic")
    if saved:
        recorded = {key: saved[key] for key in ("model", "num_classes") if key in saved}
        trained = f"{path} holds {saved.get('model')} with {saved.get('num_classes')} classes, trained on " \
                  f"{saved.get('dataset')}"
        for key, value in recorded.items():
            if cli_values.get(key) is not None and cli_values[key] != value:
                raise ConfigError(f"--{key.replace('_', '-')} {cli_values[key]} contradicts the checkpoint: {trained}")
        classes = resolve_config(dataset, {}, {})["num_classes"]
        if saved.get("dataset") != dataset and classes != recorded.get("num_classes"):
            raise ConfigError(f"--dataset {dataset} has {classes} classes: {trained}")
        inherited = {k: saved[k] for k in MODEL_KEYS if k in saved} if saved.get("dataset") == dataset else recorded
    elif released is not None and released.dataset == dataset:
        inherited = released.test_settings()
    else:
        inherited = {}
    return resolve_config(dataset, inherited, cli_values), path
