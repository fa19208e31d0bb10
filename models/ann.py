"""Asymmetric Non-local Network (ANN) segmentor with mmsegmentation's structure and state_dict keys.

``ANNSegmentor`` has the attributes ``backbone`` (ResNet-V1c-D8), ``decode_head`` (ANNHead) and
``auxiliary_head`` (FCNHead), so its state_dict keys equal those of an mmseg ``EncoderDecoder`` built from
``configs/_base_/models/ann_r50-d8.py`` (390 keys for R-50 with 150 classes). Head data flow:

    C3, C4 -> AFNB(C3 keys/values, C4 queries) -> Dropout2d -> 3x3 ConvModule -> APNB -> Dropout2d -> conv_seg
    C3 -> 3x3 ConvModule -> Dropout2d -> conv_seg                                      (auxiliary, training only)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from annkernels.nn import AFNB, APNB, ConvModule, NormLayer

from .resnet import ResNetV1c

POOL_SCALES = (1, 3, 6, 8)

# Per-name sizes. are mmseg's ann_r{50,101}-d8 configs. R-18 is our small CPU-friendly variant
# (no mmseg ANN config exists for it): mmseg's ResNet-18-V1c-D8 backbone (C3 256, C4 512 channels) with the
# head widths scaled by 1/4 (channels 128, key/value projections 64) and mmseg's r18-d8 auxiliary width 64.
ARCHITECTURES: dict[str, dict[str, int]] = {
    "ann_r18_d8": dict(depth=18, channels=128, project_channels=64, aux_channels=64),
    "ann_r50_d8": dict(depth=50, channels=512, project_channels=256, aux_channels=256),
    "ann_r101_d8": dict(depth=101, channels=512, project_channels=256, aux_channels=256),
}

# "mmseg" is the compatibility target (docs/ann-spec.md §1). "authors" follows MendelXu/ANN (docs/ann-spec.md
# §7): a 128-wide stem with a ceil-mode max-pool, biased 1x1/3x3 convs in the head, Dropout2d(0.05) at the end
# of each block instead of the head's two Dropout2d(0.1), an auxiliary conv as wide as the head (512 for
# ) and align_corners=True. `dropout` and `align_corners` options override the variant's defaults.
VARIANTS: dict[str, dict] = {
    "mmseg": dict(stem_channels=64, maxpool_ceil_mode=False, project_bias=False, head_dropout=True,
                  dropout=0.1, align_corners=False, wide_aux=False),
    "authors": dict(stem_channels=128, maxpool_ceil_mode=True, project_bias=True, head_dropout=False,
                    dropout=0.05, align_corners=True, wide_aux=True),
}

NORM_LAYERS: dict[str, NormLayer] = {"BN": nn.BatchNorm2d, "SyncBN": nn.SyncBatchNorm}


def _dropout(ratio: float) -> nn.Module:
    return nn.Dropout2d(ratio) if ratio > 0 else nn.Identity()


def init_classifier(conv: nn.Conv2d) -> None:
    # mmseg's BaseDecodeHead init_cfg: Normal(0, 0.01) on conv_seg, bias 0.
    nn.init.normal_(conv.weight, 0.0, 0.01)
    nn.init.zeros_(conv.bias)


class ANNHead(nn.Module):
    """mmseg's ANNHead: AFNB fusion of C3/C4, 3x3 bottleneck, APNB context, 1x1 classifier.

    low [B, low_in, h, w], high [B, high_in, h, w] -> logits [B, num_classes, h, w].
    """

    def __init__(self, low_in_channels: int, high_in_channels: int, channels: int, project_channels: int,
                 num_classes: int, norm_layer: NormLayer, dropout: float, head_dropout: bool, project_bias: bool,
                 pool_scales: Sequence[int] = POOL_SCALES, backend: str | None = None):
        super().__init__()
        # conv_seg first: mmseg's BaseDecodeHead registers it before the subclass modules (state_dict order).
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        init_classifier(self.conv_seg)
        block_dropout = 0.0 if head_dropout else dropout
        self.fusion = AFNB(low_in_channels, high_in_channels, high_in_channels, key_channels=project_channels,
                           value_channels=project_channels, pool_scales=pool_scales, norm_layer=norm_layer,
                           project_bias=project_bias, dropout=block_dropout, backend=backend)
        self.bottleneck = ConvModule(high_in_channels, channels, 3, padding=1, norm_layer=norm_layer,
                                     bias=project_bias)
        self.context = APNB(channels, channels, key_channels=project_channels, value_channels=project_channels,
                            pool_scales=pool_scales, norm_layer=norm_layer, project_bias=project_bias,
                            dropout=block_dropout, backend=backend)
        # One module used twice (after the fusion and before conv_seg), as in mmseg's BaseDecodeHead.
        self.dropout = _dropout(dropout if head_dropout else 0.0)

    def forward(self, low_feats: torch.Tensor, high_feats: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.fusion(low_feats, high_feats))
        x = self.context(self.bottleneck(x))
        return self.conv_seg(self.dropout(x))


class FCNHead(nn.Module):
    """mmseg's FCNHead with num_convs=1, concat_input=False: 3x3 ConvModule -> Dropout2d -> 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, norm_layer: NormLayer, dropout: float):
        super().__init__()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        init_classifier(self.conv_seg)
        self.dropout = _dropout(dropout)
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3, padding=1, norm_layer=norm_layer))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(feats)))


