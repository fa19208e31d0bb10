"""Evaluate a checkpoint (ours or an mmseg ANN checkpoint) on a validation set: mIoU, aAcc and per-class IoU
exactly as mmseg's IoUMetric (docs/ann-spec.md §5), printed as a table and written as JSON.

    python train/eval.py --checkpoint work_dirs/cityscapes_ann_r50_d8/latest.pth --dataset cityscapes
    python train/eval.py --checkpoint ann_r50-d8_512x1024_40k_cityscapes --dataset cityscapes   # mmseg's release
    python train/eval.py --checkpoint ann_r50-d8_769x769_40k_cityscapes --aug-test              # its test settings
    python train/eval.py --checkpoint ann_r50-d8_769x769.pth --dataset cityscapes --align-corners \
        --mode slide --crop-size 769 769 --stride 513 513 --scale 2049 1025
    torchrun --nproc_per_node=4 train/eval.py ...          # shards the images, all-reduces the histograms
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from annkernels import models
from annkernels.models import zoo
from annkernels.train.cli import exit_status
from annkernels.train.config import checkpoint_config, recipe_default
from annkernels.train.datasets import build_split
from annkernels.train.distributed import ShardSampler, process_group
from annkernels.train.metrics import format_table
from annkernels.train.prediction import evaluate
from annkernels.train.transforms import eval_transforms


def get_args_parser():
    parser = argparse.ArgumentParser(description="Evaluate an ANN segmentation checkpoint")
    flag = argparse.BooleanOptionalAction
    parser.add_argument("--checkpoint", required=True,
                        help="our iter_*/latest.pth or an mmseg ANN checkpoint: a file, URL or zoo name "
                             "(python -m models.zoo; evaluated with its published test settings)")
    parser.add_argument("--dataset", choices=["synthetic", "ade20k", "cityscapes", "voc12aug"],
                        help="dataset (default: the checkpoint's, else synthetic)")
    parser.add_argument("--data-root", help=f"dataset root ({recipe_default('data_root')})")
    parser.add_argument("--split", help="split to score (default: the dataset's validation split)")
    parser.add_argument("--model", help=f"architecture for mmseg checkpoints ({recipe_default('model')})")
    parser.add_argument("--num-classes", type=int, help="classes (default: the dataset's)")
    parser.add_argument("--mode", choices=["whole", "slide"], help=f"inference mode ({recipe_default('eval_mode')})")
    parser.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), help="slide window (default: crop)")
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="slide stride (default: 2/3 window)")
    parser.add_argument("--scale", type=int, nargs=2, metavar=("W", "H"),
                        help=f"test scale ({recipe_default('scale')})")
    parser.add_argument("--aug-test", action="store_true", help="scales 0.5..1.75 x scale, with flips; mean softmax")
    parser.add_argument("--align-corners", action=flag, help="align_corners (mmseg's 769x769 Cityscapes models)")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], help="autocast dtype")
    parser.add_argument("--channels-last", action=flag, help="channels_last inputs and weights")
    parser.add_argument("--fast", action="store_true",
                        help="models.optimize_for_inference: BatchNorm folded into the convs, channels_last, "
                             "inductor-compiled (compiles once per input size: best with one test scale)")
    parser.add_argument("--backend", help="annkernels backend")
    parser.add_argument("--workers", type=int, default=2, help="data loading workers")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", help="JSON result path (default: <checkpoint>.eval.json; for a download, "
                                      "work_dirs/<file name>.eval.json)")
    parser.add_argument("--progress", action=flag, help="progress bar (on)")
    return parser


@exit_status
def main(args) -> int:
    cli = dict(data_root=args.data_root, model=args.model, num_classes=args.num_classes,
               eval_mode=args.mode, eval_crop_size=args.crop_size, eval_stride=args.stride, scale=args.scale,
               align_corners=args.align_corners, amp=args.amp, channels_last=args.channels_last,
               backend=args.backend, workers=args.workers, device=args.device)
    config, checkpoint = checkpoint_config(args.checkpoint, args.dataset, cli)
    released = zoo.RELEASED.get(args.checkpoint)
    dataset = config.dataset
    split = args.split or config.val_split
    with process_group(config.device) as context:
        device = context.device
        val_set = build_split(config, split, eval_transforms(), config.synthetic_val_length)
        loader = DataLoader(val_set, batch_size=1, sampler=ShardSampler(len(val_set), context),
                            num_workers=config.workers, pin_memory=device.type == "cuda")
        model = config.segmentor()
        models.load_checkpoint(model, checkpoint)  # strict: every key must fit
        model.to(device)
        if args.fast:
            model = models.optimize_for_inference(model.eval())
        elif config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        metrics = evaluate(model, loader, config, context, config.class_names(),
                           progress=args.progress is not False, aug_test=args.aug_test)
        if context.is_main:
            print(format_table(metrics))
            settings = dict(checkpoint=str(args.checkpoint), dataset=dataset, split=split, mode=config.eval_mode,
                            aug_test=args.aug_test, scale=list(config.scale))
            if released is not None and released.dataset == dataset:
                published = released.miou_ms_flip if args.aug_test else released.miou
                settings["published_mIoU"] = published
                print(f"{released.name}: mIoU {metrics['mIoU']} here, {published} published by mmsegmentation "
                      f"({'ms+flip' if args.aug_test else 'single scale'}, {split} split)")
            downloaded = checkpoint != args.checkpoint  # then the result goes to the current folder, not the cache
            out = Path(args.out or (f"work_dirs/{Path(checkpoint).stem}.eval.json" if downloaded
                                    else f"{checkpoint}.eval.json"))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({**settings, **metrics}, indent=2))
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
