"""Make Cityscapes trainId labels (*_gtFine_labelTrainIds.png, 19 classes, 255 = ignore) from the
*_gtFine_polygons.json annotations with cityscapesscripts, as mmseg's tools/dataset_converters/cityscapes.py.

    pip install cityscapesscripts
    python train/convert_cityscapes.py data/cityscapes --nproc 8

Also writes <root>/{train,val,test}.txt listing the image names of each split.
"""

import argparse
import sys
from functools import partial
from multiprocessing import Pool
from pathlib import Path

POLYGON_SUFFIX = "_gtFine_polygons.json"
TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"


def polygons_to_train_ids(json_path: Path, json2labelImg) -> Path:
    out = json_path.with_name(json_path.name[: -len(POLYGON_SUFFIX)] + TRAIN_ID_SUFFIX)
    json2labelImg(str(json_path), str(out), "trainIds")
    return out


def get_args_parser():
    parser = argparse.ArgumentParser(description="Cityscapes polygons -> trainId label PNGs")
    parser.add_argument("cityscapes_root", help="folder holding gtFine/ and leftImg8bit/")
    parser.add_argument("--gt-dir", default="gtFine", help="annotation folder under the root")
    parser.add_argument("--nproc", type=int, default=1, help="worker processes")
    return parser


def main(args) -> int:
    try:
        from cityscapesscripts.preparation.json2labelImg import json2labelImg
    except ImportError as error:
        print(f"error: cityscapesscripts is needed to draw the polygons ({error}); "
              "install it with `pip install cityscapesscripts`", file=sys.stderr)
        return 1
    root = Path(args.cityscapes_root)
    gt_dir = root / args.gt_dir
    if not gt_dir.is_dir():
        print(f"error: {gt_dir} not found; expected <root>/{args.gt_dir}/{{train,val,test}}/<city>/"
              f"*{POLYGON_SUFFIX}", file=sys.stderr)
        return 1
    json_files = sorted(gt_dir.glob(f"*/*/*{POLYGON_SUFFIX}"))
    if not json_files:
        print(f"error: no *{POLYGON_SUFFIX} files under {gt_dir}/<split>/<city>/", file=sys.stderr)
        return 1
    convert = partial(polygons_to_train_ids, json2labelImg=json2labelImg)
    if args.nproc > 1:
        with Pool(args.nproc) as pool:
            outputs = pool.map(convert, json_files, chunksize=8)
    else:
        outputs = [convert(path) for path in json_files]
    for split in ("train", "val", "test"):
        names = sorted(p.name[: -len(TRAIN_ID_SUFFIX)] for p in outputs if p.parent.parent.name == split)
        if names:
            (root / f"{split}.txt").write_text("".join(f"{name}\n" for name in names))
    print(f"wrote {len(outputs)} trainId labels under {gt_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
