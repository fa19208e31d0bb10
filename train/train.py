"""Train an ANN segmentor (mmseg recipe) on the built-in synthetic scenes, ADE20K, Cityscapes or VOC12aug.

    python train/train.py                                   # synthetic, ann_r18_d8, a few CPU minutes
    torchrun --nproc_per_node=4 train/train.py --dataset cityscapes --pretrained resnet50_v1c.pth
    python train/train.py --dataset ade20k --resume auto    # continue from <work-dir>/latest.pth

Defaults come from the per-dataset recipe (train/config.py), then --config FILE, then the command line.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/train.py`: import `train` the package, not this file
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import os

# OpenMP threads that spin while they wait thrash when other processes share the cores (measured 2-3x slower
# per step on a busy 2-core machine); waiting passively costs little on an idle one. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import random
import resource
import shutil
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

import models
from train import transforms as T
from train.classes import CLASSES, PALETTES
from train.config import ConfigError, load_config_file, resolve_config, save_config
from train.datasets import CorruptFileError, DatasetLayoutError, build_dataset
from train.distributed import DistributedContext, ShardSampler, cleanup, init_distributed, mean_over_processes
from train.inference import predict_probabilities
from train.metrics import ConfusionMatrix, format_table
from train.visualize import plot_curves, prediction_grid

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="ANN semantic segmentation training", add_help=add_help)
    flag = argparse.BooleanOptionalAction
    parser.add_argument("--config", help="YAML/JSON file of config keys (e.g. a saved config.yaml)")
    parser.add_argument("--dataset", choices=["synthetic", "ade20k", "cityscapes", "voc12aug"],
                        help="dataset (default: synthetic)")
    parser.add_argument("--data-root", help="dataset root (default: data/ade/ADEChallengeData2016, "
                                            "data/cityscapes or data/VOCdevkit/VOC2012)")
    parser.add_argument("--model", help="ann_r18_d8, ann_r50_d8 (recipe default) or ann_r101_d8")
    parser.add_argument("--num-classes", type=int, help="number of classes (default: the dataset's)")
    parser.add_argument("--work-dir", help="output folder (default: work_dirs/<dataset>_<model>)")
    parser.add_argument("--iterations", type=int, help="training iterations (recipe: 40k/80k/20k)")
    parser.add_argument("--batch-size", type=int, help="images per process (recipe: 2 Cityscapes, 4 ADE/VOC)")
    parser.add_argument("--workers", type=int, help="data loading worker processes per process")
    parser.add_argument("--lr", type=float, help="initial learning rate (recipe: 0.01)")
    parser.add_argument("--momentum", type=float, help="SGD momentum (0.9)")
    parser.add_argument("--weight-decay", type=float, help="SGD weight decay on all parameters (5e-4)")
    parser.add_argument("--poly-power", type=float, help="poly schedule power (0.9)")
    parser.add_argument("--min-lr", type=float, help="poly schedule final learning rate (1e-4)")
    parser.add_argument("--aux-weight", type=float, help="auxiliary head loss weight (0.4)")
    parser.add_argument("--avg-non-ignore", action=flag, help="average the loss over non-ignored pixels only")
    parser.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), help="training crop")
    parser.add_argument("--scale", type=int, nargs=2, metavar=("W", "H"), help="base train/test scale")
    parser.add_argument("--ratio-range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="random resize ratios")
    parser.add_argument("--cat-max-ratio", type=float, help="random crop max single-class share (0.75)")
    parser.add_argument("--photometric", action=flag, help="photometric distortion (on)")
    parser.add_argument("--align-corners", action=flag, help="bilinear align_corners in the model and test")
    parser.add_argument("--dropout", type=float, help="head dropout ratio (0.1)")
    parser.add_argument("--eval-interval", type=int, help="evaluate every N iterations (iterations/10)")
    parser.add_argument("--ckpt-interval", type=int, help="checkpoint every N iterations (iterations/10)")
    parser.add_argument("--log-interval", type=int, help="log every N iterations")
    parser.add_argument("--eval-at-start", action=flag, help="evaluate the untrained model first")
    parser.add_argument("--eval-mode", choices=["whole", "slide"], help="test inference mode")
    parser.add_argument("--eval-crop-size", type=int, nargs=2, metavar=("H", "W"), help="slide window")
    parser.add_argument("--eval-stride", type=int, nargs=2, metavar=("H", "W"), help="slide stride")
    parser.add_argument("--seed", type=int, help="random seed (each process adds its rank)")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], help="mixed precision (fp16 uses GradScaler)")
    parser.add_argument("--channels-last", action=flag, help="channels_last memory format")
    parser.add_argument("--compile", action=flag, help="torch.compile the model")
    parser.add_argument("--backend", help="annkernels backend: auto, cpu, cuda, triton or reference")
    parser.add_argument("--sync-bn", action=flag, help="SyncBatchNorm when distributed on GPUs (on)")
    parser.add_argument("--pretrained", help="ImageNet ResNet-V1c backbone checkpoint")
    parser.add_argument("--resume", help="checkpoint to continue from, or 'auto' for <work-dir>/latest.pth")
    parser.add_argument("--test-only", action="store_true", default=None, help="only evaluate (weights: --resume)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--cpu-threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--progress", action=flag, help="tqdm progress bars (on)")
    parser.add_argument("--num-preview", type=int, help="validation images in the predictions PNG")
    parser.add_argument("--synthetic-size", type=int, help="synthetic scene side in pixels")
    parser.add_argument("--synthetic-train-length", type=int, help="synthetic training scenes")
    parser.add_argument("--synthetic-val-length", type=int, help="synthetic validation scenes")
    return parser


def config_from_args(args) -> dict:
    file_values = load_config_file(args.config) if args.config else {}
    dataset = args.dataset or file_values.get("dataset") or "synthetic"
    cli_values = {k: v for k, v in vars(args).items() if k not in ("config", "dataset")}
    return resolve_config(dataset, {k: v for k, v in file_values.items() if k != "dataset"}, cli_values)


def short_error(error: BaseException) -> str:
    """The message of an error, without the worker traceback a DataLoader wraps around errors it re-raises."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught "):
        prefix = f"{type(error).__name__}: "
        for line in reversed(lines):
            if prefix in line:
                return line.split(prefix, 1)[1]
    return str(error).strip()


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_datasets(config: dict):
    synthetic = config["dataset"] == "synthetic"
    options = dict(size=config["synthetic_size"], seed=config["seed"]) if synthetic else {}
    train_transforms = T.train_transforms(config["scale"], config["crop_size"], config["ratio_range"],
                                          config["cat_max_ratio"], config["photometric"])
    train_set = build_dataset(config["dataset"], config["data_root"], config["train_split"], train_transforms,
                              **(dict(options, length=config["synthetic_train_length"]) if synthetic else {}))
    val_set = build_dataset(config["dataset"], config["data_root"], config["val_split"], T.eval_transforms(),
                            **(dict(options, length=config["synthetic_val_length"]) if synthetic else {}))
    return train_set, val_set


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


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
        os.link(path, temporary)
    except OSError:
        shutil.copyfile(path, temporary)
    os.replace(temporary, work_dir / "latest.pth")
    return path


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
# Training and evaluation


