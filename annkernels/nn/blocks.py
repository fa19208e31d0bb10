"""ANN's attention blocks on the annkernels ops, with mmsegmentation's semantics and parameter names.

Submodule names follow mmsegmentation (`stages.0.key_project.conv`, `bottleneck.bn`, ...), so the
`decode_head.fusion.*` / `decode_head.context.*` parts of its ANN checkpoints load without renaming.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from annkernels import _backend
from annkernels.ops import pyramid_pool, pyramid_pool_pair, short_attention

# A normalisation constructor taking the channel count (nn.BatchNorm2d, nn.SyncBatchNorm, ...).
NormLayer = Callable[[int], nn.Module]


class ConvModule(nn.Sequential):
    """Conv (no bias by default) + norm + optional ReLU, named conv / bn / activate like mmcv's ConvModule."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, padding: int = 0,
                 norm_layer: NormLayer = nn.BatchNorm2d, relu: bool = True, bias: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=bias)
        self.bn = norm_layer(out_channels)
        if relu:
            self.activate = nn.ReLU(inplace=True)
        # mmcv's ConvModule init: Kaiming normal, fan_out, for ReLU; norm weight 1, bias 0.
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if bias:
            nn.init.zeros_(self.conv.bias)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)


class PyramidAttention(nn.Module):
    """One attention stage: queries at every position, keys and values pyramid-pooled to S positions.

    query [B, Cq, h, w], key source [B, Ck, h', w'] -> [B, out_channels, h, w].
    """

    def __init__(self, key_in_channels: int, query_in_channels: int, key_channels: int, value_channels: int,
                 out_channels: int, pool_scales: Sequence[int], share_key_query: bool, norm_layer: NormLayer,
                 project_bias: bool = False, backend: str | None = None):
        super().__init__()
        self.pool_scales = tuple(pool_scales)
        self.key_channels = key_channels
        self.backend = backend
        self.key_project = ConvModule(key_in_channels, key_channels, norm_layer=norm_layer, bias=project_bias)
        if share_key_query:
            if key_in_channels != query_in_channels:
                raise ValueError(f"a shared key/query projection needs equal inputs, got key {key_in_channels} "
                                 f"and query {query_in_channels} channels")
            self.query_project = self.key_project
        else:
            self.query_project = ConvModule(query_in_channels, key_channels, norm_layer=norm_layer,
                                            bias=project_bias)
        self.value_project = nn.Conv2d(key_in_channels, value_channels, 1)
        self.out_project = nn.Conv2d(value_channels, out_channels, 1)
        # Zero-initialised output: the block starts as the identity path of its fuse (mmseg, the paper).
        nn.init.zeros_(self.out_project.weight)
        nn.init.zeros_(self.out_project.bias)

    def forward(self, query_feats: torch.Tensor, key_feats: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = query_feats.shape
        key_map = self.key_project(key_feats)
        if self.query_project is self.key_project and query_feats is key_feats and not self.training:
            # Same module on the same input: reuse it. In training mode mmseg runs the shared projection
            # twice, which updates its BatchNorm running statistics twice; that is kept for fidelity.
            query_map = key_map
        else:
            query_map = self.query_project(query_feats)
        key, value = self._pooled_keys_values(key_map, key_feats)  # [B, Ck, S], [B, Cv, S]
        # Channel-first views: [B, N, Ck], [B, S, Ck], [B, S, Cv]; the kernels read them without copies.
        context = short_attention(query_map.flatten(2).transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                  scale=self.key_channels**-0.5, backend=self.backend)
        context = context.transpose(1, 2).reshape(batch, -1, height, width)
        return self.out_project(context)

    def _pooled_keys_values(self, key_map: torch.Tensor, key_feats: torch.Tensor):
        """pool(key_map) [B, Ck, S] and pool(value_project(key_feats)) [B, Cv, S].

        The value projection is a plain 1x1 conv with bias (no norm or activation, in mmseg and in the
        authors' code), and every pooling bin is a mean, whose weights sum to one. So
        pool(W x + b) = W pool(x) + b: projecting the S pooled positions instead of all H*W pixels gives the
        same values up to rounding and drops one H*W-sized convolution from the block's forward and backward.
        key_map and key_feats then share their size, so both are pooled in one pass (pyramid_pool_pair: one
        launch on the GPU backends). The reference backend keeps mmseg's order (project every pixel, then pool
        each map), so that it costs what mmseg costs and stays the oracle the reordered path is tested against.
        """
        if _backend.resolve(self.backend, key_feats.device) == "reference":
            return (pyramid_pool(key_map, self.pool_scales, backend=self.backend),
                    pyramid_pool(self.value_project(key_feats), self.pool_scales, backend=self.backend))
        key, pooled = pyramid_pool_pair(key_map, key_feats, self.pool_scales, backend=self.backend)
        return key, F.conv1d(pooled, self.value_project.weight.flatten(1).unsqueeze(-1), self.value_project.bias)


class APNB(nn.Module):
    """Asymmetric Pyramid Non-local Block: self-attention over pyramid-pooled keys, fused with the input.

    One projection (conv + norm + ReLU) serves as both key and query. Output: bottleneck(cat[context, x]),
    a 1x1 conv + norm + ReLU. feats [B, in_channels, H, W] -> [B, out_channels, H, W].
    """

    def __init__(self, in_channels: int, out_channels: int, key_channels: int = 256, value_channels: int = 256,
                 pool_scales: Sequence[int] = (1, 3, 6, 8), norm_layer: NormLayer = nn.BatchNorm2d,
                 project_bias: bool = False, dropout: float = 0.0, backend: str | None = None):
        super().__init__()
        self.stages = nn.ModuleList([
            PyramidAttention(in_channels, in_channels, key_channels, value_channels, in_channels, pool_scales,
                             share_key_query=True, norm_layer=norm_layer, project_bias=project_bias,
                             backend=backend)
        ])
        self.bottleneck = ConvModule(2 * in_channels, out_channels, norm_layer=norm_layer, bias=project_bias)
        # The authors' code drops out after the fuse; mmsegmentation does not (dropout=0).
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        _check_map("feats", feats, self.stages[0].key_project.conv.in_channels)
        context = sum(stage(feats, feats) for stage in self.stages)
        return self.dropout(self.bottleneck(torch.cat([context, feats], dim=1)))


class AFNB(nn.Module):
    """Asymmetric Fusion Non-local Block: high-level queries attend to pyramid-pooled low-level keys/values.

    Output: bottleneck(cat[context, high]), a 1x1 conv + norm with no ReLU.
    low [B, low_in_channels, H, W], high [B, high_in_channels, H, W] -> [B, out_channels, H, W].
    """

    def __init__(self, low_in_channels: int, high_in_channels: int, out_channels: int, key_channels: int = 256,
                 value_channels: int = 256, pool_scales: Sequence[int] = (1, 3, 6, 8),
                 norm_layer: NormLayer = nn.BatchNorm2d, project_bias: bool = False, dropout: float = 0.0,
                 backend: str | None = None):
        super().__init__()
        self.stages = nn.ModuleList([
            PyramidAttention(low_in_channels, high_in_channels, key_channels, value_channels, out_channels,
                             pool_scales, share_key_query=False, norm_layer=norm_layer, project_bias=project_bias,
                             backend=backend)
        ])
        self.bottleneck = ConvModule(out_channels + high_in_channels, out_channels, norm_layer=norm_layer,
                                     relu=False, bias=project_bias)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, low_feats: torch.Tensor, high_feats: torch.Tensor) -> torch.Tensor:
        stage = self.stages[0]
        _check_map("low_feats", low_feats, stage.key_project.conv.in_channels)
        _check_map("high_feats", high_feats, stage.query_project.conv.in_channels)
        if low_feats.shape[0] != high_feats.shape[0]:
            raise ValueError(f"low_feats and high_feats must have the same batch size, got "
                             f"{tuple(low_feats.shape)} and {tuple(high_feats.shape)}")
        context = sum(stage(high_feats, low_feats) for stage in self.stages)
        return self.dropout(self.bottleneck(torch.cat([context, high_feats], dim=1)))


