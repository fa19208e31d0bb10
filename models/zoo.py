"""Released weights: every ANN checkpoint mmsegmentation published (v0.5 results table, configs/ann) and the
ImageNet ResNet-V1c backbones behind mmseg's ``open-mmlab://resnet{18,50,101}_v1c`` names.

    python -m annkernels.models.zoo        # lists them

``annkernels.models.load_checkpoint`` / ``load_pretrained_backbone`` accept any of these names (and the URLs
themselves); files are downloaded once into torch's hub cache.
"""

from __future__ import annotations

from dataclasses import dataclass

OPEN_MMLAB = "open-mmlab://"
_ANN_URL = "https://download.openmmlab.com/mmsegmentation/v0.5/ann"
_BACKBONE_URL = "https://download.openmmlab.com/pretrain/third_party"

# mmseg's ImageNet ResNet-V1c checkpoints (deep stem), keyed by their open-mmlab:// name.
BACKBONES: dict[str, str] = {
    "resnet18_v1c": f"{_BACKBONE_URL}/resnet18_v1c-b5776b93.pth",
    "resnet50_v1c": f"{_BACKBONE_URL}/resnet50_v1c-2cccc1ad.pth",
    "resnet101_v1c": f"{_BACKBONE_URL}/resnet101_v1c-e67eebb6.pth",
}


@dataclass(frozen=True)
class Released:
    """One published ANN model: mmseg's config name, what it was trained on, and its results-table mIoU."""

    name: str  # mmseg 0.x config name, e.g. ann_r50-d8_512x1024_40k_cityscapes
    dataset: str  # our dataset name (train/config.py)
    architecture: str  # our build_segmentor name
    crop_size: tuple[int, int]  # training crop (H, W)
    iterations: int  # schedule
    url: str
    miou: float  # single-scale test
    miou_ms_flip: float  # scales 0.5-1.75 with flip (mmseg 0.x --aug-test)

    def test_settings(self) -> dict:
        """Config values (train/config.py keys) the model was tested with, beyond its dataset's recipe: the
        769x769 Cityscapes models use align_corners, a 2049x1025 scale and 769 windows every 513 pixels."""
        settings = dict(model=self.architecture, crop_size=self.crop_size)
        if self.crop_size == (769, 769):
            settings.update(scale=(2049, 1025), align_corners=True, eval_mode="slide", eval_crop_size=(769, 769),
                            eval_stride=(513, 513))
        return settings


def _released(depth: int, crop: str, thousands: int, dataset: str, stamp: str, miou: float, ms_flip: float):
    name = f"ann_r{depth}-d8_{crop}_{thousands}k_{dataset}"
    height, width = map(int, crop.split("x"))
    return Released(name, dataset, f"ann_r{depth}_d8", (height, width), thousands * 1000,
                    f"{_ANN_URL}/{name}/{name}_{stamp}.pth", miou, ms_flip)


# (depth, crop, k iterations, dataset, file stamp and hash, mIoU, mIoU ms+flip), as mmseg's configs/ann README.
RELEASED: dict[str, Released] = {entry.name: entry for entry in (
    _released(50, "512x1024", 40, "cityscapes", "20200605_095211-049fc292", 77.40, 78.57),
    _released(101, "512x1024", 40, "cityscapes", "20200605_095243-adf6eece", 76.55, 78.85),
    _released(50, "769x769", 40, "cityscapes", "20200530_025712-2b46b04d", 78.89, 80.46),
    _released(101, "769x769", 40, "cityscapes", "20200530_025720-059bff28", 79.32, 80.94),
    _released(50, "512x1024", 80, "cityscapes", "20200607_101911-5a9ad545", 77.34, 78.65),
    _released(101, "512x1024", 80, "cityscapes", "20200607_013728-aceccc6e", 77.14, 78.81),
    _released(50, "769x769", 80, "cityscapes", "20200607_044426-cc7ff323", 78.88, 80.57),
    _released(101, "769x769", 80, "cityscapes", "20200607_013713-a9d4be8d", 78.80, 80.34),
    _released(50, "512x512", 80, "ade20k", "20200615_014818-26f75e11", 41.01, 42.30),
    _released(101, "512x512", 80, "ade20k", "20200615_014818-c0153543", 42.94, 44.18),
    _released(50, "512x512", 160, "ade20k", "20200615_231733-892247bc", 41.74, 42.62),
    _released(101, "512x512", 160, "ade20k", "20200615_231733-955eb1ec", 42.94, 44.06),
    _released(50, "512x512", 20, "voc12aug", "20200617_222246-dfcb1c62", 74.86, 76.13),
    _released(101, "512x512", 20, "voc12aug", "20200617_222246-2fad0042", 77.47, 78.70),
    _released(50, "512x512", 40, "voc12aug", "20200613_231314-b5dac322", 76.56, 77.51),
    _released(101, "512x512", 40, "voc12aug", "20200613_231314-bd205bbe", 76.70, 78.06),
)}


def imagenet_backbone(architecture: str) -> str:
    """The open-mmlab:// name of the ImageNet backbone an architecture (ann_r50_d8, ...) starts from."""
    depth = architecture.split("_")[1].lstrip("r")
    return f"{OPEN_MMLAB}resnet{depth}_v1c"


def url_of(name: str) -> str | None:
    """Download URL of a zoo name (released model, backbone, or open-mmlab://backbone); None for other names."""
    if name in RELEASED:
        return RELEASED[name].url
    return BACKBONES.get(name.removeprefix(OPEN_MMLAB))


def names() -> list[str]:
    return list(RELEASED) + [OPEN_MMLAB + name for name in BACKBONES]


def table() -> str:
    header = ("name", "dataset", "crop", "iterations", "mIoU", "ms+flip")
    rows = [(e.name, e.dataset, "x".join(map(str, e.crop_size)), str(e.iterations), f"{e.miou:.2f}",
             f"{e.miou_ms_flip:.2f}") for e in RELEASED.values()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    lines += ["", "ImageNet backbones (--pretrained):"]
    width = max(len(OPEN_MMLAB + name) for name in BACKBONES)
    lines += [f"{OPEN_MMLAB + name:<{width}}  {url}" for name, url in BACKBONES.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
