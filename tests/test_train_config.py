"""Recipe defaults and config resolution (train/config.py): recipe < --config FILE < command line."""

import json

import pytest
import torch

from annkernels.train.config import ConfigError, checkpoint_config, load_config_file, resolve_config, save_config
from annkernels.train.train import config_from_args, get_args_parser


@pytest.mark.parametrize("dataset, crop, iterations, batch, classes, root", [
    ("cityscapes", (512, 1024), 40000, 2, 19, "data/cityscapes"),
    ("ade20k", (512, 512), 80000, 4, 150, "data/ade/ADEChallengeData2016"),
    ("voc12aug", (512, 512), 20000, 4, 21, "data/VOCdevkit/VOC2012"),
])
def test_recipe_defaults(dataset, crop, iterations, batch, classes, root):
    config = resolve_config(dataset, {}, {})
    assert (config.crop_size, config.iterations, config.batch_size) == (crop, iterations, batch)
    assert (config.num_classes, config.data_root, config.model) == (classes, root, "ann_r50_d8")
    assert (config.lr, config.momentum, config.weight_decay) == (0.01, 0.9, 5e-4)
    assert (config.poly_power, config.min_lr, config.aux_weight) == (0.9, 1e-4, 0.4)
    assert config.eval_interval == config.ckpt_interval == iterations // 10
    assert config.work_dir == f"work_dirs/{dataset}_ann_r50_d8"


def test_command_line_beats_file_beats_recipe(tmp_path):
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"dataset": "ade20k", "lr": 0.02, "iterations": 100, "crop_size": [64, 48]}))
    args = get_args_parser().parse_args(["--config", str(config_file), "--iterations", "50"])
    config = config_from_args(args)
    assert config.dataset == "ade20k" and config.lr == 0.02 and config.iterations == 50
    assert config.crop_size == (64, 48) and config.eval_interval == 5
    assert config.weight_decay == 5e-4  # untouched recipe value


def test_saved_config_loads_back(tmp_path):
    config = resolve_config("voc12aug", {}, {"iterations": 30})
    save_config(config, tmp_path / "config.yaml")
    loaded = load_config_file(tmp_path / "config.yaml")
    dataset = loaded.pop("dataset")
    assert resolve_config(dataset, loaded, {}) == config


def test_bad_config_values_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config keys"):
        resolve_config("ade20k", {"learning_rate": 1}, {})
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config_file(tmp_path / "list.yaml")


def test_checkpoints_keep_the_config_as_a_plain_mapping_that_loads_back(tmp_path):
    """A checkpoint stores TrainConfig.as_dict(): the keys the dict config of earlier versions had, so their
    checkpoints and ours read the same way; eval/infer rebuild the same settings from it."""
    config = resolve_config("synthetic", {}, {"iterations": 7, "num_classes": 4, "scale": [48, 40]})
    saved = config.as_dict()
    assert isinstance(saved, dict) and saved["scale"] == (48, 40) and saved["num_classes"] == 4
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {}, "config": saved}, path)
    loaded, file = checkpoint_config(str(path), None, {})
    assert file == str(path)
    assert (loaded.dataset, loaded.model, loaded.num_classes, loaded.scale) == ("synthetic", "ann_r18_d8", 4, (48, 40))
    assert resolve_config("synthetic", {k: v for k, v in saved.items() if k != "dataset"}, {}) == config
    with pytest.raises(ConfigError, match=r"--num-classes 6 contradicts the checkpoint: .* holds ann_r18_d8 with 4"):
        checkpoint_config(str(path), None, {"num_classes": 6})
