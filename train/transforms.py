"""Paired (image, label) transforms for semantic segmentation, following mmsegmentation's pipelines
(docs/ann-spec.md §2).

Images are HxWx3 uint8 RGB numpy arrays and labels HxW uint8 numpy arrays until `ToTensor`, which normalises the
image and returns (float32 [3,H,W] tensor, int64 [H,W] tensor). Randomness comes from Python's `random` module;
training seeds it per sample (datasets.SeededAugmentation), so a sample's augmentation does not depend on the
worker that loads it.
"""

import random

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = 255
# ImageNet statistics in RGB order, on the 0-255 scale (mmseg's SegDataPreProcessor).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Keep-ratio target size: the long edge fits max(scale) and the short edge fits min(scale) (mmcv.imrescale)."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an HxWx3 uint8 image to size=(width, height)."""
    if (image.shape[1], image.shape[0]) == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an HxW label map to size=(width, height), so no new class ids appear."""
    if (label.shape[1], label.shape[0]) == tuple(size):
        return label
    return np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, label):
        for transform in self.transforms:
            image, label = transform(image, label)
        return image, label

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(repr(t) for t in self.transforms)})"


class RandomResize:
    """Draw r ~ U(ratio_range), then rescale keep-ratio to the scale (int(W*r), int(H*r)) (mmseg RandomResize)."""

    def __init__(self, scale: tuple[int, int], ratio_range: tuple[float, float] = (0.5, 2.0)):
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)

    def __call__(self, image, label):
        ratio = random.uniform(*self.ratio_range)
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        size = rescale_size(image.shape[1], image.shape[0], target)
        return resize_image(image, size), resize_label(label, size)

    def __repr__(self):
        return f"{type(self).__name__}(scale={self.scale}, ratio_range={self.ratio_range})"


class RandomCrop:
    """Random crop of at most crop_size=(height, width); re-drawn up to 10 times while one non-ignored class
    covers cat_max_ratio or more of the crop's labelled pixels (or the crop holds a single class), as mmseg does.
    The crop is smaller than crop_size where the image is; `PadTo` fills it up later."""

    max_redraws = 10

    def __init__(self, crop_size: tuple[int, int], cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX):
        self.crop_size = tuple(crop_size)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def _draw_box(self, height: int, width: int) -> tuple[int, int]:
        top = random.randint(0, max(height - self.crop_size[0], 0))
        left = random.randint(0, max(width - self.crop_size[1], 0))
        return top, left

    def _is_balanced(self, label_crop: np.ndarray) -> bool:
        counts = np.bincount(label_crop.ravel(), minlength=256)
        counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return bool(len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio)

    def __call__(self, image, label):
        crop_h, crop_w = self.crop_size
        top, left = self._draw_box(*label.shape)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.max_redraws):
                if self._is_balanced(label[top : top + crop_h, left : left + crop_w]):
                    break
                top, left = self._draw_box(*label.shape)
        window = (slice(top, top + crop_h), slice(left, left + crop_w))
        return image[window], label[window]

    def __repr__(self):
        return f"{type(self).__name__}(crop_size={self.crop_size}, cat_max_ratio={self.cat_max_ratio})"


class RandomHorizontalFlip:
    def __init__(self, prob: float = 0.5):
        self.prob = prob

    def __call__(self, image, label):
        if random.random() < self.prob:
            return image[:, ::-1], label[:, ::-1]
        return image, label

    def __repr__(self):
        return f"{type(self).__name__}(prob={self.prob})"


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 HSV with OpenCV's 8-bit convention (H in [0,180), S and V in [0,255])."""
    rgb = image.astype(np.float32)
    value = rgb.max(axis=2)
    chroma = value - rgb.min(axis=2)
    saturation = np.where(value > 0, chroma * 255.0 / np.maximum(value, 1e-6), 0.0)
    safe_chroma = np.maximum(chroma, 1e-6)
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    hue = np.where(
        value == red,
        60.0 * (green - blue) / safe_chroma,
        np.where(value == green, 120.0 + 60.0 * (blue - red) / safe_chroma, 240.0 + 60.0 * (red - green) / safe_chroma),
    )
    hue = np.where(chroma > 0, hue % 360.0, 0.0)
    hsv = np.stack([np.round(hue / 2.0) % 180, np.round(saturation), value], axis=2)
    return hsv.astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of `rgb_to_hsv` (uint8 in, uint8 out)."""
    hue = hsv[..., 0].astype(np.float32) * 2.0 / 60.0
    saturation = hsv[..., 1].astype(np.float32) / 255.0
    value = hsv[..., 2].astype(np.float32)
    sector = np.floor(hue).astype(np.int64) % 6
    fraction = hue - np.floor(hue)
    p = value * (1.0 - saturation)
    q = value * (1.0 - saturation * fraction)
    t = value * (1.0 - saturation * (1.0 - fraction))
    # (R, G, B) for each of the six hue sectors.
    choices = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    rgb = np.zeros(hsv.shape, dtype=np.float32)
    for index, (red, green, blue) in enumerate(choices):
        mask = sector == index
        rgb[mask] = np.stack([red[mask], green[mask], blue[mask]], axis=1)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


class PhotoMetricDistortion:
    """mmseg's PhotoMetricDistortion: brightness, contrast (2nd or last), saturation, hue; each with p=0.5 and a
    clip to uint8 after each step."""

    def __init__(self, brightness_delta: int = 32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                 hue_delta: int = 18):
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    @staticmethod
    def _affine(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def _brightness(self, image):
        if random.randint(0, 1):
            return self._affine(image, beta=random.uniform(-self.brightness_delta, self.brightness_delta))
        return image

    def _contrast(self, image):
        if random.randint(0, 1):
            return self._affine(image, alpha=random.uniform(*self.contrast_range))
        return image

    def _saturation(self, image):
        if random.randint(0, 1):
            hsv = rgb_to_hsv(image)
            hsv[..., 1] = self._affine(hsv[..., 1], alpha=random.uniform(*self.saturation_range))
            return hsv_to_rgb(hsv)
        return image

    def _hue(self, image):
        if random.randint(0, 1):
            hsv = rgb_to_hsv(image)
            shift = random.randint(-self.hue_delta, self.hue_delta)
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 180
            return hsv_to_rgb(hsv)
        return image

    def __call__(self, image, label):
        image = self._brightness(image)
        contrast_first = random.randint(0, 1) == 1
        if contrast_first:
            image = self._contrast(image)
        image = self._saturation(image)
        image = self._hue(image)
        if not contrast_first:
            image = self._contrast(image)
        return image, label

    def __repr__(self):
        return f"{type(self).__name__}()"


class ToTensor:
    """uint8 RGB -> float32 [3,H,W] normalised with the ImageNet mean/std; label -> int64 [H,W]."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image, label):
        tensor = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)
        tensor = (tensor - self.mean) / self.std
        return tensor, torch.from_numpy(label.astype(np.int64))

    def __repr__(self):
        return f"{type(self).__name__}()"


