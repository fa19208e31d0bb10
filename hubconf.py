"""torch.hub entries, one per architecture:

    model = torch.hub.load("<this repository's folder>", "ann_r50_d8", source="local",
                           pretrained="ann_r50-d8_512x1024_40k_cityscapes")

``pretrained`` is None (random weights), a zoo name (``python -m annkernels.models.zoo``), an http(s) URL, a path
(``.pth`` or ``.safetensors``) or an ImageNet backbone (``open-mmlab://resnet50_v1c``); ``num_classes`` defaults
to the checkpoint's. The models come in eval mode. annkernels must be installed (``pip install
--no-build-isolation .`` in this folder, or the README's editable install): the segmentor is
``annkernels.models``.
"""

from annkernels.models.hub import pretrained_segmentor

dependencies = ["torch"]


def ann_r18_d8(pretrained=None, num_classes=None, **options):
    """ANN with a ResNet-18-V1c-D8 backbone and a 1/4-width head (our small variant; no released weights)."""
    return pretrained_segmentor("ann_r18_d8", pretrained, num_classes, **options)


def ann_r50_d8(pretrained=None, num_classes=None, **options):
    """ANN with a ResNet-50-V1c-D8 backbone (mmseg's ann_r50-d8; 8 released models: Cityscapes, ADE20K, VOC)."""
    return pretrained_segmentor("ann_r50_d8", pretrained, num_classes, **options)


def ann_r101_d8(pretrained=None, num_classes=None, **options):
    """ANN with a ResNet-101-V1c-D8 backbone (mmseg's ann_r101-d8; 8 released models: Cityscapes, ADE20K, VOC)."""
    return pretrained_segmentor("ann_r101_d8", pretrained, num_classes, **options)