class ANNSegmentor(nn.Module):
    """Backbone + ANN decode head + FCN auxiliary head.

    eval:  ``model(images)`` -> main logits [B, K, ceil(H/8), ceil(W/8)] (aux head skipped).
    train: ``model(images)`` -> {"out": main logits, "aux": auxiliary logits}, both at 1/8 resolution.
    ``model.predict(images)`` -> main logits bilinearly resized to [B, K, H, W].
    (variant="authors" keeps the authors' ceil-mode max-pool, so even sizes give one more row/column.)
    """

    def __init__(self, backbone: ResNetV1c, decode_head: ANNHead, auxiliary_head: FCNHead, num_classes: int,
                 align_corners: bool):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.num_classes = num_classes
        self.align_corners = align_corners

    def forward(self, images: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        _check_images(images)
        _, _, c3, c4 = self.backbone(images)
        out = self.decode_head(c3, c4)
        if not self.training:
            return out
        return {"out": out, "aux": self.auxiliary_head(c3)}

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Main-head logits bilinearly resized to the input, [B, K, H, W]; no aux head. Runs in the current mode
        (BatchNorm uses batch statistics in train mode): call ``model.eval()`` for inference."""
        _check_images(images)
        _, _, c3, c4 = self.backbone(images)
        logits = self.decode_head(c3, c4)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=self.align_corners)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, align_corners={self.align_corners}"


def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor (normalised pixels), got {images.dtype}")
    if images.numel() == 0:
        raise ValueError(f"images must not be empty, got shape {tuple(images.shape)}")


def _resolve_norm_layer(norm_layer: str | NormLayer) -> NormLayer:
    if isinstance(norm_layer, str):
        if norm_layer not in NORM_LAYERS:
            raise ValueError(f"norm_layer must be one of {sorted(NORM_LAYERS)} or a callable, got {norm_layer!r}")
        return NORM_LAYERS[norm_layer]
    if not callable(norm_layer):
        raise TypeError(f"norm_layer must be a string or a callable taking a channel count, got {norm_layer!r}")
    return norm_layer


def build_segmentor(name: str, num_classes: int, norm_layer: str | NormLayer = nn.BatchNorm2d,
                    align_corners: bool | None = None, dropout: float | None = None, backend: str | None = None,
                    variant: str = "mmseg") -> ANNSegmentor:
    """Build an ANN segmentor.

    Args:
        name: "ann_r18_d8", "ann_r50_d8" or "ann_r101_d8" (see ``ARCHITECTURES``).
        num_classes: K, the classifier width (19 Cityscapes, 150 ADE20K, 21 VOC).
        norm_layer: nn.BatchNorm2d (one process), nn.SyncBatchNorm (mmseg's training setting), "BN" or "SyncBN",
            or any callable taking a channel count.
        align_corners: for predict() and the loss resize; None uses the variant's default (mmseg False,
            authors True).
        dropout: Dropout2d ratio; None uses the variant's (mmseg: 0.1 after AFNB, before each conv_seg;
            authors: 0.05 at the end of AFNB and APNB and before the auxiliary conv_seg).
        backend: annkernels backend for the blocks' ops (None follows ``annkernels.set_backend``).
        variant: "mmseg" (default; checkpoint compatible) or "authors" (see ``VARIANTS``).

    Returns:
        ANNSegmentor with attributes backbone, decode_head, auxiliary_head.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown segmentor {name!r}; valid names: {', '.join(ARCHITECTURES)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    arch, options = ARCHITECTURES[name], VARIANTS[variant]
    dropout = options["dropout"] if dropout is None else float(dropout)
    if not 0.0 <= dropout < 1.0:  # also rejects NaN
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    align_corners = options["align_corners"] if align_corners is None else bool(align_corners)
    norm = _resolve_norm_layer(norm_layer)

    backbone = ResNetV1c(arch["depth"], stem_channels=options["stem_channels"],
                         maxpool_ceil_mode=options["maxpool_ceil_mode"], norm_layer=norm)
    _, _, c3_channels, c4_channels = backbone.out_channels
    decode_head = ANNHead(c3_channels, c4_channels, arch["channels"], arch["project_channels"], num_classes,
                          norm, dropout, head_dropout=options["head_dropout"], project_bias=options["project_bias"],
                          backend=backend)
    aux_channels = arch["channels"] if options["wide_aux"] else arch["aux_channels"]
    auxiliary_head = FCNHead(c3_channels, aux_channels, num_classes, norm, dropout)
    return ANNSegmentor(backbone, decode_head, auxiliary_head, num_classes, align_corners)


def segmentation_loss(outputs: torch.Tensor | dict[str, torch.Tensor], target: torch.Tensor, aux_weight: float = 0.4,
                      ignore_index: int = 255, avg_non_ignore: bool = False, align_corners: bool = False
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """mmseg's decode + auxiliary cross-entropy.

    Args:
        outputs: {"out": [B, K, h, w], "aux": [B, K, h, w]} (train mode) or main logits alone.
        target: [B, H, W] integer labels; ``ignore_index`` marks pixels without a label.
        aux_weight: weight of the auxiliary loss (mmseg 0.4).
        avg_non_ignore: False (mmseg default) divides the summed loss by ALL B*H*W pixels, ignored ones
            included; True divides by the labelled pixels only.
        align_corners: used when resizing the logits bilinearly to H x W (pass ``model.align_corners``).

    Returns:
        (total loss, {"loss_out", "loss_aux" (when present), "acc_seg" (percent of labelled pixels, detached)}).
    """
    logits = outputs if isinstance(outputs, dict) else {"out": outputs}
    if "out" not in logits:
        raise KeyError(f"outputs must hold 'out' (and optionally 'aux'), got keys {sorted(logits)}")
    if not isinstance(target, torch.Tensor) or target.dim() != 3 or target.is_floating_point():
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"target must be an integer tensor [B, H, W], got {shape}")
    target = target.long()
    parts = {}
    total = None
    for key, weight in (("out", 1.0), ("aux", aux_weight)):
        if key not in logits:
            continue
        pred = logits[key]
        if pred.dim() != 4 or pred.shape[0] != target.shape[0]:
            raise ValueError(f"outputs[{key!r}] must be [B, K, h, w] with B={target.shape[0]}, "
                             f"got {tuple(pred.shape)}")
        pred = F.interpolate(pred, size=target.shape[-2:], mode="bilinear", align_corners=align_corners)
        pixel_loss = F.cross_entropy(pred.float(), target, ignore_index=ignore_index, reduction="none")
        if avg_non_ignore:
            labelled = (target != ignore_index).sum()
            # mmseg adds float32 eps to the count, so an all-ignored batch gives 0 rather than NaN.
            loss = pixel_loss.sum() / (labelled + torch.finfo(torch.float32).eps)
        else:
            loss = pixel_loss.mean()
        parts[f"loss_{key}"] = loss
        total = weight * loss if total is None else total + weight * loss
        if key == "out":
            parts["acc_seg"] = _pixel_accuracy(pred.detach(), target, ignore_index)
    return total, parts


def _pixel_accuracy(pred: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    labelled = target != ignore_index
    correct = (pred.argmax(1) == target) & labelled
    return correct.sum().float() * 100.0 / labelled.sum().clamp(min=1).float()
