"""Segmentors with their weights in one call: what hubconf.py's entries (``torch.hub.load``) run."""

from __future__ import annotations

import os

from torch import nn

from . import zoo
from .ann import build_segmentor
from .checkpoint import checkpoint_file, extract_state_dict, load_checkpoint, load_pretrained_backbone, read_checkpoint

CLASSIFIER_WEIGHT = "decode_head.conv_seg.weight"


def pretrained_segmentor(architecture: str, pretrained=None, num_classes: int | None = None,
                         **options) -> nn.Module:
    """``build_segmentor(architecture, num_classes, **options)`` with weights from ``pretrained``, in eval mode.

    Args:
        architecture: "ann_r18_d8", "ann_r50_d8" or "ann_r101_d8".
        pretrained: None (random weights), or any source of ``load_checkpoint``: a zoo name
            (``python -m annkernels.models.zoo``), an http(s) URL, a path (``.pth`` or ``.safetensors``) or a
            loaded checkpoint. A backbone-only checkpoint (``open-mmlab://resnet50_v1c``, ...) loads into the
            backbone and leaves the heads random.
        num_classes: the classifier width. None takes the checkpoint's; required without a whole-model
            checkpoint. A count other than the checkpoint's re-initialises the classifiers (for fine-tuning).
        options: build_segmentor's (align_corners, backend, ...). A released zoo model's test settings
            (align_corners for the 769x769 Cityscapes ones) apply unless given here.
    """
    if pretrained is None:
        return _build(architecture, num_classes, options, "pretrained=None").eval()
    name = os.fspath(pretrained) if isinstance(pretrained, (str, os.PathLike)) else "checkpoint"
    checkpoint = read_checkpoint(checkpoint_file(pretrained)) if isinstance(pretrained, (str, os.PathLike)) \
        else pretrained
    state_dict = extract_state_dict(checkpoint, name)
    if CLASSIFIER_WEIGHT not in state_dict:  # an ImageNet backbone
        model = _build(architecture, num_classes, options, f"the backbone-only checkpoint {name}")
        load_pretrained_backbone(model, state_dict)
        return model.eval()
    released = zoo.RELEASED.get(name)
    if released is not None and "align_corners" in released.test_settings():
        options.setdefault("align_corners", released.test_settings()["align_corners"])
    trained_classes = state_dict[CLASSIFIER_WEIGHT].shape[0]
    model = build_segmentor(architecture, trained_classes if num_classes is None else num_classes, **options)
    load_checkpoint(model, state_dict, num_classes_mismatch="reinit")
    return model.eval()


def _build(architecture: str, num_classes: int | None, options: dict, why: str) -> nn.Module:
    if num_classes is None:
        raise ValueError(f"num_classes is needed with {why}: no trained classifier gives it")
    return build_segmentor(architecture, num_classes, **options)
