"""Dataset readers on tiny fake trees in the real on-disk layouts, layout/corrupt-file errors, synthetic scenes."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from annkernels.train.datasets import (
    CorruptFileError,
    DatasetLayoutError,
    build_dataset,
)
from annkernels.train.synthetic import SyntheticScenes

REPO = Path(__file__).resolve().parents[1]


def write_image(path, height=12, width=16, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def write_label(path, values, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    label = Image.fromarray(np.asarray(values, dtype=np.uint8))
    if palette:  # VOC labels are palette PNGs whose indices are the classes
        label = label.convert("P")
        label.putpalette([0, 0, 0, 128, 0, 0] * 128)
    label.save(path)


def label_map(first, height=12, width=16):
    values = np.full((height, width), first, dtype=np.uint8)
    values[0, 0], values[-1, -1] = 0, 255
    return values


def make_ade(root):
    for split, names in (("training", ["a1", "a2", "a3"]), ("validation", ["v1"])):
        for i, name in enumerate(names):
            write_image(root / "images" / split / f"ADE_{name}.jpg", seed=i)
            write_label(root / "annotations" / split / f"ADE_{name}.png", label_map(i + 1))


def make_cityscapes(root):
    for split, cities in (("train", {"aachen": 2, "bremen": 1}), ("val", {"lindau": 1})):
        for city, count in cities.items():
            for i in range(count):
                stem = f"{city}_{i:06d}_000019"
                write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", seed=i)
                write_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", label_map(18))


def make_voc(root):
    lists = {"train": ["2007_000032", "2007_000039"], "aug": ["2008_000002"], "val": ["2007_000033"]}
    for split, names in lists.items():
        folder = "SegmentationClassAug" if split == "aug" else "SegmentationClass"
        for name in names:
            write_image(root / "JPEGImages" / f"{name}.jpg")
            write_label(root / folder / f"{name}.png", label_map(20), palette=True)
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")


def test_ade20k_reads_pairs_and_reduces_zero_label(tmp_path):
    make_ade(tmp_path)
    train = build_dataset("ade20k", tmp_path, "training")
    assert len(train) == 3 and len(build_dataset("ade20k", tmp_path, "validation")) == 1
    image, label = train[1]
    assert image.shape == (12, 16, 3) and image.dtype == np.uint8
    # stored 2 -> class 1; stored 0 ("other") -> 255; stored 255 stays 255
    assert label[5, 5] == 1 and label[0, 0] == 255 and label[-1, -1] == 255


def test_cityscapes_pairs_images_with_train_ids(tmp_path):
    make_cityscapes(tmp_path)
    train = build_dataset("cityscapes", tmp_path, "train")
    assert len(train) == 3
    image_path, label_path = train.pairs[2]
    assert image_path.parent.name == "bremen" and label_path.name == "bremen_000000_000019_gtFine_labelTrainIds.png"
    _, label = train[0]
    assert label[5, 5] == 18 and label[0, 0] == 0 and label[-1, -1] == 255  # no reduce_zero_label here


def test_voc_train_is_train_plus_aug(tmp_path):
    make_voc(tmp_path)
    train = build_dataset("voc12aug", tmp_path, "train")
    assert len(train) == 3  # train.txt (SegmentationClass) + aug.txt (SegmentationClassAug)
    assert train.datasets[1].pairs[0][1].parent.name == "SegmentationClassAug"
    _, label = train[2]
    assert label[5, 5] == 20 and label[-1, -1] == 255  # palette indices, not colours
    assert len(build_dataset("voc12aug", tmp_path, "val")) == 1


@pytest.mark.parametrize("name, make, remove, expected", [
    ("ade20k", make_ade, "annotations/training", "annotations/training"),
    ("ade20k", make_ade, "annotations/training/ADE_a2.png", "ADE_a2.png"),
    ("cityscapes", make_cityscapes, "gtFine/train/bremen/bremen_000000_000019_gtFine_labelTrainIds.png",
     "bremen_000000_000019_gtFine_labelTrainIds.png"),
    ("voc12aug", make_voc, "ImageSets/Segmentation/aug.txt", "aug.txt"),
    ("voc12aug", make_voc, "SegmentationClassAug/2008_000002.png", "SegmentationClassAug/2008_000002.png"),
])
def test_missing_files_name_the_layout_and_the_first_missing_path(tmp_path, name, make, remove, expected):
    make(tmp_path)
    target = tmp_path / remove
    if target.is_dir():
        for child in target.iterdir():
            child.unlink()
        target.rmdir()
    else:
        target.unlink()
    split = "training" if name == "ade20k" else "train"
    with pytest.raises(DatasetLayoutError) as error:
        build_dataset(name, tmp_path, split)
    message = str(error.value)
    assert expected in message and "expected layout" in message


def test_missing_root(tmp_path):
    with pytest.raises(DatasetLayoutError, match="leftImg8bit"):
        build_dataset("cityscapes", tmp_path / "nowhere", "train")


def test_corrupt_image_and_label_are_named(tmp_path):
    make_ade(tmp_path)
    bad_image = tmp_path / "images" / "training" / "ADE_a1.jpg"
    bad_image.write_bytes(b"not a jpeg")
    train = build_dataset("ade20k", tmp_path, "training")
    with pytest.raises(CorruptFileError, match="ADE_a1.jpg"):
        train[0]
    rgb_label = tmp_path / "annotations" / "training" / "ADE_a2.png"
    Image.fromarray(np.zeros((12, 16, 3), dtype=np.uint8)).save(rgb_label)
    with pytest.raises(CorruptFileError, match="single-channel"):
        train[1]


def test_image_label_size_mismatch_is_reported(tmp_path):
    make_ade(tmp_path)
    write_label(tmp_path / "annotations" / "training" / "ADE_a3.png", np.zeros((5, 5)))
    with pytest.raises(CorruptFileError, match="ADE_a3"):
        build_dataset("ade20k", tmp_path, "training")[2]


def test_grayscale_and_rgba_images_are_read_as_rgb(tmp_path):
    make_ade(tmp_path)
    Image.fromarray(np.zeros((12, 16), dtype=np.uint8)).save(tmp_path / "images" / "training" / "ADE_a1.jpg")
    image, _ = build_dataset("ade20k", tmp_path, "training")[0]
    assert image.shape == (12, 16, 3)


def run_train(*arguments, cwd=REPO):
    return subprocess.run([sys.executable, "train/train.py", *arguments], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_train_cli_reports_bad_data_root_without_traceback(tmp_path):
    result = run_train("--dataset", "voc12aug", "--data-root", str(tmp_path / "VOC2012"), "--work-dir",
                       str(tmp_path / "work"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "VOC2012 data not found" in result.stderr and "ImageSets/Segmentation" in result.stderr


def test_train_cli_stops_cleanly_on_a_corrupt_image_in_a_worker(tmp_path):
    make_ade(tmp_path / "ade")
    bad = tmp_path / "ade" / "images" / "training" / "ADE_a2.jpg"
    bad.write_bytes(b"\x00" * 10)
    result = run_train("--dataset", "ade20k", "--data-root", str(tmp_path / "ade"), "--model", "ann_r18_d8",
                       "--pretrained", "none",
                       "--crop-size", "16", "16", "--scale", "16", "16", "--batch-size", "3", "--iterations", "1",
                       "--workers", "1", "--cpu-threads", "1", "--no-progress", "--work-dir", str(tmp_path / "work"))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: cannot read image") and "ADE_a2.jpg" in last_line


def test_synthetic_scenes_are_deterministic_and_use_all_classes():
    first, second = SyntheticScenes("train", length=30, seed=3), SyntheticScenes("train", length=30, seed=3)
    image, label = first[7]
    np.testing.assert_array_equal(image, second[7][0])
    np.testing.assert_array_equal(label, second[7][1])
    assert not np.array_equal(label, SyntheticScenes("train", length=30, seed=4)[7][1])
    assert not np.array_equal(label, SyntheticScenes("val", length=30, seed=3)[7][1])
    seen = set()
    for index in range(30):
        seen |= set(np.unique(first[index][1]).tolist())
    assert seen == {0, 1, 2, 3, 4, 5, 255}


def test_synthetic_blobs_are_named_by_the_ground_around_them():
    from annkernels.train.synthetic import BOAT, COW, FIELD, WATER, make_scene

    for index in range(20):
        _, label = make_scene(0, "train", index)
        for blob_class, ground in ((COW, FIELD), (BOAT, WATER)):
            mask = label == blob_class
            if not mask.any():
                continue
            ys, xs = np.nonzero(mask)
            # the ground just outside the blob's ignore ring, along its bounding box rows
            around = label[max(ys.min() - 3, 0): ys.max() + 4, max(xs.min() - 3, 0): xs.max() + 4]
            grounds = set(np.unique(around).tolist()) & {FIELD, WATER}
            assert ground in grounds
