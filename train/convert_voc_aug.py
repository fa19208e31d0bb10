"""Turn the SBD augmented annotations (benchmark_RELEASE/dataset/cls/*.mat, field GTcls.Segmentation) into
VOC2012/SegmentationClassAug/*.png and write the aug/trainaug split lists, as mmseg's voc_aug.py converter.

    python train/convert_voc_aug.py data/VOCdevkit data/VOCdevkit/benchmark_RELEASE --nproc 8

aug.txt = (SBD train + SBD val) - (VOC train + VOC val): 9118 names for the real data; trainaug.txt = VOC train
+ aug.txt: 10582. The training set reads train.txt with SegmentationClass and aug.txt with SegmentationClassAug.
"""

import argparse
import sys
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

VOC_TRAIN_SIZE, AUG_SIZE = 1464, 9118  # the official lists; other sizes mean a different (e.g. test) tree


def mat_to_png(mat_path: Path, out_dir: Path) -> str:
    from scipy.io import loadmat

    annotation = loadmat(str(mat_path), squeeze_me=True, struct_as_record=False)["GTcls"]
    mask = np.asarray(annotation.Segmentation)
    if mask.ndim != 2 or mask.max(initial=0) > 255:
        raise ValueError(f"{mat_path}: GTcls.Segmentation must be a 2-D class map, got {mask.shape}")
    Image.fromarray(mask.astype(np.uint8)).save(out_dir / f"{mat_path.stem}.png")
    return mat_path.stem


def read_list(path: Path) -> list:
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def get_args_parser():
    parser = argparse.ArgumentParser(description="SBD .mat annotations -> VOC2012/SegmentationClassAug PNGs")
    parser.add_argument("devkit_path", help="VOCdevkit folder (holding VOC2012/)")
    parser.add_argument("aug_path", help="SBD benchmark_RELEASE folder (holding dataset/cls/*.mat)")
    parser.add_argument("--nproc", type=int, default=1, help="worker processes")
    return parser


def main(args) -> int:
    voc_root = Path(args.devkit_path) / "VOC2012"
    sbd_root = Path(args.aug_path) / "dataset"
    mat_dir = sbd_root / "cls"
    try:
        voc_train = read_list(voc_root / "ImageSets" / "Segmentation" / "train.txt")
        voc_val = read_list(voc_root / "ImageSets" / "Segmentation" / "val.txt")
        sbd_names = read_list(sbd_root / "train.txt") + read_list(sbd_root / "val.txt")
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    mat_files = sorted(mat_dir.glob("*.mat"))
    if not mat_files:
        print(f"error: no .mat files in {mat_dir} (expected benchmark_RELEASE/dataset/cls/*.mat)", file=sys.stderr)
        return 1
    out_dir = voc_root / "SegmentationClassAug"
    out_dir.mkdir(parents=True, exist_ok=True)
    convert = partial(mat_to_png, out_dir=out_dir)
    if args.nproc > 1:
        with Pool(args.nproc) as pool:
            pool.map(convert, mat_files, chunksize=16)
    else:
        for path in mat_files:
            convert(path)

    excluded = set(voc_train) | set(voc_val)
    aug = sorted(set(sbd_names) - excluded)
    if len(voc_train) == VOC_TRAIN_SIZE and len(aug) != AUG_SIZE:
        print(f"error: expected {AUG_SIZE} aug images (10582 - {VOC_TRAIN_SIZE}), found {len(aug)}: "
              "check the SBD train.txt/val.txt lists", file=sys.stderr)
        return 1
    missing = [name for name in aug if not (out_dir / f"{name}.png").is_file()]
    if missing:
        print(f"error: {len(missing)} aug images have no .mat annotation, first: {mat_dir / (missing[0] + '.mat')}",
              file=sys.stderr)
        return 1
    split_dir = voc_root / "ImageSets" / "Segmentation"
    (split_dir / "aug.txt").write_text("".join(f"{name}\n" for name in aug))
    trainaug = sorted(set(voc_train) | set(aug))
    (split_dir / "trainaug.txt").write_text("".join(f"{name}\n" for name in trainaug))
    print(f"wrote {len(mat_files)} PNGs to {out_dir}; aug.txt {len(aug)}, trainaug.txt {len(trainaug)} names")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
