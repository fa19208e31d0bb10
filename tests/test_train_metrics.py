"""IoU metric (train/metrics.py) against hand-computed examples with mmseg IoUMetric semantics."""


import pytest
import torch

from annkernels.train.metrics import ConfusionMatrix, format_table


def score(pairs, num_classes, names=None):
    confusion = ConfusionMatrix(num_classes)
    for prediction, target in pairs:
        confusion.update(torch.tensor(prediction), torch.tensor(target))
    return confusion.compute(names)


def test_hand_computed_example_with_ignore_and_absent_classes():
    # 4 classes. GT has classes 0, 1 and ignore; class 2 is predicted but absent from GT (IoU 0);
    # class 3 is neither in GT nor predicted (NaN, left out of the mean).
    target = [[0, 0, 1, 1],
              [0, 255, 1, 255]]
    prediction = [[0, 1, 1, 2],
                  [0, 3, 1, 0]]  # predictions at ignored pixels (3 and 0) must not count
    result = score([(prediction, target)], 4, ["a", "b", "c", "d"])
    # class 0: I = 2 (pixels (0,0),(1,0)); P = 2 (ignored (1,3) dropped); L = 3 -> U = 3 -> 66.67
    # class 1: I = 2; P = 3; L = 3 -> U = 4 -> 50.0
    # class 2: I = 0; P = 1; L = 0 -> 0.0 ; class 3: U = 0 -> NaN
    assert result["per_class"] == {"a": 66.67, "b": 50.0, "c": 0.0, "d": None}
    assert result["mIoU"] == round((2 / 3 + 0.5 + 0.0) / 3 * 100, 2) == 38.89
    assert result["aAcc"] == round(4 / 6 * 100, 2) == 66.67
    assert result["pixels"] == 6


def test_histograms_are_summed_over_the_dataset_not_averaged_per_image():
    image_a = ([0, 0, 0, 0], [0, 0, 0, 0])  # class 0 perfect on 4 pixels
    image_b = ([1, 1], [0, 1])  # one class-0 pixel predicted as 1
    result = score([image_a, image_b], 2)
    # dataset level: class 0 I=4, U=5 -> 80; class 1 I=1, U=2 -> 50. Per-image averaging would differ.
    assert result["per_class"] == {"0": 80.0, "1": 50.0}
    assert result["mIoU"] == 65.0
    assert result["aAcc"] == round(5 / 6 * 100, 2)


def test_all_ignored_gives_no_score():
    result = score([([1, 2], [255, 255])], 3)
    assert result["mIoU"] is None and result["aAcc"] is None and result["pixels"] == 0
    assert all(v is None for v in result["per_class"].values())


def test_label_ids_outside_the_classes_are_ignored():
    result = score([([0, 1, 1], [0, 1, 7])], 2)
    assert result["pixels"] == 2 and result["mIoU"] == 100.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(3).update(torch.zeros(2, 3), torch.zeros(3, 2))


def test_table_lists_every_class():
    table = format_table(score([([0, 1], [0, 0])], 3, ["road", "car", "sky"]))
    assert "road" in table and "sky" in table and "nan" in table and "mIoU 25.0" in table