class NonLocal2d(nn.Module):
    """The full non-local baseline of the paper's efficiency study: every position attends to every other.

    Shared key/query projection, scale key_channels ** -0.5, zero-initialised output conv, then the same
    concat + 1x1 fuse as APNB, so the two differ only in pooled versus full keys. `attention="matmul"`
    materialises the N x N scores as the paper's baseline did; "sdpa" uses F.scaled_dot_product_attention.
    """

    def __init__(self, in_channels: int, key_channels: int = 256, value_channels: int = 256,
                 out_channels: int | None = None, norm_layer: NormLayer = nn.BatchNorm2d, attention: str = "matmul"):
        super().__init__()
        if attention not in ("matmul", "sdpa"):
            raise ValueError(f"attention must be 'matmul' or 'sdpa', got {attention!r}")
        out_channels = in_channels if out_channels is None else out_channels
        self.attention = attention
        self.key_channels = key_channels
        self.key_project = ConvModule(in_channels, key_channels, norm_layer=norm_layer)
        self.value_project = nn.Conv2d(in_channels, value_channels, 1)
        self.out_project = nn.Conv2d(value_channels, in_channels, 1)
        nn.init.zeros_(self.out_project.weight)
        nn.init.zeros_(self.out_project.bias)
        self.bottleneck = ConvModule(2 * in_channels, out_channels, norm_layer=norm_layer)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        _check_map("feats", feats, self.key_project.conv.in_channels)
        batch, _, height, width = feats.shape
        key = self.key_project(feats).flatten(2).transpose(1, 2)  # [B, N, Ck], also the query
        value = self.value_project(feats).flatten(2).transpose(1, 2)  # [B, N, Cv]
        scale = self.key_channels**-0.5
        if self.attention == "sdpa":
            context = F.scaled_dot_product_attention(key, key, value, scale=scale)
        else:
            context = torch.softmax(torch.matmul(key, key.transpose(1, 2)) * scale, dim=-1) @ value
        context = context.transpose(1, 2).reshape(batch, -1, height, width)
        return self.bottleneck(torch.cat([self.out_project(context), feats], dim=1))


def _check_map(name: str, tensor, channels: int) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 4 or tensor.shape[1] != channels:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be [B, {channels}, H, W], got {shape}")
