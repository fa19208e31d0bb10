"""Pure-PyTorch oracle for both ops, computed the way mmsegmentation's ANN head computes them.

It is the "reference" backend, the fallback when the extension is missing, and the thing every other
backend is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def pyramid_pool(input: torch.Tensor, scales: list[int]) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, S]: one adaptive average pool per scale, flattened and concatenated."""
    if torch.onnx.is_in_onnx_export():
        # adaptive_avg_pool2d with sizes that do not divide H, W has no ONNX form; the same bins as matrices
        # built in the graph from the runtime size export exactly, with H and W free.
        return pyramid_pool_in_graph(input, scales)
    return torch.cat([F.adaptive_avg_pool2d(input, s).flatten(2) for s in scales], dim=2)


def pyramid_pool_in_graph(x: torch.Tensor, scales: Sequence[int]) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, S], equal to ``torch.cat([F.adaptive_avg_pool2d(x, s).flatten(2) for s in scales],
    2)``, written with tensor ops on the map's size so that an ONNX export keeps H and W free.

    Per scale s and axis of length n, bin i averages positions [floor(i*n/s), ceil((i+1)*n/s)) (adaptive
    pooling's own bins) through an [s, n] averaging matrix made from Range, integer Div and comparisons; the
    pooled map is rows @ x @ cols^T. Every bin holds at least one position for any n >= 1, so maps smaller than
    the scales are exact too.
    """
    height, width = _runtime_size(x)
    pooled = [torch.matmul(torch.matmul(_averaging_matrix(height, s, x), x), _averaging_matrix(width, s, x).t())
              for s in scales]
    return torch.cat([p.flatten(2) for p in pooled], dim=2)


def _averaging_matrix(size, bins: int, like: torch.Tensor) -> torch.Tensor:
    """[bins, size] matrix whose row i averages positions [floor(i*size/bins), ceil((i+1)*size/bins))."""
    index = torch.arange(bins, device=like.device)
    start = torch.div(index * size, bins, rounding_mode="floor")
    end = torch.div((index + 1) * size + (bins - 1), bins, rounding_mode="floor")
    position = torch.arange(size, device=like.device)
    member = (position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])
    return member.to(like.dtype) / (end - start).to(like.dtype)[:, None]


def _runtime_size(x: torch.Tensor):
    """(H, W) of x as values the exporter records: 0-dim int64 tensors (Shape -> Gather in the graph) under the
    TorchScript exporter, symbolic ints under torch.export, plain ints in eager mode."""
    if torch.jit.is_tracing():
        shape = torch._shape_as_tensor(x)
        return shape[-2], shape[-1]
    return x.shape[-2], x.shape[-1]


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
