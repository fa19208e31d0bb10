"""models.optimize_for_inference: folded BatchNorm, channels_last and inductor give the unoptimised logits."""

import copy

import pytest
import torch
from conftest import assert_close
from torch.nn.modules.batchnorm import _BatchNorm

import models
from models.optimize import fold_batchnorms


def _randomised(name="ann_r18_d8", num_classes=5, **options):
    """Random weights and BN statistics, so that a fold that ignored the statistics would show."""
    model = models.build_segmentor(name, num_classes, **options)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("num_batches_tracked"):
                continue
            if key.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            else:
                tensor.copy_(torch.randn_like(tensor) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return _randomised()


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
def test_folded_model_gives_the_same_logits(r18, channels_last):
    fast = models.optimize_for_inference(r18, channels_last=channels_last, compile=False)
    assert not any(isinstance(module, _BatchNorm) for module in fast.modules())
    assert all(not parameter.requires_grad for parameter in fast.parameters())
    images = torch.randn(2, 3, 37, 29)
    with torch.no_grad():
        expected = r18(images)
        expected_full = r18.predict(images)
    actual = fast(images)
    assert actual.requires_grad is False
    assert_close(actual, expected, 1e-4, 1e-4, "logits")
    assert_close(fast.predict(images), expected_full, 1e-4, 1e-4, "predict")
    if channels_last:
        first_conv = fast.network.backbone.stem[0]
        assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_original_model_is_left_alone(r18):
    model = copy.deepcopy(r18).train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    models.optimize_for_inference(model, compile=False)
    assert model.training
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert isinstance(model.backbone.stem[1], _BatchNorm)


def test_authors_variant_folds_into_biased_convs():
    torch.manual_seed(1)
    model = _randomised(variant="authors")
    assert model.decode_head.bottleneck.conv.bias is not None
    fast = models.optimize_for_inference(model, compile=False)
    images = torch.randn(1, 3, 41, 33)
    with torch.no_grad():
        assert_close(fast(images), model(images), 1e-4, 1e-4, "authors-variant logits")


def test_mmseg_checkpoint_loads_before_optimisation(r18, tmp_path):
    path = tmp_path / "ann_r18.pth"
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": r18.state_dict()}, path)
    model = models.build_segmentor("ann_r18_d8", 5)
    models.load_checkpoint(model, path)
    fast = models.optimize_for_inference(model.eval(), compile=False)
    images = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        assert_close(fast(images), r18(images), 1e-4, 1e-4, "logits after checkpoint load")


def test_bad_uses_are_rejected(r18):
    with pytest.raises(TypeError, match="ANNSegmentor"):
        models.optimize_for_inference(torch.nn.Conv2d(3, 3, 1), compile=False)
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorms(copy.deepcopy(r18).train())
    unfoldable = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.BatchNorm2d(3)).eval()
    with pytest.raises(ValueError, match="do not follow a conv: 1"):
        fold_batchnorms(unfoldable)
    fast = models.optimize_for_inference(r18, compile=False)
    with pytest.raises(RuntimeError, match="cannot train"):
        fast.train()


@pytest.mark.slow
def test_compiled_fast_path_gives_the_same_logits(r18):
    notices = []
    fast = models.optimize_for_inference(r18, log=notices.append)
    images = torch.randn(1, 3, 33, 35)
    with torch.no_grad():
        expected = r18(images)
    assert_close(fast(images), expected, 1e-4, 1e-4, "compiled logits")
    assert_close(fast(images), expected, 1e-4, 1e-4, "compiled logits, second call")
    assert len(notices) == 1 and "compiles" in notices[0]
