"""Built-in synthetic segmentation scenes: small, generated on the fly, deterministic per (seed, split, index).

Each scene has two textured grounds, "field" (striped green) and "water" (wavy blue), split by a wavy line.
Look-alike blobs are "cow" on field and "boat" on water, so a blob's own pixels do not decide its class: its
surroundings do. Look-alike small markers are "flag" when they touch a blob and "rock" when they stand alone,
so their class depends on a neighbouring object. A one-pixel ring around each blob is labelled 255 (ignore),
like the object borders of PASCAL VOC. Classes and palette: train/classes.py (SYNTHETIC_*).
"""

import math

import numpy as np
from torch.utils.data import Dataset

FIELD, WATER, COW, BOAT, FLAG, ROCK = range(6)
NUM_CLASSES = 6
_SPLIT_CODES = {"train": 0, "val": 1}


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square (Chebyshev) dilation by `radius` pixels."""
    height, width = mask.shape
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy : dy + height, dx : dx + width]
    return out


def _ground(rng, size, yy, xx):
    """Textured field/water background and its label map."""
    angle = rng.uniform(0, 2 * math.pi)
    offset = rng.uniform(-0.25, 0.25) * size
    along = -(xx - size / 2) * math.sin(angle) + (yy - size / 2) * math.cos(angle)
    across = (xx - size / 2) * math.cos(angle) + (yy - size / 2) * math.sin(angle)
    wave = rng.uniform(1, 4) * np.sin(along * rng.uniform(0.1, 0.3) + rng.uniform(0, 2 * math.pi))
    water = across - offset + wave > 0

    noise = rng.normal(0, 10, (size, size, 1))
    stripes = 25 * np.sin((xx + yy) * 2 * math.pi / rng.uniform(5, 9))[..., None]
    field = np.array([70, 150, 60]) + rng.uniform(-20, 20, 3) + stripes + noise
    ripples = 30 * np.sin(yy * 2 * math.pi / rng.uniform(4, 7) + 2 * np.sin(xx / 5))[..., None]
    lake = np.array([50, 90, 190]) + rng.uniform(-20, 20, 3) + ripples + noise
    image = np.where(water[..., None], lake, field)
    return image, water.astype(np.uint8)


def _blob_mask(rng, size, yy, xx, scale):
    cy, cx = rng.uniform(0.15, 0.85, 2) * size
    ry, rx = rng.uniform(5, 9, 2) * scale
    theta = rng.uniform(0, math.pi)
    u = ((xx - cx) * math.cos(theta) + (yy - cy) * math.sin(theta)) / rx
    v = (-(xx - cx) * math.sin(theta) + (yy - cy) * math.cos(theta)) / ry
    return u * u + v * v <= 1.0


def _paint_blob(rng, image, mask):
    """Brown-grey speckled body: the same look on either ground."""
    colour = np.array([150, 120, 100]) + rng.uniform(-15, 15, 3)
    speckle = rng.normal(0, 14, image.shape[:2] + (1,))
    image[mask] = (colour + speckle)[mask]


def _paint_marker(image, top, left, side):
    """Yellow square with a dark centre line: the same look for flags and rocks."""
    image[top : top + side, left : left + side] = (235, 215, 70)
    middle = top + side // 2
    image[middle, left : left + side] = (40, 30, 20)


def make_scene(seed: int, split: str, index: int, size: int = 64):
    """Returns (image HxWx3 uint8 RGB, label HxW uint8) for one scene."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    scale = size / 64
    image, label = _ground(rng, size, yy, xx)
    occupied = np.zeros((size, size), dtype=bool)
    blobs = np.zeros((size, size), dtype=bool)
    ring = np.zeros((size, size), dtype=bool)

    for _ in range(rng.integers(1, 4)):
        for _attempt in range(20):
            mask = _blob_mask(rng, size, yy, xx, scale)
            grounds = np.unique(label[mask])
            if mask.sum() < 12 or len(grounds) != 1 or (_dilate(mask, 2) & occupied).any():
                continue
            _paint_blob(rng, image, mask)
            label[mask] = COW if grounds[0] == FIELD else BOAT
            border = _dilate(mask, 1) & ~mask
            ring |= border
            blobs |= mask
            occupied |= _dilate(mask, 1)
            break

    side = max(4, int(round(9 * scale)))
    near_blob = _dilate(blobs, 2) & ~_dilate(blobs, 1)
    for _ in range(rng.integers(1, 4)):
        want_flag = bool(blobs.any()) and rng.random() < 0.5
        for _attempt in range(30):
            top, left = rng.integers(0, size - side, 2)
            square = np.zeros((size, size), dtype=bool)
            square[top : top + side, left : left + side] = True
            if (square & occupied).any():
                continue
            touches = (square & near_blob).any()
            if want_flag != touches or (not want_flag and (square & _dilate(blobs, 6)).any()):
                continue
            _paint_marker(image, top, left, side)
            label[square] = FLAG if want_flag else ROCK
            occupied |= _dilate(square, 1)
            break

    label[ring & (label != FLAG)] = 255
    return np.clip(image, 0, 255).astype(np.uint8), label


class SyntheticScenes(Dataset):
    """`length` scenes of `size`x`size` pixels, generated on access; the same (seed, split, index) always gives
    the same scene, in any process."""

    num_classes = NUM_CLASSES

    def __init__(self, split: str = "train", length: int = 2000, size: int = 64, seed: int = 0, transforms=None):
        if split not in _SPLIT_CODES:
            raise ValueError(f"synthetic split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
        self.split, self.length, self.size, self.seed = split, length, size, seed
        self.transforms = transforms

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        image, label = make_scene(self.seed, self.split, index, self.size)
        if self.transforms is not None:
            return self.transforms(image, label)
        return image, label
