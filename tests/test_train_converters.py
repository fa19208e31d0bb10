"""Dataset converters: SBD .mat -> SegmentationClassAug + split lists; Cityscapes polygons -> trainIds."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

scipy_io = pytest.importorskip("scipy.io")


def test_voc_aug_converter(tmp_path):
    devkit, sbd = tmp_path / "VOCdevkit", tmp_path / "benchmark_RELEASE"
    splits = devkit / "VOC2012" / "ImageSets" / "Segmentation"
    splits.mkdir(parents=True)
    (splits / "train.txt").write_text("a\nb\n")
    (splits / "val.txt").write_text("c\n")
    (sbd / "dataset" / "cls").mkdir(parents=True)
    (sbd / "dataset" / "train.txt").write_text("a\nd\ne\n")
    (sbd / "dataset" / "val.txt").write_text("c\nf\n")
    masks = {}
    for index, name in enumerate("abcdef"):
        mask = np.full((6, 7), index, dtype=np.uint8)
        mask[0, 0] = 255
        masks[name] = mask
        boundaries = np.zeros((6, 7), dtype=np.uint8)
        scipy_io.savemat(sbd / "dataset" / "cls" / f"{name}.mat",
                         {"GTcls": {"Segmentation": mask, "Boundaries": boundaries, "CategoriesPresent": [index]}})
    result = subprocess.run([sys.executable, "train/convert_voc_aug.py", str(devkit), str(sbd)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = devkit / "VOC2012" / "SegmentationClassAug"
    for name, mask in masks.items():
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{name}.png")), mask)
    # aug = (SBD train + val) - (VOC train + val) = {d, e, f}; trainaug = VOC train + aug
    assert (splits / "aug.txt").read_text().split() == ["d", "e", "f"]
    assert (splits / "trainaug.txt").read_text().split() == ["a", "b", "d", "e", "f"]


def test_voc_aug_converter_reports_missing_lists(tmp_path):
    result = subprocess.run([sys.executable, "train/convert_voc_aug.py", str(tmp_path / "x"), str(tmp_path / "y")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "train.txt" in result.stderr and "Traceback" not in result.stderr


def test_cityscapes_converter_draws_train_ids(tmp_path):
    pytest.importorskip("cityscapesscripts")
    folder = tmp_path / "gtFine" / "train" / "aachen"
    folder.mkdir(parents=True)
    polygons = {
        "imgHeight": 20, "imgWidth": 30,
        "objects": [
            {"label": "road", "polygon": [[0, 10], [29, 10], [29, 19], [0, 19]]},  # trainId 0
            {"label": "sky", "polygon": [[0, 0], [29, 0], [29, 9], [0, 9]]},  # trainId 10
            {"label": "car", "polygon": [[10, 12], [20, 12], [20, 17], [10, 17]]},  # trainId 13, drawn last
            {"label": "ego vehicle", "polygon": [[0, 18], [5, 18], [5, 19], [0, 19]]},  # ignored: 255
        ],
    }
    (folder / "aachen_000000_000019_gtFine_polygons.json").write_text(json.dumps(polygons))
    result = subprocess.run([sys.executable, "train/convert_cityscapes.py", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    label = np.asarray(Image.open(folder / "aachen_000000_000019_gtFine_labelTrainIds.png"))
    assert label.shape == (20, 30)
    assert label[2, 2] == 10 and label[11, 2] == 0 and label[14, 15] == 13 and label[19, 1] == 255
    assert (tmp_path / "train.txt").read_text().split() == ["aachen_000000_000019"]
