"""Segment images with a checkpoint; writes a palette mask PNG and an overlay PNG per image.

    python train/infer.py --checkpoint work_dirs/synthetic_ann_r18_d8/latest.pth scene.png
    python train/infer.py --checkpoint ann_r50-d8_512x512_80k_ade20k.pth --dataset ade20k photos/*.jpg

Any image size; grayscale, palette and RGBA inputs are converted to RGB. Masks are palette PNGs: their pixel
values are the class ids and their colours are the dataset's palette.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python train/infer.py`: import `train` the package, not train/train.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse

import numpy as np
import torch
from PIL import Image

import models
from train.classes import CLASSES, PALETTES
from train.config import ConfigError, resolve_config
from train.datasets import CorruptFileError, read_image
from train.distributed import DistributedContext
from train.eval import MODEL_KEYS, read_our_config
from train.inference import predict_probabilities
from train.train import build_model, short_error
from train.visualize import overlay


def get_args_parser():
    parser = argparse.ArgumentParser(description="Segment images with an ANN checkpoint")
    flag = argparse.BooleanOptionalAction
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--checkpoint", required=True, help="our checkpoint or an mmseg ANN checkpoint")
    parser.add_argument("--dataset", choices=["synthetic", "ade20k", "cityscapes", "voc12aug"],
                        help="class names, palette and test scale (default: the checkpoint's, else synthetic)")
    parser.add_argument("--model", help="architecture for mmseg checkpoints (default ann_r50_d8)")
    parser.add_argument("--num-classes", type=int, help="classes (default: the dataset's)")
    parser.add_argument("--scale", type=int, nargs=2, metavar=("W", "H"), help="test scale (default: recipe's)")
    parser.add_argument("--mode", choices=["whole", "slide"], default="whole", help="inference mode")
    parser.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), help="slide window")
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="slide stride")
    parser.add_argument("--aug-test", action="store_true", help="multi-scale + flip")
    parser.add_argument("--align-corners", action=flag, help="align_corners (mmseg 769x769 Cityscapes models)")
    parser.add_argument("--opacity", type=float, default=0.5, help="mask opacity in the overlay")
    parser.add_argument("--out-dir", default="predictions", help="output folder")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    return parser


def palette_image(prediction: np.ndarray, palette) -> Image.Image:
    """A mode 'P' PNG: indices are class ids, the embedded palette gives the colours."""
    mask = Image.fromarray(prediction.astype(np.uint8), mode="P")
    flat = [channel for colour in palette for channel in colour]
    mask.putpalette(flat + [255] * (768 - len(flat)))
    return mask


def main(args) -> int:
    try:
        if not Path(args.checkpoint).is_file():
            raise ConfigError(f"checkpoint not found: {args.checkpoint}")
        for path in args.images:
            if not Path(path).is_file():
                raise ConfigError(f"image not found: {path}")
        saved = read_our_config(args.checkpoint)
        dataset = args.dataset or saved.get("dataset") or "synthetic"
        inherited = {k: saved[k] for k in MODEL_KEYS if k in saved} if saved.get("dataset") == dataset else {}
        config = resolve_config(dataset, inherited, dict(model=args.model, num_classes=args.num_classes,
                                                         scale=args.scale, align_corners=args.align_corners))
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = build_model(dict(config, sync_bn=False), DistributedContext(device=device))
        models.load_checkpoint(model, args.checkpoint)
        model.to(device).eval()
        palette = PALETTES[dataset] if len(PALETTES[dataset]) >= config["num_classes"] else PALETTES["ade20k"]
        crop_size = args.crop_size or config["crop_size"]
        stride = args.stride or tuple(max(1, 2 * c // 3) for c in crop_size)
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        names = CLASSES[dataset]
        for path in args.images:
            image = read_image(path)
            tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].to(device)
            scores = predict_probabilities(model, tensor, config["scale"], config["num_classes"], mode=args.mode,
                                           crop_size=crop_size, stride=stride, aug_test=args.aug_test,
                                           align_corners=config["align_corners"])
            prediction = scores.argmax(1)[0].cpu().numpy().astype(np.uint8)
            stem = Path(path).stem
            palette_image(prediction, palette).save(out_dir / f"{stem}_mask.png")
            Image.fromarray(overlay(image, prediction, palette, args.opacity)).save(out_dir / f"{stem}_overlay.png")
            ids, counts = np.unique(prediction, return_counts=True)
            top = sorted(zip(counts, ids, strict=True), reverse=True)[:5]
            listing = ", ".join(
                f"{names[i] if i < len(names) else i} {100 * c / prediction.size:.0f}%" for c, i in top
            )
            print(f"{path}: {image.shape[1]}x{image.shape[0]} -> {out_dir / (stem + '_mask.png')} ({listing})")
        return 0
    except (CorruptFileError, ConfigError, models.CheckpointError) as error:
        print(f"error: {short_error(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
