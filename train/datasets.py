"""Readers for the on-disk layouts of ADE20K, Cityscapes and PASCAL VOC 2012 + SBD aug (docs/ann-spec.md §2),
and the training and validation loaders built from them.

Each dataset checks its layout when it is built and raises `DatasetLayoutError` naming the expected layout and
the first missing path. A file that cannot be decoded raises `CorruptFileError` naming it.

The training loader is a pure function of (seed, rank, iteration): the order of samples and each sample's
augmentation depend on its place in the stream, not on worker processes or what they drew before, so a run
resumed at iteration k draws exactly the batches an uninterrupted run draws after k.
"""

import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from annkernels.train import transforms as T
from annkernels.train.config import TrainConfig
from annkernels.train.distributed import ShardSampler
from annkernels.train.synthetic import SyntheticScenes

CITYSCAPES_LAYOUT = """\
<root>/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
<root>/gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png   (made by train/convert_cityscapes.py)"""
ADE20K_LAYOUT = """\
<root>/images/{training,validation}/<name>.jpg
<root>/annotations/{training,validation}/<name>.png   (0 = other, 1..150)"""
VOC_LAYOUT = """\
<root>/JPEGImages/<name>.jpg
<root>/SegmentationClass/<name>.png
<root>/SegmentationClassAug/<name>.png   (made by train/convert_voc_aug.py)
<root>/ImageSets/Segmentation/{train,val,aug}.txt"""


class DatasetLayoutError(RuntimeError):
    """The data root does not hold the expected layout."""


class CorruptFileError(RuntimeError):
    """An image or label file exists but cannot be decoded."""


def _layout_error(name: str, root, layout: str, missing) -> DatasetLayoutError:
    return DatasetLayoutError(
        f"{name} data not found: missing {missing}\nexpected layout under data root {root}:\n{layout}"
    )


def read_image(path) -> np.ndarray:
    """HxWx3 uint8 RGB; grayscale, palette and RGBA files are converted."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as error:
        raise CorruptFileError(f"cannot read image {path}: {error}") from None


def read_label(path) -> np.ndarray:
    """HxW uint8 class ids; palette PNGs are read as their indices."""
    try:
        with Image.open(path) as label:
            if label.mode not in ("L", "P", "I;16", "I"):
                raise ValueError(f"label must be a single-channel or palette image, got mode {label.mode}")
            array = np.asarray(label)
    except (OSError, ValueError, SyntaxError) as error:
        raise CorruptFileError(f"cannot read label {path}: {error}") from None
    if array.max(initial=0) > 255:
        raise CorruptFileError(f"label {path} has ids above 255")
    return array.astype(np.uint8)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K: 0 ("other") -> 255 (ignored), then 1..150 -> 0..149; 255 stays 255."""
    reduced = label.astype(np.int16) - 1
    reduced[label == 0] = 255
    reduced[label == 255] = 255
    return reduced.astype(np.uint8)


class SegmentationFiles(Dataset):
    """(image, label) file pairs with an optional joint transform."""

    def __init__(self, pairs, transforms=None, zero_label_is_ignored: bool = False):
        self.pairs = list(pairs)
        self.transforms = transforms
        self.zero_label_is_ignored = zero_label_is_ignored

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image_path, label_path = self.pairs[index]
        image, label = read_image(image_path), read_label(label_path)
        if image.shape[:2] != label.shape:
            raise CorruptFileError(
                f"image {image_path} is {image.shape[1]}x{image.shape[0]} but label {label_path} is "
                f"{label.shape[1]}x{label.shape[0]}"
            )
        if self.zero_label_is_ignored:
            label = reduce_zero_label(label)
        if self.transforms is not None:
            return self.transforms(image, label)
        return image, label


def _require_dir(path: Path, name, root, layout):
    if not path.is_dir():
        raise _layout_error(name, root, layout, path)


def _check_pairs(pairs, name, root, layout):
    if not pairs:
        raise _layout_error(name, root, layout, "any image (the image folder is empty)")
    for image_path, label_path in pairs:
        for path in (image_path, label_path):
            if not os.path.isfile(path):
                raise _layout_error(name, root, layout, path)
    return pairs


def ade20k(root, split: str = "training", transforms=None) -> SegmentationFiles:
    """ADE20K (ADEChallengeData2016), split 'training' (20210) or 'validation' (2000), reduce_zero_label on."""
    root = Path(root)
    _require_dir(root, "ADE20K", root, ADE20K_LAYOUT)
    image_dir, label_dir = root / "images" / split, root / "annotations" / split
    _require_dir(image_dir, "ADE20K", root, ADE20K_LAYOUT)
    _require_dir(label_dir, "ADE20K", root, ADE20K_LAYOUT)
    pairs = [(p, label_dir / (p.stem + ".png")) for p in sorted(image_dir.glob("*.jpg"))]
    return SegmentationFiles(_check_pairs(pairs, "ADE20K", root, ADE20K_LAYOUT), transforms, True)


def cityscapes(root, split: str = "train", transforms=None) -> SegmentationFiles:
    """Cityscapes fine annotations as 19 trainIds, split 'train' (2975) or 'val' (500)."""
    root = Path(root)
    _require_dir(root, "Cityscapes", root, CITYSCAPES_LAYOUT)
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    _require_dir(image_dir, "Cityscapes", root, CITYSCAPES_LAYOUT)
    _require_dir(label_dir, "Cityscapes", root, CITYSCAPES_LAYOUT)
    suffix = "_leftImg8bit.png"
    pairs = [
        (p, label_dir / p.parent.name / (p.name[: -len(suffix)] + "_gtFine_labelTrainIds.png"))
        for p in sorted(image_dir.glob(f"*/*{suffix}"))
    ]
    return SegmentationFiles(_check_pairs(pairs, "Cityscapes", root, CITYSCAPES_LAYOUT), transforms)


