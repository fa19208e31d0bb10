"""Train an ANN segmentor (mmseg recipe) on the built-in synthetic scenes, ADE20K, Cityscapes or VOC12aug.

    python train/train.py                                   # synthetic, ann_r18_d8, a few CPU minutes
    torchrun --nproc_per_node=4 train/train.py --dataset cityscapes   # from open-mmlab://resnet50_v1c
    python train/train.py --dataset ade20k --resume auto    # continue from the work dir's newest checkpoint

Defaults come from the per-dataset recipe (train/config.py), then --config FILE, then the command line.
Read top to bottom: the options, `main` and `run` (setup, the loop, the outputs), one training interval with
its loss step, then the checkpoint dict and the loop's small pieces.
"""

import os

# OpenMP threads that spin while they wait thrash when other processes share the cores (measured 2-3x slower
# per step on a busy 2-core machine); waiting passively costs little on an idle one. Read when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import re
import resource
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from annkernels import models
from annkernels.models.checkpoint import newest_training_checkpoint, read_training_checkpoint, save_training_checkpoint
from annkernels.train.cli import (
    EXIT_STATUS,
    StopSignals,
    TrainingError,
    exit_status,
    ignore_interrupts,
    short_error,
    unwritable,
)
from annkernels.train.config import (
    ConfigError,
    TrainConfig,
    load_config_file,
    recipe_default,
    resolve_config,
    save_config,
)
from annkernels.train.datasets import build_datasets, build_loaders
from annkernels.train.distributed import mean_over_processes, process_group
from annkernels.train.metrics import MetricsLog, format_table
from annkernels.train.prediction import autocast, evaluate
from annkernels.train.randomness import gather_rng_states, seed_everything, set_rng_states
from annkernels.train.visualize import plot_curves, save_predictions_png

# How a DataLoader reports a worker process that died (killed, out of memory), as opposed to an error it raised.
_DEAD_WORKER = re.compile(r"DataLoader worker \(pid.*\) (exited unexpectedly|is killed by signal)")


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="ANN semantic segmentation training", add_help=add_help)
    flag = argparse.BooleanOptionalAction

    def option(name, key=None, help="", **kwargs):
        """A flag whose help ends with the recipe's default for its config key."""
        key = key or name.lstrip("-").replace("-", "_")
        parser.add_argument(name, help=f"{help} ({recipe_default(key)})".lstrip(), **kwargs)

    parser.add_argument("--config", help="YAML/JSON file of config keys (e.g. a saved config.yaml)")
    parser.add_argument("--dataset", choices=["synthetic", "ade20k", "cityscapes", "voc12aug"],
                        help="dataset (default: synthetic)")
    option("--data-root", help="dataset root")
    option("--model", help="ann_r18_d8, ann_r50_d8 or ann_r101_d8")
    option("--num-classes", type=int, help="number of classes")
    parser.add_argument("--work-dir", help="output folder (default: work_dirs/<dataset>_<model>)")
    option("--iterations", type=int, help="training iterations")
    option("--batch-size", type=int, help="images per process")
    option("--workers", type=int, help="data loading worker processes per process")
    option("--lr", type=float, help="initial learning rate")
    option("--momentum", type=float, help="SGD momentum")
    option("--weight-decay", type=float, help="SGD weight decay on all parameters")
    option("--poly-power", type=float, help="poly schedule power")
    option("--min-lr", type=float, help="poly schedule final learning rate")
    option("--aux-weight", type=float, help="auxiliary head loss weight")
    option("--avg-non-ignore", action=flag, help="average the loss over non-ignored pixels only")
    option("--crop-size", type=int, nargs=2, metavar=("H", "W"), help="training crop")
    option("--scale", type=int, nargs=2, metavar=("W", "H"), help="base train/test scale")
    option("--ratio-range", type=float, nargs=2, metavar=("LOW", "HIGH"), help="random resize ratios")
    option("--cat-max-ratio", type=float, help="random crop max single-class share")
    option("--photometric", action=flag, help="photometric distortion")
    option("--align-corners", action=flag, help="bilinear align_corners in the model and test")
    option("--dropout", type=float, help="head dropout ratio")
    option("--eval-interval", type=int, help="evaluate every N iterations, and after the last")
    option("--ckpt-interval", type=int, help="checkpoint every N iterations, and after the last")
    option("--log-interval", type=int, help="log every N iterations")
    option("--eval-at-start", action=flag, help="evaluate the untrained model first")
    option("--eval-mode", choices=["whole", "slide"], help="test inference mode")
    parser.add_argument("--eval-crop-size", type=int, nargs=2, metavar=("H", "W"),
                        help="slide window (default: the training crop)")
    parser.add_argument("--eval-stride", type=int, nargs=2, metavar=("H", "W"),
                        help="slide stride (default: two thirds of the window)")
    option("--seed", type=int, help="random seed; each process adds its rank")
    option("--amp", choices=["off", "bf16", "fp16"], help="mixed precision (fp16 uses GradScaler)")
    option("--channels-last", action=flag, help="channels_last memory format")
    option("--compile", action=flag, help="torch.compile the model")
    parser.add_argument("--backend", help="annkernels backend: auto, cpu, cuda, triton or reference (default: auto)")
    option("--sync-bn", action=flag, help="SyncBatchNorm when distributed on GPUs")
    option("--pretrained", help="ImageNet ResNet-V1c backbone: a file, URL, open-mmlab:// name, or none")
    parser.add_argument("--resume", help="checkpoint to continue from, or 'auto' for <work-dir>/latest.pth")
    parser.add_argument("--test-only", action="store_true", default=None, help="only evaluate (weights: --resume)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--cpu-threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--progress", action=flag, help="tqdm progress bars (default: on)")
    option("--num-preview", type=int, help="validation images in the predictions PNG")
    option("--synthetic-size", type=int, help="synthetic scene side in pixels")
    option("--synthetic-train-length", type=int, help="synthetic training scenes")
    option("--synthetic-val-length", type=int, help="synthetic validation scenes")
    return parser


