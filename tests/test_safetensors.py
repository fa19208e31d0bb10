"""safetensors weights: load_checkpoint reads them (with the training config from their metadata) and
``python -m annkernels.models.convert`` writes them from our checkpoints and mmseg's. URL and zoo sources ending
in .safetensors: tests/test_checkpoint_download.py."""

import subprocess
import sys

import pytest
import torch

from annkernels import models
from annkernels.models.checkpoint import CheckpointError
from annkernels.models.convert import main as convert_main
from annkernels.models.convert import to_safetensors

safetensors_torch = pytest.importorskip("safetensors.torch")

CONFIG = {"dataset": "synthetic", "model": "ann_r18_d8", "num_classes": 3, "crop_size": [64, 64]}


@pytest.fixture(scope="module")
def trained():
    """An eval-mode ann_r18_d8 with random weights and BatchNorm statistics."""
    model = models.build_segmentor("ann_r18_d8", 3)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif not name.endswith("num_batches_tracked"):
                tensor.copy_(torch.randn_like(tensor) * 0.1)
    return model.eval()


def logits(model, images):
    with torch.no_grad():
        return model.eval()(images)


def test_round_trip_from_our_checkpoint_gives_identical_logits(trained, tmp_path):
    source = tmp_path / "iter_100.pth"
    torch.save({"model": trained.state_dict(), "optimizer": {}, "iteration": 100, "config": CONFIG}, source)
    destination = tmp_path / "ann.safetensors"

    assert convert_main([str(source), str(destination)]) == 0

    loaded = models.build_segmentor("ann_r18_d8", 3)
    assert models.load_checkpoint(loaded, destination) == models.LoadResult([], [], [])
    images = torch.randn(2, 3, 45, 61)
    assert torch.equal(logits(loaded, images), logits(trained, images))
    assert models.read_checkpoint(destination)["config"] == CONFIG
    stored = safetensors_torch.load_file(destination)
    # APNB's shared key/query projection is stored once, under one of its names.
    assert len(stored) < len(trained.state_dict())
    assert not any(key.startswith("decode_head.context.stages.0.query_project") for key in stored)


def test_round_trip_from_an_mmseg_checkpoint(trained, tmp_path):
    source = tmp_path / "ann_mmseg.pth"
    state_dict = {key: value.clone() for key, value in trained.state_dict().items()}  # two stored aliases
    torch.save({"meta": {"mmseg_version": "0.5.0"}, "state_dict": state_dict}, source)
    destination = to_safetensors(source, tmp_path / "ann_mmseg.safetensors")

    assert "config" not in models.read_checkpoint(destination)
    loaded = models.build_segmentor("ann_r18_d8", 3)
    models.load_checkpoint(loaded, destination)
    images = torch.randn(1, 3, 33, 33)
    assert torch.equal(logits(loaded, images), logits(trained, images))


def test_command_line_from_another_directory(trained, tmp_path):
    source = tmp_path / "weights.pth"
    torch.save(trained.state_dict(), source)
    result = subprocess.run([sys.executable, "-m", "annkernels.models.convert", str(source), "w.safetensors"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "w.safetensors").is_file() and "wrote w.safetensors" in result.stdout


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_file_raises_naming_it(trained, tmp_path, damage):
    good = to_safetensors(trained.state_dict(), tmp_path / "good.safetensors")
    data = open(good, "rb").read()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64)
    with pytest.raises(CheckpointError, match=f"cannot read safetensors file {bad}"):
        models.load_checkpoint(models.build_segmentor("ann_r18_d8", 3), bad)


def test_config_metadata_that_is_not_json_raises(tmp_path):
    path = tmp_path / "odd.safetensors"
    safetensors_torch.save_file({"x": torch.zeros(1)}, path, metadata={"config": "{not json"})
    with pytest.raises(CheckpointError, match=f"{path}: its metadata entry 'config' is not JSON"):
        models.read_checkpoint(path)


def test_convert_refuses_another_suffix_and_unwritable_config(trained, tmp_path, capsys):
    assert convert_main([str(tmp_path / "missing.pth"), str(tmp_path / "out.safetensors")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"must end in \.safetensors"):
        to_safetensors(trained.state_dict(), tmp_path / "out.bin")
    with pytest.raises(CheckpointError, match="config cannot be written as JSON"):
        to_safetensors({"model": trained.state_dict(), "config": {"path": object()}},
                       tmp_path / "out.safetensors")
