"""Colour masks, overlays, prediction grids and training curves (Pillow and matplotlib's Agg backend)."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from annkernels.train.classes import PALETTES
from annkernels.train.prediction import autocast, predict_scores

IGNORE_COLOUR = (255, 255, 255)


def colorize(label: np.ndarray, palette) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 using `palette`; ignore (255) and ids outside the palette are white."""
    table = np.tile(np.array(IGNORE_COLOUR, dtype=np.uint8), (256, 1))
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return table[label.astype(np.uint8)]


def overlay(image: np.ndarray, label: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    """Blend the colour mask over the RGB image."""
    mask = colorize(label, palette).astype(np.float32)
    return np.clip(image.astype(np.float32) * (1 - alpha) + mask * alpha, 0, 255).astype(np.uint8)


def prediction_grid(rows, palette, path, min_cell: int = 160, max_cell: int = 512) -> None:
    """Saves a PNG with one row per sample: image | ground truth | prediction.

    rows: list of (image HxWx3 uint8, gt HxW, prediction HxW). Each cell's long side is scaled (nearest) into
    [min_cell, max_cell]: small synthetic scenes are enlarged by a whole factor, large photos shrunk.
    """
    cells = []
    for image, target, prediction in rows:
        height, width = target.shape
        longest = max(height, width)
        zoom = max_cell / longest if longest > max_cell else max(1, min_cell // longest)
        size = (max(1, int(width * zoom)), max(1, int(height * zoom)))
        parts = [image, colorize(target, palette), colorize(prediction, palette)]
        cells.append([Image.fromarray(p).resize(size, Image.NEAREST) for p in parts])
    gap, header = 4, 16
    cell_w = max(c[0].width for c in cells)
    canvas = Image.new("RGB", (3 * cell_w + 2 * gap, header + sum(c[0].height + gap for c in cells)), "white")
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((column * (cell_w + gap) + 2, 2), title, fill=(0, 0, 0))
    top = header
    for row in cells:
        for column, part in enumerate(row):
            canvas.paste(part, (column * (cell_w + gap), top))
        top += row[0].height + gap
    canvas.save(path)


def plot_curves(metrics_log, path) -> None:
    """Loss (per logged iteration) and mIoU (per evaluation) curves from the JSONL metrics log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_log).read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval" and r.get("mIoU") is not None]
    figure, (loss_axis, miou_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot([r["iteration"] for r in train], [r["loss"] for r in train])
    loss_axis.set(xlabel="iteration", ylabel="loss", title="training loss")
    miou_axis.plot([r["iteration"] for r in evals], [r["mIoU"] for r in evals], marker="o")
    miou_axis.set(xlabel="iteration", ylabel="mIoU (%)", title="validation mIoU")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


@torch.no_grad()
def save_predictions_png(model, dataset, config, device, path: Path) -> None:
    """image | ground truth | prediction for the first validation images."""
    model.eval()
    rows = []
    for index in range(min(config.num_preview, len(dataset))):
        image, target = dataset[index]
        with autocast(config, device):
            scores = predict_scores(model, image[None].to(device), config.scale, config.num_classes,
                                    align_corners=config.align_corners)
        prediction = scores.argmax(1)[0].cpu().numpy().astype(np.uint8)
        rows.append((image.permute(1, 2, 0).numpy(), target.numpy().astype(np.uint8), prediction))
    prediction_grid(rows, PALETTES.get(config.dataset, PALETTES["synthetic"]), path)