def config_from_args(args) -> TrainConfig:
    file_values = load_config_file(args.config) if args.config else {}
    dataset = args.dataset or file_values.get("dataset") or "synthetic"
    cli_values = {k: v for k, v in vars(args).items() if k not in ("config", "dataset")}
    return resolve_config(dataset, {k: v for k, v in file_values.items() if k != "dataset"}, cli_values)


@exit_status
def main(args) -> int:
    config = config_from_args(args)
    with StopSignals(lambda: last_checkpoint_note(config)) as signals, process_group(config.device) as context:
        return run(config, context, signals)


def run(config: TrainConfig, context, signals: StopSignals) -> int:
    device = context.device
    show_progress = config.progress is not False and context.is_main

    def log(message):
        if context.is_main:
            tqdm.write(message)

    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    seed_everything(config.seed + context.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    work_dir = Path(config.work_dir)

    # Everything that can fail on the user's options, files or data fails here, before the work dir changes.
    train_set, val_set = build_datasets(config)
    model = build_model(config, context, log).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    lr_scheduler = PolyLR(optimizer, config.iterations, config.poly_power, config.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    start_iteration = 0
    resume = resume_checkpoint(config, work_dir, log)
    if resume:
        start_iteration = load_training_state(*resume, config, model, optimizer, lr_scheduler, scaler, context, log)
    elif config.pretrained:  # (a resumed run has its own trained backbone)
        models.load_pretrained_backbone(model, config.pretrained)
        log(f"loaded ImageNet backbone from {config.pretrained}")
    train_loader, val_loader = build_loaders(train_set, val_set, config, context, start_iteration,
                                             worker_init_fn=ignore_interrupts)

    log(f"{config.model} on {config.dataset}: {config.iterations} iterations, batch "
        f"{config.batch_size}x{context.world_size} process(es), crop {config.crop_size}, device {device}, "
        f"work dir {work_dir}")
    signals.deferring()
    try:
        if context.is_main:
            work_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, work_dir / "config.yaml")
        metrics_log = MetricsLog(work_dir, context.is_main, start_iteration,
                                 note=lambda: last_checkpoint_note(config))
    except OSError as error:
        raise TrainingError(f"{unwritable(error)}. {last_checkpoint_note(config)}") from None

    model_without_ddp = model
    if config.compile:
        model.compile()
    if context.enabled:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    class_names = config.class_names()

    if config.test_only:
        result = evaluate(model_without_ddp, val_loader, config, context, class_names, show_progress)
        log(format_table(result))
        if context.is_main:
            write_output(work_dir / "eval.json", json.dumps(result, indent=2), config)
        return 0

    untrained = None
    if config.eval_at_start and start_iteration == 0:
        untrained = evaluate(model_without_ddp, val_loader, config, context, class_names, show_progress)
        metrics_log.write({"kind": "eval", "iteration": 0, "mIoU": untrained["mIoU"], "aAcc": untrained["aAcc"]})
        log(f"untrained model: mIoU {untrained['mIoU']}  aAcc {untrained['aAcc']}")

    total, eval_interval, ckpt_interval = config.iterations, config.eval_interval, config.ckpt_interval
    batches = iter(train_loader)
    result, start_time = None, time.perf_counter()
    progress_bar = tqdm(total=total, initial=start_iteration, desc="train", disable=not show_progress,
                        dynamic_ncols=True)
    iteration = start_iteration
    while iteration < total:
        # Train up to the next evaluation or checkpoint: every eval/ckpt interval, and after the last iteration.
        stop = min([total] + [(iteration // interval + 1) * interval for interval in (eval_interval, ckpt_interval)])
        iteration, stopping = train_interval(model, batches, optimizer, lr_scheduler, scaler, config, context,
                                             iteration, stop, metrics_log, progress_bar, signals)
        if stopping:
            progress_bar.close()
            path = save_training_state(work_dir, iteration, model_without_ddp, optimizer, lr_scheduler, scaler,
                                       config, result, context)
            if context.is_main:
                print(f"{signal.Signals(stopping).name} at iteration {iteration}/{total}: saved {path}; to "
                      f"continue: {resume_command(context)}", file=sys.stderr)
            return EXIT_STATUS[stopping]
        if iteration % eval_interval == 0 or iteration == total:
            result = evaluate(model_without_ddp, val_loader, config, context, class_names, show_progress)
            metrics_log.write({"kind": "eval", "iteration": iteration, "mIoU": result["mIoU"], "aAcc": result["aAcc"],
                               "per_class": result["per_class"]})
            log(f"iteration {iteration}: mIoU {result['mIoU']}  aAcc {result['aAcc']}")
        if iteration % ckpt_interval == 0 or iteration == total:
            path = save_training_state(work_dir, iteration, model_without_ddp, optimizer, lr_scheduler, scaler,
                                       config, result, context)
            log(f"saved {path}")
    progress_bar.close()
    elapsed = time.perf_counter() - start_time

    if context.is_main:
        metrics_log.close()
        if result is not None:
            log(format_table(result))
            write_output(work_dir / "eval.json", json.dumps(result, indent=2), config)
        try:
            save_predictions_png(model_without_ddp, val_loader.dataset, config, device, work_dir / "predictions.png")
            if metrics_log.path.is_file():
                plot_curves(metrics_log.path, work_dir / "curves.png")
        except OSError as error:
            raise TrainingError(f"{unwritable(error)}. {last_checkpoint_note(config)}") from None
        summary = f"trained {total - start_iteration} iterations in {elapsed / 60:.1f} min"
        if untrained is not None and result is not None:
            summary += f"; mIoU untrained {untrained['mIoU']} -> trained {result['mIoU']}"
        elif result is not None:
            summary += f"; mIoU {result['mIoU']}"
        log(f"{summary}; peak memory {peak_memory_mb(device):.0f} MB")
        log(f"outputs in {work_dir}: latest.pth, metrics.jsonl, eval.json, predictions.png, curves.png")
    return 0


def train_interval(model, batches, optimizer, lr_scheduler, scaler, config, context, start, stop, metrics_log,
                   progress_bar, signals=None):
    """Runs iterations start+1 .. stop (1-based) unless a stop signal arrives first (checked before each step);
    returns (the last iteration run, the stop signal or 0).

    A non-finite loss stops training before the weights are touched (TrainingError naming the iteration and
    the loss terms). With fp16 the GradScaler skips steps whose gradients overflow: counted, not an error.
    """
    model.train()
    device = context.device
    window_loss, window_parts, window_start, data_time, skipped = [], {}, time.perf_counter(), 0.0, 0
    iteration, stopping = start, 0
    while iteration < stop:
        if signals is not None:
            stopping = stop_requested(signals, context)
            if stopping:
                break
        iteration += 1
        fetch_start = time.perf_counter()
        images, targets = next_batch(batches, iteration, config)
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        data_time += time.perf_counter() - fetch_start
        lr = optimizer.param_groups[0]["lr"]
        with autocast(config, device):
            outputs = model(images)
            loss, parts = models.segmentation_loss(outputs, targets, aux_weight=config.aux_weight,
                                                   avg_non_ignore=config.avg_non_ignore,
                                                   align_corners=config.align_corners)
        if not torch.isfinite(loss):
            raise diverged(loss, parts, iteration, config)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scale = scaler.get_scale() if scaler.is_enabled() else None
        scaler.step(optimizer)
        scaler.update()
        if scale is not None and scaler.get_scale() < scale:  # the scaler backed off: this step was skipped
            skipped += 1
        lr_scheduler.step()

        window_loss.append(loss.item())
        for key, value in parts.items():
            window_parts.setdefault(key, []).append(float(value.detach()) if torch.is_tensor(value) else value)
        progress_bar.update(1)
        if iteration % config.log_interval == 0 or iteration == stop:
            log_window(metrics_log, progress_bar, scaler, context, iteration, lr, window_loss, window_parts,
                       time.perf_counter() - window_start, data_time, skipped)
            window_loss, window_parts, window_start, data_time, skipped = [], {}, time.perf_counter(), 0.0, 0
    if window_loss:  # stopped by a signal inside a logging window
        log_window(metrics_log, progress_bar, scaler, context, iteration, lr, window_loss, window_parts,
                   time.perf_counter() - window_start, data_time, skipped)
    return iteration, stopping


def log_window(metrics_log, progress_bar, scaler, context, iteration, lr, window_loss, window_parts, elapsed,
               data_time, skipped):
    """One "train" record: the window's mean losses (over processes), time per iteration, memory, fp16 skips."""
    stats = {"loss": float(np.mean(window_loss))}
    stats.update({key: float(np.mean(values)) for key, values in window_parts.items()})
    stats = mean_over_processes(stats, context)
    record = {"kind": "train", "iteration": iteration, "lr": lr, **stats,
              "time_per_iter": elapsed / len(window_loss), "data_time_per_iter": data_time / len(window_loss),
              "peak_memory_mb": peak_memory_mb(context.device)}
    if scaler.is_enabled():
        record.update(skipped_steps=skipped, loss_scale=scaler.get_scale())
        if skipped and context.is_main:
            tqdm.write(f"iteration {iteration}: fp16 gradients overflowed in {skipped} of the last "
                       f"{len(window_loss)} steps; the grad scaler skipped them (loss scale now "
                       f"{scaler.get_scale():g})")
    metrics_log.write(record)
    progress_bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{lr:.2e}", mem=f"{record['peak_memory_mb']:.0f}MB",
                             refresh=False)


def stop_requested(signals: StopSignals, context) -> int:
    """The signal that stops training (0: none). Under torchrun every process takes the largest any process
    received, so all of them stop after the same iteration and checkpoint it together."""
    received = signals.received or 0
    if context.enabled:
        flag = torch.tensor([received], device=context.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        received = int(flag.item())
    return received


def build_model(config: TrainConfig, context, log) -> nn.Module:
    """The segmentor to train; with SyncBatchNorm when distributed on GPUs."""
    model = config.segmentor()
    if context.enabled and config.sync_bn:
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


def save_training_state(work_dir: Path, iteration: int, model, optimizer, lr_scheduler, scaler, config: TrainConfig,
                        metrics, context):
    """Every process's RNG states, then (rank 0) the checkpoint iter_{iteration}.pth + latest.pth; its path.

    A failed write (disk full, read-only, ...) raises TrainingError and leaves the previous checkpoints as they were.
    Under torchrun every process raises it: rank 0 shares the outcome, so no rank trains on into a collective that
    rank 0 never joins.
    """
    states = gather_rng_states(context)
    path, failure = None, None
    if context.is_main:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "lr_scheduler": lr_scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler.is_enabled() else None, "iteration": iteration,
                 "rng_states": states, "config": config.as_dict(), "metrics": metrics}
        try:
            path = Path(save_training_checkpoint(state, work_dir, iteration))
        except OSError as error:
            failure = TrainingError(f"cannot write checkpoint {work_dir / f'iter_{iteration}.pth'}: "
                                    f"{error.strerror or error}. {last_checkpoint_note(config)}")
    if context.enabled:
        failed = torch.tensor([failure is not None], dtype=torch.int32, device=context.device)
        torch.distributed.broadcast(failed, src=0)
        if failed.item() and failure is None:
            failure = TrainingError(f"rank 0 could not write checkpoint {work_dir / f'iter_{iteration}.pth'}; "
                                    "stopping with it")
    if failure is not None:
        raise failure
    return path


def resume_checkpoint(config: TrainConfig, work_dir: Path, log):
    """(path, checkpoint) to continue from, read and checked, or None to start from scratch.

    After a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) and with --resume auto: the newest readable
    checkpoint of the work dir, each unreadable one named in one line and skipped. --resume PATH: that file, or
    CheckpointError.
    """
    resume = config.resume
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


def load_training_state(path, checkpoint: dict, config: TrainConfig, model, optimizer, lr_scheduler, scaler, context,
                        log) -> int:
    """Restores everything save_training_state wrote; returns the checkpoint's iteration. A checkpoint of another
    architecture or class count is a CheckpointError naming both, before anything changes."""
    saved = checkpoint.get("config") or {}
    trained = (saved.get("model"), saved.get("num_classes"))
    if None not in trained and trained != (config.model, config.num_classes):
        raise models.CheckpointError(f"{path} holds {trained[0]} with {trained[1]} classes; this run builds "
                                     f"{config.model} with {config.num_classes} (--model, --num-classes)")
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


def last_checkpoint_note(config: TrainConfig) -> str:
    latest = Path(config.work_dir) / "latest.pth"
    if not latest.is_file():
        return "No checkpoint had been written yet."
    return f"The last checkpoint, {latest}, is intact."


def resume_command(context) -> str:
    """This run's command line with --resume auto in place of any --resume."""
    arguments, skip = [], False
    for argument in sys.argv[1:]:
        if skip or argument == "--resume" or argument.startswith("--resume="):
            skip = argument == "--resume"
            continue
        arguments.append(argument)
    launcher = ["torchrun", f"--nproc_per_node={context.world_size}"] if context.enabled else ["python"]
    return shlex.join([*launcher, sys.argv[0], *arguments, "--resume", "auto"])


def next_batch(batches, iteration: int, config: TrainConfig):
    """next(batches), with a DataLoader worker that died turned into a TrainingError that says what to do."""
    try:
        return next(batches)
    except RuntimeError as error:
        if not _DEAD_WORKER.search(str(error)):
            raise
        raise TrainingError(f"data loading failed at iteration {iteration}: {short_error(error)}. "
                            f"{last_checkpoint_note(config)} A worker killed by the system is often out of "
                            "memory: try fewer --workers, then --resume auto.") from error


def diverged(loss: torch.Tensor, parts: dict, iteration: int, config: TrainConfig) -> TrainingError:
    """The error for a non-finite loss, naming the iteration and every loss term."""
    terms = ", ".join(f"{key} {float(value.detach()):.4g}" for key, value in parts.items())
    advice = "a lower --lr" + (" or --amp off" if config.amp != "off" else "")
    return TrainingError(f"loss is {loss.item()} at iteration {iteration} ({terms}); stopped before updating the "
                         f"weights. {last_checkpoint_note(config)} Try {advice}.")


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_output(path: Path, text: str, config: TrainConfig) -> None:
    try:
        path.write_text(text)
    except OSError as error:
        raise TrainingError(f"{unwritable(error)}. {last_checkpoint_note(config)}") from None


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
