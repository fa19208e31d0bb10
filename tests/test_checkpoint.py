"""models.load_checkpoint / load_pretrained_backbone on checkpoints laid out as mmseg, ImageNet backbones and
our trainer store them, checked against an independent functional forward written from docs/ann-spec.md §1.

The mmseg-format checkpoints are generated here: random tensors under the R-50-D8 ADE20K key names and
shapes (taken from a meta-device model, which test_model.py checks against the spec), with APNB's shared
key/query projection stored under both names, wrapped in {"state_dict", "meta"}.
"""

import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from annkernels import models
from annkernels.models.checkpoint import CheckpointError

from conftest import assert_close

SCALES = (1, 3, 6, 8)
KEY_CHANNELS = 256


def _random_state_dict(name, num_classes, seed=0):
    """Random values for every key of `name`; tensors aliased in the model are aliased here too."""
    with torch.device("meta"):
        model = models.build_segmentor(name, num_classes)
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            value = torch.tensor(1000)
        elif key.endswith("running_var"):
            value = torch.rand(tensor.shape, generator=generator) + 0.5
        else:  # weights at ~1/sqrt(fan_in), so activations neither vanish nor explode through 100 layers
            fan_in = tensor[0].numel() if tensor.dim() > 1 else 1
            value = torch.randn(tensor.shape, generator=generator) / fan_in**0.5
        state_dict[key] = value
    for key in list(state_dict):
        if ".context.stages.0.query_project." in key:
            state_dict[key] = state_dict[key.replace("query_project", "key_project")]
    return state_dict


def _mmseg_checkpoint(state_dict):
    # As mmseg 0.x's save_checkpoint writes it (meta holds plain Python objects; classes are illustrative).
    return {"state_dict": dict(state_dict),
            "meta": {"mmseg_version": "0.5.0+b2724da", "CLASSES": ("wall", "building", "sky"), "iter": 80000}}


@pytest.fixture(scope="module")
def r50_state_dict():
    return _random_state_dict("ann_r50_d8", 150)


@pytest.fixture(scope="module")
def r50_model(r50_state_dict, tmp_path_factory):
    """A real R-50 model loaded from an mmseg-format checkpoint file."""
    path = tmp_path_factory.mktemp("ckpt") / "ann_r50-d8_ade20k.pth"
    torch.save(_mmseg_checkpoint(r50_state_dict), path)
    model = models.build_segmentor("ann_r50_d8", 150).eval()
    result = models.load_checkpoint(model, path)
    assert result == models.LoadResult([], [], [])
    return model


# ---------------------------------------------------------------- independent functional forward (docs/ann-spec.md §1)

def _bn(x, sd, prefix):
    return F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"],
                        sd[f"{prefix}.bias"], training=False, eps=1e-5)


def _conv_bn(x, sd, prefix, relu=True, padding=0):
    x = _bn(F.conv2d(x, sd[f"{prefix}.conv.weight"], padding=padding), sd, f"{prefix}.bn")
    return F.relu(x) if relu else x


def _pool(x):
    return torch.cat([F.adaptive_avg_pool2d(x, s).flatten(2) for s in SCALES], 2)  # [B, C, 110]


def _attention(sd, prefix, query_source, key_source):
    """mmseg SelfAttentionBlock: query from query_source at every position; key/value pooled from key_source."""
    batch, _, height, width = query_source.shape
    query = _conv_bn(query_source, sd, f"{prefix}.query_project").flatten(2).transpose(1, 2)  # [B, L, 256]
    key = _pool(_conv_bn(key_source, sd, f"{prefix}.key_project"))  # [B, 256, 110]
    value = _pool(F.conv2d(key_source, sd[f"{prefix}.value_project.weight"], sd[f"{prefix}.value_project.bias"]))
    attention = torch.softmax(torch.matmul(query, key) * KEY_CHANNELS**-0.5, dim=-1)  # [B, L, 110]
    context = torch.matmul(attention, value.transpose(1, 2)).transpose(1, 2).reshape(batch, -1, height, width)
    return F.conv2d(context, sd[f"{prefix}.out_project.weight"], sd[f"{prefix}.out_project.bias"])


