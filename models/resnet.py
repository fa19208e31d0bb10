"""Dilated ResNet-V1c backbone with mmsegmentation's module names.

The layout follows mmseg's ``ResNetV1c`` (deep 3x3 stem, pytorch-style stride on the 3x3 conv,
``contract_dilation=True``) so that mmseg's ImageNet ``resnet{18,50,101}_v1c`` checkpoints and the
``backbone.*`` part of its segmentor checkpoints load by name:
``stem.{0..8}``, ``layer{i}.{j}.conv{1,2,3}/bn{1,2,3}``, ``layer{i}.0.downsample.{0,1}``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from annkernels.nn import NormLayer


class BasicBlock(nn.Module):
    """Two 3x3 convs. As in mmseg, only conv1 carries the stride and the dilation; conv2 stays at
    dilation 1, so the ResNet-18-D8 backbone equals mmseg's ``r18-d8`` one."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, dilation: int,
                 downsample: nn.Module | None, norm_layer: NormLayer):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 x4, the "pytorch" style used by mmseg."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, dilation: int,
                 downsample: nn.Module | None, norm_layer: NormLayer):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# depth -> (residual block, blocks per stage)
STAGE_LAYOUTS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNetV1c(nn.Module):
    """Dilated ResNet-V1c returning the four stage outputs (C1, C2, C3, C4).

    Args:
        depth: 18, 50 or 101.
        strides: stride of the first block of each stage; (1, 2, 1, 1) with dilations (1, 1, 2, 4)
            gives output stride 8 (every stride-2 op maps H to ceil(H/2)).
        dilations: dilation of each stage. With ``contract_dilation`` the first block of a stage whose
            dilation d > 1 uses d // 2, as mmseg and the ANN authors do.
        stem_channels: output width of the deep stem; its first two convs use half of it
            (mmseg: 64 -> 32/32/64; the ANN authors: 128 -> 64/64/128).
        maxpool_ceil_mode: the authors' stem max-pool rounds up (changes sizes for even inputs).
        norm_layer: BatchNorm2d-like constructor taking the channel count.

    Input [B, 3, H, W] -> C1 [B, 64e, H/4, W/4], C2 [B, 128e, H/8, W/8], C3 [B, 256e, H/8, W/8],
    C4 [B, 512e, H/8, W/8], e = block expansion (1 for depth 18, 4 otherwise), sizes rounded up.
    """

    def __init__(self, depth: int, strides: Sequence[int] = (1, 2, 1, 1), dilations: Sequence[int] = (1, 1, 2, 4),
                 contract_dilation: bool = True, stem_channels: int = 64, maxpool_ceil_mode: bool = False,
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        if depth not in STAGE_LAYOUTS:
            raise ValueError(f"ResNetV1c depth must be one of {sorted(STAGE_LAYOUTS)}, got {depth}")
        block, num_blocks = STAGE_LAYOUTS[depth]
        half = stem_channels // 2
        self.stem = nn.Sequential(
            nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False), norm_layer(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, padding=1, bias=False), norm_layer(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, stem_channels, 3, padding=1, bias=False), norm_layer(stem_channels), nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=maxpool_ceil_mode)
        self.out_channels: list[int] = []
        in_channels = stem_channels
        for stage, (blocks, stride, dilation) in enumerate(zip(num_blocks, strides, dilations, strict=True)):
            planes = 64 * 2**stage
            layer = self._make_layer(block, in_channels, planes, blocks, stride, dilation, contract_dilation,
                                     norm_layer)
            self.add_module(f"layer{stage + 1}", layer)
            in_channels = planes * block.expansion
            self.out_channels.append(in_channels)
        self._init_weights()

    @staticmethod
    def _make_layer(block, in_channels: int, planes: int, num_blocks: int, stride: int, dilation: int,
                    contract_dilation: bool, norm_layer: NormLayer) -> nn.Sequential:
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                       norm_layer(out_channels))
        first_dilation = dilation // 2 if contract_dilation and dilation > 1 else dilation
        layers = [block(in_channels, planes, stride, first_dilation, downsample, norm_layer)]
        layers += [block(out_channels, planes, 1, dilation, None, norm_layer) for _ in range(1, num_blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # mmseg's init when no pretrained weights are given: Kaiming (fan_out, relu) convs, BN 1/0.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.stem(x))
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return c1, c2, c3, c4
