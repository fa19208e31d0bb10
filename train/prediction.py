"""Test-time inference as mmseg does it (docs/ann-spec.md §4): keep-ratio resize to the test scale, whole-image or
sliding-window logits, resize back to the original size; multi-scale + flip averages softmax probabilities. And
`evaluate`, which scores those predictions over a validation set."""

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm import tqdm

from annkernels.train.config import TrainConfig
from annkernels.train.metrics import ConfusionMatrix
from annkernels.train.transforms import IMAGENET_MEAN, IMAGENET_STD, rescale_size

AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# mmseg's MultiScaleFlipAug ratios of the base test scale ("ms+flip" results).
AUG_TEST_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 or float RGB [B,3,H,W] on the 0-255 scale -> ImageNet-normalised float32."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(1, 3, 1, 1)
    return (image.float() - mean) / std


def resize_keep_ratio(image: torch.Tensor, scale) -> torch.Tensor:
    """Bilinear keep-ratio resize of [B,3,H,W] so the long edge fits max(scale) and the short edge min(scale)."""
    height, width = image.shape[-2:]
    new_width, new_height = rescale_size(width, height, scale)
    if (new_height, new_width) == (height, width):
        return image
    return F.interpolate(image.float(), size=(new_height, new_width), mode="bilinear", align_corners=False)


def slide_logits(model, image: torch.Tensor, crop_size, stride, num_classes: int) -> torch.Tensor:
    """Sliding-window logits [B,K,H,W]: windows of crop_size=(h,w) every stride=(h,w); the last window in each
    direction is shifted back inside the image; overlapping logits are summed and divided by the window count.
    Windows are only smaller than crop_size where the image itself is."""
    batch, _, height, width = image.shape
    crop_h, crop_w = crop_size
    stride_h, stride_w = stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    logits = image.new_zeros((batch, num_classes, height, width), dtype=torch.float32)
    count = image.new_zeros((1, 1, height, width), dtype=torch.float32)
    for row in range(rows):
        for col in range(cols):
            bottom = min(row * stride_h + crop_h, height)
            right = min(col * stride_w + crop_w, width)
            top, left = max(bottom - crop_h, 0), max(right - crop_w, 0)
            window = model.predict(image[:, :, top:bottom, left:right])
            logits[:, :, top:bottom, left:right] += window.float()
            count[:, :, top:bottom, left:right] += 1
    return logits / count


def network_logits(model, image, mode="whole", crop_size=None, stride=None, num_classes=None):
    """Full-resolution logits of a normalised [B,3,H,W] image, by `mode` 'whole' or 'slide'."""
    if mode == "whole":
        return model.predict(image).float()
    if mode == "slide":
        return slide_logits(model, image, crop_size, stride, num_classes)
    raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")


@torch.no_grad()
def predict_scores(model, raw_image: torch.Tensor, scale, num_classes: int, mode="whole", crop_size=None,
                   stride=None, aug_test=False, align_corners=False, channels_last=False):
    """Class scores [B,K,H,W] at the raw image's size for a uint8 [B,3,H,W] image; their argmax is the prediction.

    Single-scale (the default), the scores are logits: those of the image resized to `scale`, resized back
    bilinearly. With aug_test they are probabilities: the mean softmax over scales AUG_TEST_RATIOS x `scale`,
    each with and without horizontal flip (12 views).
    """
    out_size = raw_image.shape[-2:]
    ratios = AUG_TEST_RATIOS if aug_test else (1.0,)
    flips = (False, True) if aug_test else (False,)
    total = None
    for ratio in ratios:
        view_scale = (int(scale[0] * ratio), int(scale[1] * ratio))
        image = normalize(resize_keep_ratio(raw_image, view_scale))
        if channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        for flip in flips:
            view = image.flip(-1) if flip else image
            logits = network_logits(model, view, mode, crop_size, stride, num_classes)
            if flip:
                logits = logits.flip(-1)
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=align_corners)
            if not aug_test:
                return logits
            probabilities = logits.softmax(dim=1)
            total = probabilities if total is None else total + probabilities
    return total / (len(ratios) * len(flips))


def autocast(config: TrainConfig, device: torch.device):
    dtype = AMP_DTYPES[config.amp]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def slide_windows(config: TrainConfig):
    """(window, stride) of slide-mode inference: eval_crop_size or the training crop, eval_stride or 2/3 of it."""
    crop_size = config.eval_crop_size or config.crop_size
    return crop_size, config.eval_stride or tuple(max(1, 2 * c // 3) for c in crop_size)


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
    confusion = ConfusionMatrix(config.num_classes, device=device)
    crop_size, stride = slide_windows(config)
    for image, target in tqdm(loader, desc="eval", leave=False, disable=not (progress and context.is_main)):
        image, target = image.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with autocast(config, device):
            scores = predict_scores(model, image, config.scale, config.num_classes, mode=config.eval_mode,
                                    crop_size=crop_size, stride=stride, aug_test=aug_test,
                                    align_corners=config.align_corners, channels_last=config.channels_last)
        confusion.update(scores.argmax(1), target)
    confusion.all_reduce()
    model.train(was_training)
    return confusion.compute(class_names)
