"""hubconf.py through ``torch.hub.load(<repository>, <architecture>, source="local", ...)``: random weights,
local .pth and .safetensors files, another class count, an ImageNet backbone. Zoo names and URLs as
``pretrained``: tests/test_checkpoint_download.py."""

import importlib.util
from pathlib import Path

import pytest
import torch

from annkernels import models

REPO = Path(__file__).resolve().parents[1]


def hub_load(architecture, **kwargs):
    return torch.hub.load(str(REPO), architecture, source="local", **kwargs)


@pytest.fixture(scope="module")
def trained():
    model = models.build_segmentor("ann_r18_d8", 4)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif not name.endswith("num_batches_tracked"):
                tensor.copy_(torch.randn_like(tensor) * 0.1)
    return model.eval()


def test_one_entry_per_architecture():
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entries = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert entries - {"pretrained_segmentor"} == set(models.ARCHITECTURES)


def test_random_weights_need_a_class_count():
    model = hub_load("ann_r18_d8", num_classes=3)
    assert isinstance(model, models.ANNSegmentor) and model.num_classes == 3 and not model.training
    assert model(torch.randn(1, 3, 33, 40)).shape == (1, 3, 5, 5)
    with pytest.raises(ValueError, match="num_classes is needed with pretrained=None"):
        hub_load("ann_r18_d8")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_checkpoint_gives_the_same_logits(trained, tmp_path, suffix):
    path = tmp_path / f"ann{suffix}"
    if suffix == ".pth":
        torch.save({"model": trained.state_dict(), "config": {"dataset": "synthetic"}}, path)
    else:
        from annkernels.models.convert import to_safetensors

        pytest.importorskip("safetensors")
        to_safetensors(trained.state_dict(), path)
    model = hub_load("ann_r18_d8", pretrained=str(path))  # the class count comes from the checkpoint
    images = torch.randn(2, 3, 41, 29)
    with torch.no_grad():
        assert torch.equal(model(images), trained(images))


def test_another_class_count_reinitialises_the_classifiers(trained, tmp_path):
    path = tmp_path / "ann.pth"
    torch.save(trained.state_dict(), path)
    with pytest.warns(UserWarning, match="re-initialised auxiliary_head.conv_seg, decode_head.conv_seg"):
        model = hub_load("ann_r18_d8", pretrained=str(path), num_classes=7)
    assert model.decode_head.conv_seg.out_channels == 7
    assert torch.equal(model.backbone.stem[0].weight, trained.backbone.stem[0].weight)


def test_a_backbone_checkpoint_loads_the_backbone_only(trained, tmp_path):
    path = tmp_path / "resnet18_v1c.pth"
    backbone = {key: value for key, value in trained.backbone.state_dict().items()}
    torch.save({"state_dict": {**backbone, "fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}}, path)
    with pytest.raises(ValueError, match="num_classes is needed with the backbone-only checkpoint"):
        hub_load("ann_r18_d8", pretrained=str(path))
    model = hub_load("ann_r18_d8", pretrained=str(path), num_classes=2)
    assert all(torch.equal(value, backbone[key]) for key, value in model.backbone.state_dict().items())


def test_a_checkpoint_of_another_architecture_is_refused(trained, tmp_path):
    path = tmp_path / "ann_r18.pth"
    torch.save(trained.state_dict(), path)
    with pytest.raises(models.CheckpointError, match="does not fit the model"):
        hub_load("ann_r50_d8", pretrained=str(path))
