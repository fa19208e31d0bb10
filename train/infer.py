"""Segment images with a checkpoint; writes a palette mask PNG and an overlay PNG per image.

    python train/infer.py --checkpoint work_dirs/synthetic_ann_r18_d8/latest.pth scene.png
    python train/infer.py --checkpoint ann_r50-d8_512x512_80k_ade20k photos/*.jpg   # mmseg's released model
    python train/infer.py --onnx ann.onnx --dataset ade20k photos/*.jpg   # an exported model, by ONNX Runtime

Any image size; grayscale, palette and RGBA inputs are converted to RGB. Masks are palette PNGs: their pixel
values are the class ids and their colours are the dataset's palette.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from annkernels import models
from annkernels.train.classes import CLASSES, PALETTES
from annkernels.train.cli import exit_status
from annkernels.train.config import ConfigError, checkpoint_config, recipe_default, resolve_config
from annkernels.train.datasets import CorruptFileError, read_image
from annkernels.train.prediction import predict_scores, slide_windows
from annkernels.train.visualize import overlay


def get_args_parser():
    parser = argparse.ArgumentParser(description="Segment images with an ANN checkpoint")
    flag = argparse.BooleanOptionalAction
    parser.add_argument("images", nargs="+", help="image files")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint",
                        help="our checkpoint or an mmseg ANN checkpoint: file, URL or zoo name (python -m models.zoo)")
    source.add_argument("--onnx", help="a model exported by export_onnx, run by ONNX Runtime on the CPU; a fixed-size "
                                       "export runs in slide mode with its size as the window")
    parser.add_argument("--dataset", choices=["synthetic", "ade20k", "cityscapes", "voc12aug"],
                        help="class names, palette and test scale (default: the checkpoint's, else synthetic)")
    parser.add_argument("--model", help=f"architecture for mmseg checkpoints ({recipe_default('model')})")
    parser.add_argument("--num-classes", type=int, help="classes (default: the dataset's)")
    parser.add_argument("--scale", type=int, nargs=2, metavar=("W", "H"),
                        help=f"test scale ({recipe_default('scale')})")
    parser.add_argument("--mode", choices=["whole", "slide"], help=f"inference mode ({recipe_default('eval_mode')})")
    parser.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), help="slide window (default: crop)")
    parser.add_argument("--stride", type=int, nargs=2, metavar=("H", "W"), help="slide stride (default: 2/3 window)")
    parser.add_argument("--aug-test", action="store_true", help="multi-scale + flip")
    parser.add_argument("--align-corners", action=flag, help="align_corners (mmseg 769x769 Cityscapes models)")
    parser.add_argument("--opacity", type=float, default=0.5, help="mask opacity in the overlay")
    parser.add_argument("--out-dir", help="output folder (default: predictions/ beside a local checkpoint file, "
                                           "else work_dirs/predictions)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--fast", action="store_true",
                        help="models.optimize_for_inference: BatchNorm folded into the convs, channels_last, "
                             "inductor-compiled (compiles once per input size)")
    return parser


def palette_image(prediction: np.ndarray, palette) -> Image.Image:
    """A mode 'P' PNG: indices are class ids, the embedded palette gives the colours."""
    mask = Image.fromarray(prediction.astype(np.uint8), mode="P")
    flat = [channel for colour in palette for channel in colour]
    mask.putpalette(flat + [255] * (768 - len(flat)))
    return mask


def onnx_model(path, dataset, cli):
    """(ONNX Runtime runner, config) of an exported model: the class count and align_corners come from the graph,
    the rest from the dataset's recipe and the command line; a fixed-size graph gets slide mode with its size."""
    if not Path(path).is_file():
        raise ConfigError(f"ONNX model not found: {path}")
    runner = models.OnnxSegmentor(path)
    from_graph = dict(num_classes=runner.num_classes, align_corners=runner.align_corners)
    if runner.input_size is not None:
        from_graph.update(eval_mode="slide", eval_crop_size=runner.input_size)
    config = resolve_config(dataset or "synthetic", {}, {**cli, **from_graph})
    return runner, config


def default_out_dir(source, checkpoint) -> Path:
    """predictions/ beside a local checkpoint or ONNX file (a run's work dir); for a download,
    work_dirs/predictions."""
    downloaded = str(checkpoint) != str(source)
    return Path("work_dirs/predictions") if downloaded else Path(checkpoint).parent / "predictions"


@exit_status
def main(args) -> int:
    cli = dict(model=args.model, num_classes=args.num_classes, scale=args.scale, align_corners=args.align_corners,
               eval_mode=args.mode, eval_crop_size=args.crop_size, eval_stride=args.stride)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.onnx:
        model, config = onnx_model(args.onnx, args.dataset, cli)
    else:
        config, checkpoint = checkpoint_config(args.checkpoint, args.dataset, cli)
        model = config.segmentor()
        models.load_checkpoint(model, checkpoint)
        model.to(device).eval()
        if args.fast:
            model = models.optimize_for_inference(model)
    dataset = config.dataset
    palette = PALETTES[dataset] if len(PALETTES[dataset]) >= config.num_classes else PALETTES["ade20k"]
    crop_size, stride = slide_windows(config)
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir(args.onnx or args.checkpoint,
                                                                      args.onnx or checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = CLASSES[dataset]
    failed = 0
    for path in args.images:
        try:
            image = read_image(path)
        except CorruptFileError as error:  # reported, and the other images still run
            print(f"error: {error}", file=sys.stderr)
            failed += 1
            continue
        tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].to(device)
        scores = predict_scores(model, tensor, config.scale, config.num_classes, mode=config.eval_mode,
                                crop_size=crop_size, stride=stride, aug_test=args.aug_test,
                                align_corners=config.align_corners)
        prediction = scores.argmax(1)[0].cpu().numpy().astype(np.uint8)
        stem = Path(path).stem
        palette_image(prediction, palette).save(out_dir / f"{stem}_mask.png")
        Image.fromarray(overlay(image, prediction, palette, args.opacity)).save(out_dir / f"{stem}_overlay.png")
        ids, counts = np.unique(prediction, return_counts=True)
        top = sorted(zip(counts, ids, strict=True), reverse=True)[:5]
        listing = ", ".join(f"{names[i] if i < len(names) else i} {100 * c / prediction.size:.0f}%" for c, i in top)
        print(f"{path}: {image.shape[1]}x{image.shape[0]} -> {out_dir / (stem + '_mask.png')} ({listing})")
    if failed:
        print(f"error: {failed} of {len(args.images)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
