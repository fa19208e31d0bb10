"""Per-dataset recipe defaults (docs/ann-spec.md §2-3) and config resolution: recipe < --config FILE < command line."""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

from annkernels import models
from annkernels.models import zoo
from annkernels.models.zoo import imagenet_backbone
from annkernels.train.classes import CLASSES

# One row per dataset of the mmseg ANN recipe. scale is (W, H) as mmseg writes it; crop_size is (H, W).
RECIPES = {
    "cityscapes": dict(
        data_root="data/cityscapes", train_split="train", val_split="val", num_classes=19,
        scale=(2048, 1024), crop_size=(512, 1024), iterations=40000, batch_size=2, workers=2,
    ),
    "ade20k": dict(
        data_root="data/ade/ADEChallengeData2016", train_split="training", val_split="validation",
        num_classes=150, scale=(2048, 512), crop_size=(512, 512), iterations=80000, batch_size=4, workers=4,
    ),
    "voc12aug": dict(
        data_root="data/VOCdevkit/VOC2012", train_split="train", val_split="val", num_classes=21,
        scale=(2048, 512), crop_size=(512, 512), iterations=20000, batch_size=4, workers=4,
    ),
    # Small enough to train ann_r18_d8 to a clearly better-than-chance mIoU in a few CPU minutes, from scratch
    # and without network.
    "synthetic": dict(
        data_root=None, train_split="train", val_split="val", num_classes=len(CLASSES["synthetic"]),
        scale=(64, 64), crop_size=(64, 64), ratio_range=(0.75, 1.5), iterations=200, batch_size=8, workers=1,
        model="ann_r18_d8", pretrained=None, lr=0.04, eval_at_start=True, eval_interval=100, ckpt_interval=200,
        synthetic_size=64, synthetic_train_length=4000, synthetic_val_length=48,
    ),
}

# Settings shared by every recipe; a recipe row overrides them.
COMMON = dict(
    model="ann_r50_d8",
    ratio_range=(0.5, 2.0),
    cat_max_ratio=0.75,
    photometric=True,
    lr=0.01,
    momentum=0.9,
    weight_decay=5e-4,
    poly_power=0.9,
    min_lr=1e-4,
    aux_weight=0.4,
    avg_non_ignore=False,
    align_corners=False,
    dropout=0.1,
    eval_interval=None,  # None: iterations // 10
    ckpt_interval=None,  # None: iterations // 10
    eval_at_start=False,
    eval_mode="whole",
    eval_crop_size=None,  # slide window (H, W); None: the training crop
    eval_stride=None,  # slide stride (H, W); None: two thirds of the window
    log_interval=10,
    seed=0,
    amp="off",
    channels_last=False,
    compile=False,
    backend=None,
    sync_bn=True,
    pretrained="imagenet",  # the ImageNet ResNet-V1c of the model's depth, as mmseg's configs start from
    num_preview=4,
    synthetic_size=64,
    synthetic_train_length=2000,
    synthetic_val_length=64,
    cpu_threads=None,
)

TUPLE_KEYS = ("scale", "crop_size", "ratio_range", "eval_crop_size", "eval_stride")


class ConfigError(ValueError):
    """A config file or option that cannot be used."""


