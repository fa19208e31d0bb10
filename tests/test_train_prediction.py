"""Test-time inference (train/prediction.py): sliding windows, whole image, multi-scale + flip."""

import pytest
import torch
import torch.nn as nn

from annkernels import models
from annkernels.train.prediction import predict_scores, resize_keep_ratio, slide_logits


class PointwiseModel(nn.Module):
    """predict() is a 1x1 conv: its logits at a pixel depend on that pixel only, so any tiling gives the same
    answer as the whole image. Records the windows it sees."""

    def __init__(self, num_classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.windows = []

    def predict(self, images):
        self.windows.append(tuple(images.shape[-2:]))
        return self.conv(images)


def test_slide_window_grid_matches_mmseg_for_769_cityscapes():
    # 2049x1025 input, crop 769, stride 513: a 2x4 grid of full-size windows (docs/ann-spec.md §4).
    model = PointwiseModel()
    with torch.no_grad():
        slide_logits(model, torch.zeros(1, 3, 1025, 2049), (769, 769), (513, 513), 3)
    assert len(model.windows) == 8 and set(model.windows) == {(769, 769)}


@pytest.mark.parametrize("size, crop, stride", [
    ((64, 96), (64, 48), (64, 48)),  # windows tile the image exactly once
    ((61, 95), (32, 40), (21, 27)),  # overlapping windows, odd sizes
    ((20, 30), (32, 40), (21, 27)),  # image smaller than the window: one window, no padding
])
def test_slide_equals_whole_for_a_pointwise_model(size, crop, stride):
    model = PointwiseModel()
    image = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(slide_logits(model, image, crop, stride, 3), model.predict(image))
    assert all(h <= min(crop[0], size[0]) and w <= min(crop[1], size[1]) for h, w in model.windows[:-1])


def test_slide_equals_whole_when_one_window_covers_the_image():
    model = models.build_segmentor("ann_r18_d8", 4).eval()
    image = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(slide_logits(model, image, (40, 56), (20, 20), 4), model.predict(image))


def test_slide_with_the_real_model_covers_every_pixel():
    model = models.build_segmentor("ann_r18_d8", 4).eval()
    with torch.no_grad():
        logits = slide_logits(model, torch.randn(1, 3, 50, 70), (32, 32), (21, 21), 4)
    assert logits.shape == (1, 4, 50, 70) and torch.isfinite(logits).all()


def test_prediction_is_at_the_raw_image_size_and_aug_test_gives_probabilities():
    model = PointwiseModel()
    raw = torch.randint(0, 256, (1, 3, 37, 53), dtype=torch.uint8)
    logits = predict_scores(model, raw, (64, 32), 3)
    assert logits.shape == (1, 3, 37, 53)
    assert model.windows == [(32, 46)]  # keep-ratio: short edge 37 -> 32, long edge 53 -> 45.8 -> 46
    model.windows.clear()
    probabilities = predict_scores(model, raw, (64, 32), 3, aug_test=True)
    assert len(model.windows) == 12  # 6 scales x (plain, flipped)
    assert probabilities.shape == (1, 3, 37, 53)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(1, 37, 53))


def test_resize_keep_ratio_is_a_no_op_at_the_test_scale():
    image = torch.rand(1, 3, 1024, 2048)
    assert resize_keep_ratio(image, (2048, 1024)) is image