def _decode_head(sd, c3, c4):
    """docs/ann-spec.md §1.1 table in eval mode (Dropout2d is the identity)."""
    p = "decode_head"
    context = _attention(sd, f"{p}.fusion.stages.0", query_source=c4, key_source=c3)
    x = _conv_bn(torch.cat([context, c4], 1), sd, f"{p}.fusion.bottleneck", relu=False)
    x = _conv_bn(x, sd, f"{p}.bottleneck", padding=1)
    context = _attention(sd, f"{p}.context.stages.0", query_source=x, key_source=x)
    x = _conv_bn(torch.cat([context, x], 1), sd, f"{p}.context.bottleneck")
    return F.conv2d(x, sd[f"{p}.conv_seg.weight"], sd[f"{p}.conv_seg.bias"])


def _auxiliary_head(sd, c3):
    x = _conv_bn(c3, sd, "auxiliary_head.convs.0", padding=1)
    return F.conv2d(x, sd["auxiliary_head.conv_seg.weight"], sd["auxiliary_head.conv_seg.bias"])


def _backbone_r50(sd, images):
    """ResNet-V1c-50-D8 per docs/ann-spec.md §1: deep stem, stride on the 3x3 conv, strides (1,2,1,1), dilations
    (1,1,2,4) with the first block of a dilated stage at half the dilation."""
    x = images
    for index in (0, 3, 6):
        x = F.conv2d(x, sd[f"backbone.stem.{index}.weight"], stride=2 if index == 0 else 1, padding=1)
        x = F.relu(_bn(x, sd, f"backbone.stem.{index + 1}"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    features = []
    for layer, (blocks, stride, dilation) in enumerate(zip((3, 4, 6, 3), (1, 2, 1, 1), (1, 1, 2, 4), strict=True), 1):
        for block in range(blocks):
            p = f"backbone.layer{layer}.{block}"
            block_stride = stride if block == 0 else 1
            block_dilation = max(dilation // 2, 1) if block == 0 else dilation
            identity = x
            if block == 0:
                identity = _bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=block_stride), sd,
                               f"{p}.downsample.1")
            out = F.relu(_bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
            out = F.conv2d(out, sd[f"{p}.conv2.weight"], stride=block_stride, padding=block_dilation,
                           dilation=block_dilation)
            out = F.relu(_bn(out, sd, f"{p}.bn2"))
            out = _bn(F.conv2d(out, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
            x = F.relu(out + identity)
        features.append(x)
    return features


# ---------------------------------------------------------------- mmseg checkpoints

def test_mmseg_checkpoint_head_matches_functional_forward(r50_model, r50_state_dict):
    # Features with realistic, distinct statistics; a 5 x 7 map pools into all 110 bins (some overlapping).
    c3 = torch.randn(2, 1024, 5, 7).relu()
    c4 = torch.randn(2, 2048, 5, 7).relu() * 0.5
    with torch.no_grad():
        expected = _decode_head(r50_state_dict, c3, c4)
        assert_close(r50_model.decode_head(c3, c4), expected, 1e-4, 1e-4, "decode_head")
        assert_close(r50_model.auxiliary_head(c3), _auxiliary_head(r50_state_dict, c3), 1e-4, 1e-4,
                     "auxiliary_head")
        # The attention path must matter, or the comparison above could not see a wiring mistake in it.
        swapped = _decode_head(r50_state_dict, c3, c4 * 1.5) - expected
    assert swapped.abs().max() > 1e-2


def test_mmseg_checkpoint_whole_model_matches_functional_forward(r50_model, r50_state_dict):
    images = torch.randn(1, 3, 33, 41)
    with torch.no_grad():
        c1, c2, c3, c4 = _backbone_r50(r50_state_dict, images)
        expected = _decode_head(r50_state_dict, c3, c4)
        actual = r50_model(images)
    assert actual.shape == (1, 150, 5, 6)
    scale = expected.abs().max().item()
    assert_close(actual, expected, 1e-4 * scale, 1e-4, "logits")


def test_loaded_tensors_equal_checkpoint(r50_model, r50_state_dict):
    loaded = r50_model.state_dict()
    assert loaded.keys() == r50_state_dict.keys()
    for key, value in r50_state_dict.items():
        assert torch.equal(loaded[key], value), key


def test_shared_projection_may_be_stored_once(r50_state_dict):
    model = models.build_segmentor("ann_r18_d8", 5)
    state_dict = {key: value.clone() for key, value in model.state_dict().items()}
    alias = [key for key in state_dict if ".context.stages.0.query_project." in key]
    assert len(alias) == 6  # conv.weight + BN(5)
    with torch.no_grad():
        model.decode_head.context.stages[0].key_project.conv.weight.zero_()
    models.load_checkpoint(model, {key: value for key, value in state_dict.items() if key not in alias})
    assert torch.equal(model.decode_head.context.stages[0].query_project.conv.weight,
                       state_dict["decode_head.context.stages.0.key_project.conv.weight"])


def test_shared_projection_stored_with_different_values_is_refused():
    model = models.build_segmentor("ann_r18_d8", 5)
    state_dict = {key: value.clone() for key, value in model.state_dict().items()}
    state_dict["decode_head.context.stages.0.query_project.conv.weight"] += 1
    with pytest.raises(CheckpointError, match="shared tensor"):
        models.load_checkpoint(model, state_dict)


# ---------------------------------------------------------------- our checkpoints, round trips

def _r18_with_random_weights(num_classes=5, seed=0):
    model = models.build_segmentor("ann_r18_d8", num_classes).eval()
    model.load_state_dict(_random_state_dict("ann_r18_d8", num_classes, seed))
    return model


def test_training_checkpoint_round_trip(tmp_path):
    source = _r18_with_random_weights(seed=1)
    path = tmp_path / "latest.pth"
    # What a DDP trainer saves: model_without_ddp would have no prefix; a wrapped model has "module.".
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()},
                "optimizer": {"state": {}, "param_groups": []}, "iteration": 12, "args": {"lr": 0.01}}, path)
    target = _r18_with_random_weights(seed=2)
    models.load_checkpoint(target, path)
    images = torch.randn(2, 3, 19, 26)
    with torch.no_grad():
        assert_close(target(images), source(images), 0, 0, "logits after round trip")


def test_compiled_model_state_dict_round_trip():
    source = _r18_with_random_weights(seed=1)
    compiled = torch.compile(source)  # state_dict keys gain "_orig_mod."; nothing is compiled here
    target = _r18_with_random_weights(seed=2)
    models.load_checkpoint(torch.compile(target), compiled.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


# ---------------------------------------------------------------- class-count mismatch, missing keys

def test_wrong_class_count_strict_load_fails_listing_conv_seg():
    checkpoint = _mmseg_checkpoint(_random_state_dict("ann_r18_d8", 19))
    model = models.build_segmentor("ann_r18_d8", 21)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        models.load_checkpoint(model, checkpoint)
    message = str(error.value)
    assert "decode_head.conv_seg.weight (checkpoint (19, 128, 1, 1), model (21, 128, 1, 1))" in message
    assert "auxiliary_head.conv_seg.bias" in message and "num_classes_mismatch='reinit'" in message
    for key, value in model.state_dict().items():  # refused before anything was copied
        assert torch.equal(value, before[key]), key


def test_wrong_class_count_reinit():
    state_dict = _random_state_dict("ann_r18_d8", 19)
    model = models.build_segmentor("ann_r18_d8", 21)
    with torch.no_grad():
        model.decode_head.conv_seg.bias.fill_(3.0)
    with pytest.warns(UserWarning, match="re-initialised auxiliary_head.conv_seg, decode_head.conv_seg"):
        result = models.load_checkpoint(model, _mmseg_checkpoint(state_dict), num_classes_mismatch="reinit")
    assert result.reinitialized == ["auxiliary_head.conv_seg", "decode_head.conv_seg"]
    assert not model.decode_head.conv_seg.bias.any()
    assert 0.005 < model.decode_head.conv_seg.weight.std().item() < 0.015
    loaded = model.state_dict()
    for key, value in state_dict.items():
        if "conv_seg" not in key:
            assert torch.equal(loaded[key], value), key


def test_missing_and_unexpected_keys():
    model = models.build_segmentor("ann_r18_d8", 5)
    state_dict = _random_state_dict("ann_r18_d8", 5)
    del state_dict["decode_head.bottleneck.conv.weight"]
    state_dict["decode_head.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 missing keys \[decode_head.bottleneck.conv.weight\], "
                                              r"1 unexpected keys \[decode_head.extra.weight\]"):
        models.load_checkpoint(model, state_dict)
    with pytest.warns(UserWarning, match="non-strict load"):
        result = models.load_checkpoint(model, state_dict, strict=False)
    assert result.missing_keys == ["decode_head.bottleneck.conv.weight"]
    assert result.unexpected_keys == ["decode_head.extra.weight"]
    assert torch.equal(model.decode_head.conv_seg.weight, state_dict["decode_head.conv_seg.weight"])


def test_bad_mode_and_non_state_dict():
    model = models.build_segmentor("ann_r18_d8", 5)
    with pytest.raises(ValueError, match="num_classes_mismatch"):
        models.load_checkpoint(model, {}, num_classes_mismatch="ignore")
    with pytest.raises(CheckpointError, match="no state_dict found"):
        models.load_checkpoint(model, {"meta": {"iter": 3}})


# ---------------------------------------------------------------- files

def test_corrupt_files_name_the_file(tmp_path):
    model = models.build_segmentor("ann_r18_d8", 5)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x80\x02not a checkpoint at all" * 10)
    truncated = tmp_path / "truncated.pth"
    torch.save(model.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    for path in (garbage, truncated):
        with pytest.raises(CheckpointError, match=f"cannot read checkpoint file {path}"):
            models.load_checkpoint(model, path)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        models.load_checkpoint(model, tmp_path / "nowhere.pth")


class _TrainerState:  # stands for e.g. mmengine's HistoryBuffer in a 1.x checkpoint's message_hub
    def __init__(self):
        self.history = [1.0, 2.0]


def test_metadata_objects_are_not_executed(tmp_path):
    state_dict = _random_state_dict("ann_r18_d8", 5)
    checkpoint = _mmseg_checkpoint(state_dict)
    checkpoint["meta"].update(seed=np.int64(7), hist=np.zeros(3), hub=_TrainerState())
    for legacy in (False, True):  # zip format, and the pre-1.6 format the mmseg v0.5 release used
        path = tmp_path / f"meta_{legacy}.pth"
        torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)  # what we must get past without weights_only=False
        with pytest.warns(UserWarning, match="_TrainerState") as record:
            loaded = models.read_checkpoint(path)
        assert "numpy" in str(record[0].message)
        assert isinstance(loaded["meta"]["hub"], models.checkpoint.UnloadedObject)
        model = models.build_segmentor("ann_r18_d8", 5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models.load_checkpoint(model, path)
        assert torch.equal(model.decode_head.conv_seg.weight, state_dict["decode_head.conv_seg.weight"])


# ---------------------------------------------------------------- ImageNet backbone checkpoints

def _imagenet_checkpoint(seed=3):
    state_dict = {key[len("backbone."):]: value for key, value in _random_state_dict("ann_r18_d8", 5, seed).items()
                  if key.startswith("backbone.")}
    state_dict["fc.weight"], state_dict["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    return state_dict


def test_pretrained_backbone_loads_and_ignores_fc(tmp_path):
    backbone_weights = _imagenet_checkpoint()
    path = tmp_path / "resnet18_v1c.pth"
    torch.save({"state_dict": backbone_weights, "meta": {}}, path)
    model = models.build_segmentor("ann_r18_d8", 5)
    head_before = {key: value.clone() for key, value in model.decode_head.state_dict().items()}
    result = models.load_pretrained_backbone(model, path)
    assert result.unexpected_keys == ["fc.weight", "fc.bias"]
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone_weights[key]), key
    for key, value in model.decode_head.state_dict().items():
        assert torch.equal(value, head_before[key]), key
    # The same file given to load_checkpoint is refused with a pointer to the right function.
    with pytest.raises(CheckpointError, match="load_pretrained_backbone"):
        models.load_checkpoint(model, path)


def test_pretrained_backbone_must_be_complete():
    weights = _imagenet_checkpoint()
    del weights["layer4.1.bn2.running_var"]
    with pytest.raises(CheckpointError, match=r"1 missing keys \[layer4.1.bn2.running_var\]"):
        models.load_pretrained_backbone(models.build_segmentor("ann_r18_d8", 5), weights)
    with pytest.raises(CheckpointError, match=r"shape mismatch for \[stem.0.weight"):
        models.load_pretrained_backbone(models.build_segmentor("ann_r18_d8", 5, variant="authors"),
                                        _imagenet_checkpoint())