def load_config_file(path) -> dict:
    """A YAML or JSON mapping of config keys (the same names as the resolved config.yaml a run writes)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot parse config file {path}: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class TrainConfig:
    """One run's settings: the recipe of its dataset, then --config FILE, then the command line (resolve_config).
    Checkpoints and config.yaml hold it as a plain mapping of these field names (`as_dict`)."""

    dataset: str
    data_root: str | None
    train_split: str
    val_split: str
    num_classes: int
    model: str
    pretrained: str | None  # ImageNet backbone: file, URL or open-mmlab:// name
    iterations: int
    batch_size: int  # per process
    workers: int
    lr: float
    momentum: float
    weight_decay: float
    poly_power: float
    min_lr: float
    aux_weight: float
    avg_non_ignore: bool
    dropout: float
    scale: tuple[int, int]  # (W, H), as mmseg writes it
    crop_size: tuple[int, int]  # (H, W)
    ratio_range: tuple[float, float]
    cat_max_ratio: float
    photometric: bool
    align_corners: bool
    eval_interval: int
    ckpt_interval: int
    log_interval: int
    eval_at_start: bool
    eval_mode: str
    eval_crop_size: tuple[int, int] | None
    eval_stride: tuple[int, int] | None
    seed: int
    amp: str
    channels_last: bool
    compile: bool
    backend: str | None
    sync_bn: bool
    num_preview: int
    synthetic_size: int
    synthetic_train_length: int
    synthetic_val_length: int
    cpu_threads: int | None
    work_dir: str
    resume: str | None = None
    test_only: bool | None = None
    device: str | None = None
    progress: bool | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def class_names(self) -> list[str]:
        """The dataset's class names, or the class ids when the class count differs from the dataset's."""
        names = CLASSES.get(self.dataset)
        if names is None or len(names) != self.num_classes:
            return [str(i) for i in range(self.num_classes)]
        return names

    def segmentor(self, norm_layer=nn.BatchNorm2d) -> nn.Module:
        """The ANN segmentor these settings describe (untrained)."""
        return models.build_segmentor(self.model, self.num_classes, norm_layer=norm_layer,
                                      align_corners=self.align_corners, dropout=self.dropout, backend=self.backend)


KEYS = {field.name for field in dataclasses.fields(TrainConfig)}


def resolve_config(dataset: str, file_values: dict, cli_values: dict) -> TrainConfig:
    """Merge recipe defaults, config-file values and explicitly given command-line values (None = not given)."""
    if dataset not in RECIPES:
        raise ConfigError(f"unknown dataset {dataset!r}; choose from {sorted(RECIPES)}")
    unknown = sorted(set(file_values) - KEYS)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(KEYS)}")
    values = dict(COMMON)
    values.update(RECIPES[dataset])
    values.update(file_values)
    values.update({key: value for key, value in cli_values.items() if value is not None})
    values["dataset"] = dataset
    for key in TUPLE_KEYS:
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    for key in ("eval_interval", "ckpt_interval"):
        if not values.get(key):
            values[key] = max(values["iterations"] // 10, 1)
    if values["pretrained"] == "imagenet":
        values["pretrained"] = imagenet_backbone(values["model"])
    elif values["pretrained"] in ("none", ""):
        values["pretrained"] = None
    if values.get("work_dir") is None:
        values["work_dir"] = f"work_dirs/{dataset}_{values['model']}"
    return TrainConfig(**values)


def save_config(config: TrainConfig, path) -> None:
    """Writes the resolved config as YAML (tuples as lists), loadable again with --config."""
    plain = {key: list(value) if isinstance(value, tuple) else value for key, value in config.as_dict().items()}
    Path(path).write_text(yaml.safe_dump(plain, sort_keys=True))


def recipe_default(key: str) -> str:
    """A help string's "default: ..." for `key`, read from the recipes: one value, or the datasets sharing each
    value ("cityscapes/ade20k/voc12aug 0.01, synthetic 0.04"). synthetic_* keys are the synthetic recipe's."""
    datasets = ["synthetic"] if key.startswith("synthetic_") else list(RECIPES)
    by_value: dict[str, list[str]] = {}
    for dataset in datasets:
        by_value.setdefault(_plain(getattr(resolve_config(dataset, {}, {}), key)), []).append(dataset)
    if len(by_value) == 1:
        return f"default: {next(iter(by_value))}"
    return "default: " + ", ".join(f"{'/'.join(names)} {value}" for value, names in by_value.items())


def _plain(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


# Settings of a checkpoint to evaluate or run (eval.py, infer.py)

# Taken from one of our checkpoints' saved config when the command line leaves them out.
MODEL_KEYS = ("model", "num_classes", "align_corners", "scale", "synthetic_size", "seed", "synthetic_val_length")


def read_saved_config(checkpoint_path) -> dict:
    """The saved config of one of our checkpoints; {} for anything else (mmseg checkpoints, bare state dicts)."""
    checkpoint = models.read_checkpoint(checkpoint_path)
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    return config if isinstance(config, dict) else {}


def checkpoint_config(source, dataset, cli_values: dict):
    """(config, local file) of a checkpoint source (path, URL or zoo name; downloaded if need be).

    The config is the recipe of `dataset` (default: the checkpoint's own, else synthetic), then the checkpoint's
    settings, then the command line's values (None = not given). One of our checkpoints always gives its
    architecture and class count: an option or dataset contradicting them is a ConfigError saying so. Its other
    model and test settings apply when it was trained on `dataset`; for a released mmseg model, the zoo's test
    settings apply on its own dataset.
    """
    path = models.checkpoint_file(source)
    saved = read_saved_config(path)
    released = zoo.RELEASED.get(str(source))
    dataset = dataset or saved.get("dataset") or (released.dataset if released else "synthetic")
    if saved:
        recorded = {key: saved[key] for key in ("model", "num_classes") if key in saved}
        trained = f"{path} holds {saved.get('model')} with {saved.get('num_classes')} classes, trained on " \
                  f"{saved.get('dataset')}"
        for key, value in recorded.items():
            if cli_values.get(key) is not None and cli_values[key] != value:
                raise ConfigError(f"--{key.replace('_', '-')} {cli_values[key]} contradicts the checkpoint: {trained}")
        classes = resolve_config(dataset, {}, {}).num_classes
        if saved.get("dataset") != dataset and classes != recorded.get("num_classes"):
            raise ConfigError(f"--dataset {dataset} has {classes} classes: {trained}")
        inherited = {k: saved[k] for k in MODEL_KEYS if k in saved} if saved.get("dataset") == dataset else recorded
    elif released is not None and released.dataset == dataset:
        inherited = released.test_settings()
    else:
        inherited = {}
    return resolve_config(dataset, inherited, cli_values), path
