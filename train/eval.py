"""Evaluate a checkpoint (ours or an mmseg ANN checkpoint) on a validation set: mIoU, aAcc and per-class IoU
exactly as mmseg's IoUMetric (ann-spec §5), printed as a table and written as JSON.

    python train/eval.py --checkpoint work_dirs/cityscapes_ann_r50_d8/latest.pth --dataset cityscapes
    python train/eval.py --checkpoint ann_r50-d8_512x1024_40k_cityscapes.pth --dataset cityscapes --aug-test
    python train/eval.py --checkpoint ann_r50-d8_769x769.pth --dataset cityscapes --align-corners \
        --mode slide --crop-size 769 769 --stride 513 513 --scale 2049 1025
    torchrun --nproc_per_node=4 train/eval.py ...          # shards the images, all-reduces the histograms
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/eval.py`: import `train` the package, not train/train.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json

import torch
from torch.utils.data import DataLoader

import models
from train.config import ConfigError, resolve_config
from train.datasets import CorruptFileError, DatasetLayoutError, build_dataset
from train.distributed import ShardSampler, cleanup, init_distributed
from train.metrics import format_table
from train.train import build_model, class_names_for, evaluate, short_error
from train.transforms import eval_transforms

# Settings taken from one of our checkpoints' saved config when the command line leaves them out.
MODEL_KEYS = ("model", "num_classes", "align_corners", "scale", "synthetic_size", "seed", "synthetic_val_length")


def get_args_parser():
    parser = argparse.ArgumentParser(description="Evaluate an ANN segmentation checkpoint")
    flag = argparse.BooleanOptionalAction
    parser.add_argument("--checkpoint", required=True, help="our iter_*/latest.pth, or an mmseg ANN checkpoint")
    parser.add_argument("--dataset", choices=["synthetic", "ade20k", "cityscapes", "voc12aug"],
                        help="dataset (default: the checkpoint's, else synthetic)")
    parser.add_argument("--data-root", help="dataset root (default: the recipe's)")
    parser.add_argument("--split", help="split to score (default: the dataset's validation split)")
    parser.add_argument("--model", help="architecture for mmseg checkpoints (default ann_r50_d8)")
    parser.add_argument("--num-classes", type=int, help="classes (default: the dataset's)")
    parser.add_argument("--mode", choices=["whole", "slide"], default="whole", help="inference mode")
    parser.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), help="slide window (default: crop)")
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="slide stride (default: 2/3 window)")
    parser.add_argument("--scale", type=int, nargs=2, metavar=("W", "H"), help="test scale (default: recipe's)")
    parser.add_argument("--aug-test", action="store_true", help="scales 0.5..1.75 x scale, with flips; mean softmax")
    parser.add_argument("--align-corners", action=flag, help="align_corners (mmseg's 769x769 Cityscapes models)")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], help="autocast dtype")
    parser.add_argument("--channels-last", action=flag, help="channels_last inputs and weights")
    parser.add_argument("--backend", help="annkernels backend")
    parser.add_argument("--workers", type=int, default=2, help="data loading workers")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", help="JSON result path (default: <checkpoint>.eval.json)")
    parser.add_argument("--progress", action=flag, help="progress bar (on)")
    return parser


def read_our_config(checkpoint_path) -> dict:
    """The saved config of one of our checkpoints; {} for anything else (mmseg checkpoints, bare state dicts)."""
    checkpoint = models.read_checkpoint(checkpoint_path)
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    return config if isinstance(config, dict) else {}


def main(args) -> int:
    context = None
    try:
        if not Path(args.checkpoint).is_file():
            raise ConfigError(f"checkpoint not found: {args.checkpoint}")
        saved = read_our_config(args.checkpoint)
        dataset = args.dataset or saved.get("dataset") or "synthetic"
        inherited = {k: saved[k] for k in MODEL_KEYS if k in saved} if saved.get("dataset") == dataset else {}
        cli = dict(data_root=args.data_root, model=args.model, num_classes=args.num_classes,
                   eval_mode=args.mode, eval_crop_size=args.crop_size, eval_stride=args.stride, scale=args.scale,
                   align_corners=args.align_corners, amp=args.amp, channels_last=args.channels_last,
                   backend=args.backend, workers=args.workers, device=args.device)
        config = resolve_config(dataset, inherited, cli)
        split = args.split or config["val_split"]
        context = init_distributed(config.get("device"))
        device = context.device

        options = {}
        if dataset == "synthetic":
            options = dict(size=config["synthetic_size"], seed=config["seed"], length=config["synthetic_val_length"])
        val_set = build_dataset(dataset, config["data_root"], split, eval_transforms(), **options)
        loader = DataLoader(val_set, batch_size=1, sampler=ShardSampler(len(val_set), context),
                            num_workers=config["workers"], pin_memory=device.type == "cuda")
        model = build_model(dict(config, sync_bn=False), context)
        models.load_checkpoint(model, args.checkpoint)  # strict: every key must fit
        model.to(device)
        if config["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        metrics = evaluate(model, loader, config, context, class_names_for(config),
                           progress=args.progress is not False, aug_test=args.aug_test)
        if context.is_main:
            print(format_table(metrics))
            out = Path(args.out) if args.out else Path(f"{args.checkpoint}.eval.json")
            settings = dict(checkpoint=str(args.checkpoint), dataset=dataset, split=split, mode=config["eval_mode"],
                            aug_test=args.aug_test, scale=list(config["scale"]))
            out.write_text(json.dumps({**settings, **metrics}, indent=2))
            print(f"wrote {out}")
        return 0
    except (DatasetLayoutError, CorruptFileError, ConfigError, models.CheckpointError) as error:
        print(f"error: {short_error(error)}", file=sys.stderr)
        return 1
    finally:
        if context is not None:
            cleanup(context)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