class PadTo:
    """Pad on the bottom/right to size=(height, width): image with 0 (after normalisation), label with 255."""

    def __init__(self, size: tuple[int, int], ignore_index: int = IGNORE_INDEX):
        self.size = tuple(size)
        self.ignore_index = ignore_index

    def __call__(self, image, label):
        pad_h = max(self.size[0] - image.shape[-2], 0)
        pad_w = max(self.size[1] - image.shape[-1], 0)
        if pad_h or pad_w:
            image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            label = torch.nn.functional.pad(label, (0, pad_w, 0, pad_h), value=self.ignore_index)
        return image, label

    def __repr__(self):
        return f"{type(self).__name__}(size={self.size})"


class ToUint8Tensor:
    """Evaluation input: the raw image as a uint8 [3,H,W] tensor (resized and normalised on the device, so that
    multi-scale testing can reuse it) and the label at its original size as int64 [H,W]."""

    def __call__(self, image, label):
        tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return tensor, torch.from_numpy(label.astype(np.int64))

    def __repr__(self):
        return f"{type(self).__name__}()"


def train_transforms(scale, crop_size, ratio_range=(0.5, 2.0), cat_max_ratio=0.75, photometric=True):
    """The mmseg training pipeline (docs/ann-spec.md §2) ending in normalised, padded tensors."""
    steps = [
        RandomResize(scale, ratio_range),
        RandomCrop(crop_size, cat_max_ratio),
        RandomHorizontalFlip(0.5),
    ]
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += [ToTensor(), PadTo(crop_size)]
    return Compose(steps)


def eval_transforms():
    return Compose([ToUint8Tensor()])
