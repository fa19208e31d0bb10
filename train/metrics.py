"""Dataset-level IoU metric with mmseg IoUMetric semantics (docs/ann-spec.md §5), and the metrics log of a run."""

import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from annkernels.train.cli import TrainingError, unwritable
from annkernels.train.transforms import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates a [K, K] confusion matrix (rows: ground truth, columns: prediction) over a whole dataset.

    Pixels whose ground truth is `ignore_index` (or any id >= K) are dropped with their prediction. Per-class
    intersection, prediction and label counts are all read off this one matrix, so summing it over processes
    (`all_reduce`) gives exactly the single-process result.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device=None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """prediction and target: integer tensors of the same shape (any number of dims)."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(prediction.shape)} != target shape {tuple(target.shape)}")
        k = self.num_classes
        target = target.to(self.matrix.device).flatten().long()
        prediction = prediction.to(self.matrix.device).flatten().long()
        keep = (target != self.ignore_index) & (target >= 0) & (target < k)
        pairs = target[keep] * k + prediction[keep]
        self.matrix += torch.bincount(pairs, minlength=k * k).reshape(k, k)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix)

    def compute(self, class_names=None) -> dict:
        """Returns {"mIoU", "aAcc", "per_class": {name: IoU or None}, "pixels"}, percentages rounded to 2 decimals.

        A class with an empty union (absent from the ground truth and never predicted) has IoU NaN, reported as
        None and left out of mIoU; a class absent from the ground truth but predicted has IoU 0.
        """
        matrix = self.matrix.double().cpu()
        intersection = matrix.diag()
        label_area = matrix.sum(1)
        union = label_area + matrix.sum(0) - intersection
        iou = intersection / union  # 0/0 -> NaN for classes nobody saw
        valid = ~torch.isnan(iou)
        miou = iou[valid].mean().item() * 100 if valid.any() else math.nan
        total = label_area.sum().item()
        aacc = intersection.sum().item() / total * 100 if total > 0 else math.nan
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        per_class = {
            name: (round(value * 100, 2) if not math.isnan(value) else None)
            for name, value in zip(names, iou.tolist(), strict=True)
        }
        return {
            "mIoU": round(miou, 2) if not math.isnan(miou) else None,
            "aAcc": round(aacc, 2) if not math.isnan(aacc) else None,
            "per_class": per_class,
            "pixels": int(total),
        }


def format_table(result: dict) -> str:
    """Plain-text per-class IoU table followed by the summary line."""
    names = list(result["per_class"])
    width = max([len("class")] + [len(name) for name in names])
    lines = [f"{'class':<{width}}  IoU", "-" * (width + 8)]
    for name, value in result["per_class"].items():
        lines.append(f"{name:<{width}}  {'nan' if value is None else f'{value:6.2f}'}")
    lines.append("-" * (width + 8))
    lines.append(f"mIoU {result['mIoU']}  aAcc {result['aAcc']}  ({result['pixels']} labelled pixels)")
    return "\n".join(lines)


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
