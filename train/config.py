"""Per-dataset recipe defaults (docs/ann-spec.md §2-3) and config resolution: recipe < --config FILE < command line."""

import json
from pathlib import Path

import yaml

from models.zoo import imagenet_backbone
from train.classes import CLASSES

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


def resolve_config(dataset: str, file_values: dict, cli_values: dict) -> dict:
    """Merge recipe defaults, config-file values and explicitly given command-line values (None = not given)."""
    if dataset not in RECIPES:
        raise ConfigError(f"unknown dataset {dataset!r}; choose from {sorted(RECIPES)}")
    config = dict(COMMON)
    config.update(RECIPES[dataset])
    known = set(config) | {"dataset", "work_dir", "resume", "test_only", "device", "progress"}
    unknown = sorted(set(file_values) - known)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
    config.update(file_values)
    config.update({key: value for key, value in cli_values.items() if value is not None})
    config["dataset"] = dataset
    for key in TUPLE_KEYS:
        if config.get(key) is not None:
            config[key] = tuple(config[key])
    iterations = config["iterations"]
    for key in ("eval_interval", "ckpt_interval"):
        if not config.get(key):
            config[key] = max(iterations // 10, 1)
    if config["pretrained"] == "imagenet":
        config["pretrained"] = imagenet_backbone(config["model"])
    elif config["pretrained"] in ("none", ""):
        config["pretrained"] = None
    if config.get("work_dir") is None:
        config["work_dir"] = f"work_dirs/{dataset}_{config['model']}"
    return config


def save_config(config: dict, path) -> None:
    """Writes the resolved config as YAML (tuples as lists), loadable again with --config."""
    plain = {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}
    Path(path).write_text(yaml.safe_dump(plain, sort_keys=True))


def recipe_default(key: str) -> str:
    """A help string's "default: ..." for `key`, read from the recipes: one value, or the datasets sharing each
    value ("cityscapes/ade20k/voc12aug 0.01, synthetic 0.04"). synthetic_* keys are the synthetic recipe's."""
    datasets = ["synthetic"] if key.startswith("synthetic_") else list(RECIPES)
    by_value: dict[str, list[str]] = {}
    for dataset in datasets:
        by_value.setdefault(_plain(resolve_config(dataset, {}, {})[key]), []).append(dataset)
    if len(by_value) == 1:
        return f"default: {next(iter(by_value))}"
    return "default: " + ", ".join(f"{'/'.join(names)} {value}" for value, names in by_value.items())


def _plain(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)