def _voc_split(root: Path, split: str, label_folder: str):
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        raise _layout_error("VOC2012", root, VOC_LAYOUT, list_file)
    names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    pairs = [(root / "JPEGImages" / f"{n}.jpg", root / label_folder / f"{n}.png") for n in names]
    return _check_pairs(pairs, "VOC2012", root, VOC_LAYOUT)


def voc12aug(root, split: str = "train", transforms=None) -> Dataset:
    """PASCAL VOC 2012. 'train' is train.txt with SegmentationClass (1464) concatenated with aug.txt with
    SegmentationClassAug (9118): 10582 images. 'val' is val.txt (1449) with SegmentationClass."""
    root = Path(root)
    _require_dir(root, "VOC2012", root, VOC_LAYOUT)
    if split == "train":
        return ConcatDataset([
            SegmentationFiles(_voc_split(root, "train", "SegmentationClass"), transforms),
            SegmentationFiles(_voc_split(root, "aug", "SegmentationClassAug"), transforms),
        ])
    return SegmentationFiles(_voc_split(root, split, "SegmentationClass"), transforms)


def synthetic(root=None, split: str = "train", transforms=None, length=None, size: int = 64, seed: int = 0):
    length = length if length is not None else (2000 if split == "train" else 64)
    return SyntheticScenes(split, length=length, size=size, seed=seed, transforms=transforms)


BUILDERS = {"ade20k": ade20k, "cityscapes": cityscapes, "voc12aug": voc12aug, "synthetic": synthetic}


def build_dataset(name: str, root, split: str, transforms=None, **options) -> Dataset:
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(BUILDERS)}")
    return BUILDERS[name](root, split=split, transforms=transforms, **options)


class InfiniteShardSampler(Sampler):
    """Endless (sample number, index) pairs of one process. Pass p over the dataset is the permutation
    torch.randperm(n) drawn with seed + p, of which rank r takes positions r, r + W, ... (W processes, every rank
    the same count); sample numbers count this process's draws from 0. `start` continues a stream where a
    checkpoint left it: the same pairs an uninterrupted stream yields from its sample `start` on."""

    def __init__(self, length: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if length < world_size:
            raise ValueError(f"a dataset of {length} samples cannot be shared by {world_size} processes")
        self.length, self.seed, self.rank, self.world_size, self.start = length, seed, rank, world_size, start
        self.per_pass = length // world_size

    def __iter__(self):
        number = self.start
        while True:
            shuffle, offset = divmod(number, self.per_pass)
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + shuffle))
            for index in order[self.rank :: self.world_size][: self.per_pass][offset:].tolist():
                yield number, index
                number += 1


class SeededAugmentation(Dataset):
    """Item (sample number, index) of a dataset whose transforms draw from Python's `random`: the transforms run
    with `random` seeded from (seed, rank, sample number), so a sample's augmentation is the same in whichever
    worker, or after whichever resume, it is drawn. The caller's `random` state is left as it was."""

    def __init__(self, dataset: Dataset, seed: int, rank: int = 0):
        self.dataset, self.seed, self.rank = dataset, seed, rank

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        number, index = item
        state = random.getstate()
        random.seed(f"{self.seed}/{self.rank}/{number}")
        try:
            return self.dataset[index]
        finally:
            random.setstate(state)


def build_split(config: TrainConfig, split: str, transforms, synthetic_length: int):
    """One split of the configured dataset; for the synthetic scenes, `synthetic_length` of them."""
    options = {}
    if config.dataset == "synthetic":
        options = dict(size=config.synthetic_size, seed=config.seed, length=synthetic_length)
    return build_dataset(config.dataset, config.data_root, split, transforms, **options)


def build_datasets(config: TrainConfig):
    """(training set, validation set) of the configured dataset; a missing layout or file fails here."""
    train_transforms = T.train_transforms(config.scale, config.crop_size, config.ratio_range, config.cat_max_ratio,
                                          config.photometric)
    train_set = build_split(config, config.train_split, train_transforms, config.synthetic_train_length)
    val_set = build_split(config, config.val_split, T.eval_transforms(), config.synthetic_val_length)
    return train_set, val_set


def build_loaders(train_set, val_set, config: TrainConfig, context, start_iteration: int = 0, worker_init_fn=None):
    """Training loader (endless, sharded over processes, from batch `start_iteration` on) and validation loader
    (each image scored once). Both draw their workers' seeds from their own generator, not torch's global one,
    whose stream the model's dropout follows."""
    sampler = InfiniteShardSampler(len(train_set), config.seed, context.rank, context.world_size,
                                   start=start_iteration * config.batch_size)
    options = dict(num_workers=config.workers, pin_memory=context.device.type == "cuda",
                   worker_init_fn=worker_init_fn, generator=torch.Generator().manual_seed(config.seed))
    train_loader = DataLoader(SeededAugmentation(train_set, config.seed, context.rank), batch_size=config.batch_size,
                              sampler=sampler, **options)
    val_loader = DataLoader(val_set, batch_size=1, sampler=ShardSampler(len(val_set), context),
                            persistent_workers=config.workers > 0, **options)
    return train_loader, val_loader
