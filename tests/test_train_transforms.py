"""Paired transforms of train/transforms.py: geometry keeps image and label aligned, crop balancing, padding."""

import random

import numpy as np
import pytest
import torch

from annkernels.train import transforms as T
from annkernels.train.datasets import reduce_zero_label


def block_scene(rng, height=96, width=128, block=16, classes=10):
    """Label made of block x block squares; the image encodes each pixel's class as its grey level."""
    grid = rng.integers(0, classes, (height // block + 1, width // block + 1))
    label = np.kron(grid, np.ones((block, block), dtype=np.int64))[:height, :width].astype(np.uint8)
    image = np.repeat((label.astype(np.int64) * 20)[..., None], 3, axis=2).astype(np.uint8)
    return image, label


@pytest.mark.parametrize("seed", range(12))
def test_geometric_pipeline_keeps_image_and_label_aligned(seed):
    random.seed(seed)
    image, label = block_scene(np.random.default_rng(seed))
    pipeline = T.Compose([T.RandomResize((128, 96), (0.5, 2.0)), T.RandomCrop((48, 64), 0.75),
                          T.RandomHorizontalFlip(0.5)])
    out_image, out_label = pipeline(image, label)
    assert out_image.shape[:2] == out_label.shape
    # Away from block edges bilinear and nearest agree: the grey level still names the label there.
    uniform = np.ones_like(out_label, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            uniform &= np.roll(out_label, (dy, dx), axis=(0, 1)) == out_label
    uniform[[0, -1], :] = False
    uniform[:, [0, -1]] = False
    assert uniform.sum() > 100
    np.testing.assert_allclose(out_image[..., 0][uniform], out_label[uniform].astype(np.int64) * 20, atol=1)


def test_flip_flips_both():
    random.seed(0)
    image, label = block_scene(np.random.default_rng(1), 32, 40, 8)
    flipped_image, flipped_label = T.RandomHorizontalFlip(prob=1.0)(image, label)
    np.testing.assert_array_equal(flipped_label, label[:, ::-1])
    np.testing.assert_array_equal(flipped_image, image[:, ::-1])


@pytest.mark.parametrize("size, scale, expected", [
    ((2048, 1024), (2048, 1024), (2048, 1024)),  # Cityscapes at its test scale: unchanged
    ((2048, 1024), (2048, 512), (1024, 512)),  # the short edge limits: factor 0.5
    ((683, 512), (2048, 512), (683, 512)),  # typical ADE image
    ((500, 375), (2048, 512), (683, 512)),  # VOC image: 512/375 = 1.365 -> 682.7 rounds to 683
    ((100, 400), (64, 64), (16, 64)),  # portrait: long edge to 64
])
def test_rescale_size_matches_mmcv_rule(size, scale, expected):
    assert T.rescale_size(*size, scale) == expected


def test_random_resize_uses_ratio_range():
    random.seed(3)
    image, label = block_scene(np.random.default_rng(0), 100, 200)
    sizes = [T.RandomResize((200, 100), (0.5, 2.0))(image, label)[1].shape for _ in range(40)]
    heights = np.array([s[0] for s in sizes])
    assert heights.min() >= 50 and heights.max() <= 200 and heights.std() > 10
    assert all(abs(w / h - 2.0) < 0.05 for h, w in sizes)


def test_label_resize_is_nearest():
    label = np.array([[0, 255], [7, 3]], dtype=np.uint8)
    resized = T.resize_label(label, (7, 5))
    assert set(np.unique(resized)) <= {0, 255, 7, 3}


@pytest.mark.parametrize("counts, balanced", [
    ({0: 74, 1: 26}, True),
    ({0: 75, 1: 25}, False),  # exactly the max ratio is rejected (strict <)
    ({0: 100}, False),  # a single class is never accepted
    ({0: 60, 1: 20, 255: 400}, False),  # ignored pixels do not count: 0 has 75%
    ({0: 50, 1: 25, 2: 25}, True),
])
def test_crop_balance_rule(counts, balanced):
    label = np.concatenate([np.full(n, c, dtype=np.uint8) for c, n in counts.items()])
    assert T.RandomCrop((1, 1), 0.75)._is_balanced(label.reshape(1, -1)) is balanced


def test_random_crop_respects_cat_max_ratio():
    # Class 1 fills a 24x24 corner of a 96x96 zero image; a 32x32 crop is balanced only near that corner.
    label = np.zeros((96, 96), dtype=np.uint8)
    label[:24, :24] = 1
    image = np.zeros((96, 96, 3), dtype=np.uint8)
    balanced = {}
    for ratio in (1.0, 0.75):
        random.seed(0)
        crop = T.RandomCrop((32, 32), ratio)
        results = [crop(image, label)[1] for _ in range(300)]
        balanced[ratio] = np.mean([T.RandomCrop((32, 32), 0.75)._is_balanced(r) for r in results])
        assert all(r.shape == (32, 32) for r in results)
    assert balanced[1.0] < 0.1  # without re-draws the crop is rarely balanced
    assert balanced[0.75] > 3 * balanced[1.0] and balanced[0.75] > 0.25


def test_crop_smaller_image_then_pad():
    random.seed(0)
    image = np.full((20, 30, 3), 200, dtype=np.uint8)
    label = np.full((20, 30), 4, dtype=np.uint8)
    image, label = T.RandomCrop((32, 48), 0.75)(image, label)
    assert label.shape == (20, 30)
    tensor, target = T.PadTo((32, 48))(*T.ToTensor()(image, label))
    assert tensor.shape == (3, 32, 48) and target.shape == (32, 48)
    assert (tensor[:, 20:, :] == 0).all() and (tensor[:, :, 30:] == 0).all()
    assert (target[20:, :] == 255).all() and (target[:, 30:] == 255).all() and (target[:20, :30] == 4).all()


def test_to_tensor_normalises_with_imagenet_statistics():
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 123, 116, 104
    tensor, target = T.ToTensor()(image, np.zeros((2, 2), dtype=np.uint8))
    expected = [(123 - 123.675) / 58.395, (116 - 116.28) / 57.12, (104 - 103.53) / 57.375]
    torch.testing.assert_close(tensor[:, 0, 0], torch.tensor(expected))
    assert target.dtype == torch.int64


def test_hsv_round_trip_and_opencv_ranges():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    hsv = T.rgb_to_hsv(image)
    assert hsv[..., 0].max() < 180
    # 8-bit hue has 2-degree steps, worth up to 255 / 60 ≈ 4.3 levels in the channel that hue sets.
    assert np.abs(T.hsv_to_rgb(hsv).astype(int) - image).max() <= 5
    pure = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]], dtype=np.uint8)
    np.testing.assert_array_equal(T.rgb_to_hsv(pure)[0, :, 0], [0, 60, 120, 0])  # OpenCV hue = degrees / 2
    np.testing.assert_array_equal(T.rgb_to_hsv(pure)[0, :, 1], [255, 255, 255, 0])


def test_photometric_distortion_changes_only_the_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (24, 24, 3)).astype(np.uint8)
    label = rng.integers(0, 5, (24, 24)).astype(np.uint8)
    changed = 0
    for seed in range(10):
        random.seed(seed)
        out_image, out_label = T.PhotoMetricDistortion()(image.copy(), label)
        assert out_image.dtype == np.uint8 and out_image.shape == image.shape
        np.testing.assert_array_equal(out_label, label)
        changed += not np.array_equal(out_image, image)
    assert changed >= 8  # every step skipped has probability 1/16


def test_reduce_zero_label():
    label = np.array([[0, 1, 2], [150, 255, 37]], dtype=np.uint8)
    np.testing.assert_array_equal(reduce_zero_label(label), [[255, 0, 1], [149, 255, 36]])


def test_train_transforms_output_shapes():
    random.seed(0)
    image, label = block_scene(np.random.default_rng(0), 50, 70)
    tensor, target = T.train_transforms((70, 50), (32, 40))(image, label)
    assert tensor.shape == (3, 32, 40) and tensor.dtype == torch.float32
    assert target.shape == (32, 40) and target.dtype == torch.int64