def autocast(config: dict, device: torch.device):
    dtype = AMP_DTYPES[config["amp"]]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def infinite_batches(loader: DataLoader, epoch: int):
    """Endless batches; a DistributedSampler is re-seeded each pass so every pass is shuffled differently."""
    while True:
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_interval(model, batches, optimizer, lr_scheduler, scaler, config, context, start, stop, metrics_log,
                   progress_bar):
    """Runs iterations start+1 .. stop (1-based); returns the mean loss of the last logged window."""
    model.train()
    device = context.device
    window_loss, window_parts, window_start, data_time = [], {}, time.perf_counter(), 0.0
    last_logged = None
    for iteration in range(start + 1, stop + 1):
        fetch_start = time.perf_counter()
        images, targets = next(batches)
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if config["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        data_time += time.perf_counter() - fetch_start
        lr = optimizer.param_groups[0]["lr"]
        with autocast(config, device):
            outputs = model(images)
            loss, parts = models.segmentation_loss(outputs, targets, aux_weight=config["aux_weight"],
                                                   avg_non_ignore=config["avg_non_ignore"],
                                                   align_corners=config["align_corners"])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr_scheduler.step()

        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at iteration {iteration}")
        window_loss.append(loss.item())
        for key, value in parts.items():
            window_parts.setdefault(key, []).append(float(value.detach()) if torch.is_tensor(value) else value)
        progress_bar.update(1)
        if iteration % config["log_interval"] == 0 or iteration == stop:
            elapsed = time.perf_counter() - window_start
            stats = {"loss": float(np.mean(window_loss))}
            stats.update({key: float(np.mean(values)) for key, values in window_parts.items()})
            stats = mean_over_processes(stats, context)
            record = {"kind": "train", "iteration": iteration, "lr": lr, **stats,
                      "time_per_iter": elapsed / len(window_loss), "data_time_per_iter": data_time / len(window_loss),
                      "peak_memory_mb": peak_memory_mb(device)}
            metrics_log.write(record)
            progress_bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}",
                                     mem=f"{record['peak_memory_mb']:.0f}MB", refresh=False)
            last_logged = stats["loss"]
            window_loss, window_parts, window_start, data_time = [], {}, time.perf_counter(), 0.0
    return last_logged


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
    crop_size = config["eval_crop_size"] or config["crop_size"]
    stride = config["eval_stride"] or tuple(max(1, 2 * c // 3) for c in crop_size)
    for image, target in tqdm(loader, desc="eval", leave=False, disable=not (progress and context.is_main)):
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast(config, device):
            scores = predict_probabilities(model, image, config["scale"], config["num_classes"],
                                           mode=config["eval_mode"], crop_size=crop_size, stride=stride,
                                           aug_test=aug_test, align_corners=config["align_corners"],
                                           channels_last=config["channels_last"])
        confusion.update(scores.argmax(1), target)
    confusion.all_reduce()
    model.train(was_training)
    return confusion.compute(class_names)


@torch.no_grad()
def save_predictions_png(model, dataset, config, context, path: Path) -> None:
    """image | ground truth | prediction for the first validation images."""
    model.eval()
    rows = []
    for index in range(min(config["num_preview"], len(dataset))):
        image, target = dataset[index]
        with autocast(config, context.device):
            scores = predict_probabilities(model, image[None].to(context.device), config["scale"],
                                           config["num_classes"], align_corners=config["align_corners"])
        prediction = scores.argmax(1)[0].cpu().numpy().astype(np.uint8)
        rows.append((image.permute(1, 2, 0).numpy(), target.numpy().astype(np.uint8), prediction))
    prediction_grid(rows, PALETTES.get(config["dataset"], PALETTES["synthetic"]), path)


def class_names_for(config: dict):
    names = CLASSES.get(config["dataset"])
    if names is None or len(names) != config["num_classes"]:
        return [str(i) for i in range(config["num_classes"])]
    return names


def load_training_state(path, model, optimizer, lr_scheduler, scaler, context, log):
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
    return checkpoint


def gather_rng_states(context: DistributedContext) -> list:
    if not context.enabled:
        return [rng_states()]
    states = [None] * context.world_size
    torch.distributed.all_gather_object(states, rng_states())
    return states


# ----------------------------------------------------------------------------------------------------------------


def main(args) -> int:
    """Returns the process exit status; data problems print one clear line instead of a traceback."""
    context = None
    try:
        config = config_from_args(args)
        context = init_distributed(config.get("device"))
        return run(config, context)
    except (DatasetLayoutError, CorruptFileError, ConfigError, models.CheckpointError) as error:
        print(f"error: {short_error(error)}", file=sys.stderr)
        return 1
    finally:
        if context is not None:
            cleanup(context)


def run(config: dict, context: DistributedContext) -> int:
    device = context.device
    show_progress = config.get("progress") is not False and context.is_main

    def log(message):
        if context.is_main:
            tqdm.write(message)

    if config.get("cpu_threads"):
        torch.set_num_threads(config["cpu_threads"])
    seed_everything(config["seed"] + context.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    work_dir = Path(config["work_dir"])
    if context.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, work_dir / "config.yaml")
    log(f"{config['model']} on {config['dataset']}: {config['iterations']} iterations, batch "
        f"{config['batch_size']}x{context.world_size} process(es), crop {config['crop_size']}, device {device}, "
        f"work dir {work_dir}")

    train_set, val_set = build_datasets(config)
    workers = config["workers"]
    loader_options = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    if context.enabled:
        train_sampler = DistributedSampler(train_set, context.world_size, context.rank, shuffle=True,
                                           seed=config["seed"], drop_last=True)
    else:
        train_sampler = RandomSampler(train_set)
    train_loader = DataLoader(train_set, batch_size=config["batch_size"], sampler=train_sampler, drop_last=True,
                              **loader_options)
    val_loader = DataLoader(val_set, batch_size=1, sampler=ShardSampler(len(val_set), context), **loader_options)

    model = build_model(config, context, log).to(device)
    if config["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if config.get("pretrained"):
        if not Path(config["pretrained"]).is_file():
            raise ConfigError(f"--pretrained checkpoint not found: {config['pretrained']}")
        models.load_pretrained_backbone(model, config["pretrained"])
        log(f"loaded ImageNet backbone from {config['pretrained']}")
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                                weight_decay=config["weight_decay"])
    lr_scheduler = PolyLR(optimizer, config["iterations"], config["poly_power"], config["min_lr"])
    scaler = torch.amp.GradScaler(device.type, enabled=config["amp"] == "fp16")

    start_iteration = 0
    resume = config.get("resume")
    if resume == "auto":
        resume = work_dir / "latest.pth"
        if not resume.is_file():
            log(f"--resume auto: no {resume} yet, starting from scratch")
            resume = None
    if resume:
        if not Path(resume).is_file():
            raise ConfigError(f"--resume checkpoint not found: {resume}")
        checkpoint = load_training_state(resume, model, optimizer, lr_scheduler, scaler, context, log)
        start_iteration = checkpoint["iteration"]

    model_without_ddp = model
    if config["compile"]:
        model.compile()
    if context.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    class_names = class_names_for(config)
    metrics_log = MetricsLog(work_dir, context.is_main)

    if config.get("test_only"):
        result = evaluate(model_without_ddp, val_loader, config, context, class_names, show_progress)
        log(format_table(result))
        if context.is_main:
            (work_dir / "eval.json").write_text(json.dumps(result, indent=2))
        return 0

    untrained = None
    if config["eval_at_start"] and start_iteration == 0:
        untrained = evaluate(model_without_ddp, val_loader, config, context, class_names, show_progress)
        metrics_log.write({"kind": "eval", "iteration": 0, "mIoU": untrained["mIoU"], "aAcc": untrained["aAcc"]})
        log(f"untrained model: mIoU {untrained['mIoU']}  aAcc {untrained['aAcc']}")

    total = config["iterations"]
    boundaries = sorted({i for i in range(start_iteration + 1, total + 1)
                         if i % config["eval_interval"] == 0 or i % config["ckpt_interval"] == 0 or i == total})
    batches = infinite_batches(train_loader, epoch=start_iteration)
    result, start_time = None, time.perf_counter()
    progress_bar = tqdm(total=total, initial=start_iteration, desc="train", disable=not show_progress,
                        dynamic_ncols=True)
    iteration = start_iteration
    for boundary in boundaries:
        train_interval(model, batches, optimizer, lr_scheduler, scaler, config, context, iteration, boundary,
                       metrics_log, progress_bar)
        iteration = boundary
        if iteration % config["eval_interval"] == 0 or iteration == total:
            result = evaluate(model_without_ddp, val_loader, config, context, class_names, show_progress)
            metrics_log.write({"kind": "eval", "iteration": iteration, "mIoU": result["mIoU"], "aAcc": result["aAcc"],
                               "per_class": result["per_class"]})
            log(f"iteration {iteration}: mIoU {result['mIoU']}  aAcc {result['aAcc']}")
        if iteration % config["ckpt_interval"] == 0 or iteration == total:
            states = gather_rng_states(context)
            if context.is_main:
                state = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                         "lr_scheduler": lr_scheduler.state_dict(),
                         "scaler": scaler.state_dict() if scaler.is_enabled() else None, "iteration": iteration,
                         "rng_states": states, "config": config, "metrics": result}
                path = save_checkpoint(state, work_dir, iteration)
                log(f"saved {path}")
    progress_bar.close()
    elapsed = time.perf_counter() - start_time

    if context.is_main:
        metrics_log.close()
        if result is not None:
            log(format_table(result))
            (work_dir / "eval.json").write_text(json.dumps(result, indent=2))
        save_predictions_png(model_without_ddp, val_set, config, context, work_dir / "predictions.png")
        if metrics_log.path.is_file():
            plot_curves(metrics_log.path, work_dir / "curves.png")
        summary = f"trained {total - start_iteration} iterations in {elapsed / 60:.1f} min"
        if untrained is not None and result is not None:
            summary += f"; mIoU untrained {untrained['mIoU']} -> trained {result['mIoU']}"
        elif result is not None:
            summary += f"; mIoU {result['mIoU']}"
        log(f"{summary}; peak memory {peak_memory_mb(device):.0f} MB")
        log(f"outputs in {work_dir}: latest.pth, metrics.jsonl, eval.json, predictions.png, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
