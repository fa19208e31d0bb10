"""Pure-PyTorch oracle for both ops, computed the way mmsegmentation's ANN head computes them.

It is the "reference" backend, the fallback when the extension is missing, and the thing every other
backend is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pyramid_pool(input: torch.Tensor, scales: list[int]) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, S]: one adaptive average pool per scale, flattened and concatenated."""
    if torch.onnx.is_in_onnx_export():
        # adaptive_avg_pool2d with sizes that do not divide H, W has no ONNX form; at a fixed input size
        # the pooling is a constant linear map, which exports as a MatMul and keeps the batch dynamic.
        height, width = input.shape[-2:]
        matrix = pooling_matrix(int(height), int(width), scales, dtype=input.dtype, device=input.device)
        return torch.matmul(input.flatten(2), matrix)
    return torch.cat([F.adaptive_avg_pool2d(input, s).flatten(2) for s in scales], dim=2)


def pooling_matrix(height: int, width: int, scales: list[int], dtype=torch.float32, device=None) -> torch.Tensor:
    """[H*W, S] matrix M with pyramid_pool(x) == x.flatten(2) @ M, using adaptive_avg_pool2d's bins."""
    columns = []
    for s in scales:
        rows = bin_membership(height, s)  # [s, H]
        cols = bin_membership(width, s)  # [s, W]
        area = rows.sum(1)[:, None] * cols.sum(1)[None, :]  # [s, s]
        weights = rows[:, None, :, None] * cols[None, :, None, :] / area[:, :, None, None]  # [s, s, H, W]
        columns.append(weights.reshape(s * s, height * width))
    return torch.cat(columns, 0).t().to(dtype=dtype, device=device).contiguous()


def bin_membership(size: int, bins: int) -> torch.Tensor:
    """[bins, size] 0/1 matrix: bin i covers [floor(i*size/bins), ceil((i+1)*size/bins))."""
    index = torch.arange(bins, dtype=torch.float64)
    start = torch.floor(index * size / bins)
    end = torch.ceil((index + 1) * size / bins)
    position = torch.arange(size, dtype=torch.float64)
    return ((position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])).double()


def short_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(query @ key^T * scale) @ value with mmsegmentation's materialised [B, N, S] scores.

    mmsegmentation permutes query and value to [B, N, D] with a .contiguous() copy; that copy is kept
    here so the reference costs what mmsegmentation's head costs.
    """
    scores = torch.matmul(query.contiguous(), key.transpose(1, 2)) * scale
    return torch.matmul(F.softmax(scores, dim=-1), value.contiguous())
