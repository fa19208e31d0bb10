"""The "composite" backend: both ops written as GEMMs and a softmax from PyTorch's own kernels.

It runs wherever PyTorch does (CPU and CUDA tensors), is correct on a GPU because cuBLAS and PyTorch's
softmax are, and is what ``backend="auto"`` gives a CUDA tensor until a kernel of ours is verified on one.
Every backward is a fixed sequence of GEMMs and row-wise ops: no atomics, the same bits on every run on the
same device.
"""

from __future__ import annotations

import functools

import torch

from annkernels.ops._common import is_channel_first
from annkernels.ops.reference import bin_membership


def _autocast_off(function):
    """Runs ``function`` with autocast off: the op's contract (outputs and gradients in the inputs' dtype, as its
    fake kernel states) holds inside torch.autocast too, where bmm would otherwise compute in fp16/bf16."""

    @functools.wraps(function)
    def run(first: torch.Tensor, *args):
        with torch.autocast(first.device.type, enabled=False):
            return function(first, *args)

    return run


# ------------------------------------------------------------------------------------------------ pyramid_pool
#
# Adaptive average pooling at scale s is separable: bin (i, j) averages rows [r0, r1) and columns [c0, c1), so
# pool_s(X) = A_s X B_s^T with A_s [s, H] and B_s [s, W] holding 1/(r1 - r0) and 1/(c1 - c0) on each bin.
# Stacking the scales gives rows [K, H] and cols [K, W], K = sum(scales) (18 for ANN's (1, 3, 6, 8)), and
# rows X cols^T [K, K] holds every scale's s x s block on its diagonal. Two GEMMs with inner sizes W and H
# cost about K H W multiply-adds per channel, against S H W for one GEMM with the [H*W, S] area-weight
# matrix (S = 110): 6x fewer, and the intermediate X cols^T is only K/W of X.


@functools.lru_cache(maxsize=32)
def _axis_matrices(height: int, width: int, scales: tuple[int, ...], dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [K, H], cols [K, W]): per-axis bin averages of every scale, stacked."""

    def averaging(size: int) -> torch.Tensor:
        membership = torch.cat([bin_membership(size, s) for s in scales], 0)  # float64 [K, size]
        return (membership / membership.sum(1, keepdim=True)).to(dtype=dtype, device=device)

    return averaging(height), averaging(width)


def _diagonal_blocks(scales: list[int]):
    """(offset in the K x K product, offset in the S outputs, s) for every scale."""
    block, column = 0, 0
    for s in scales:
        yield block, column, s
        block += s
        column += s * s


def _left_multiply(matrix: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """matrix @ batch[i] for every i, as one batched GEMM (torch.matmul of a [m, k] and an [n, k, p] tensor
    measured 80x slower on the CPU at ANN's shapes)."""
    return torch.bmm(matrix.expand(batch.shape[0], -1, -1), batch)


@_autocast_off
def pyramid_pool_forward(x: torch.Tensor, scales: list[int]) -> torch.Tensor:
    batch, channels, height, width = x.shape
    rows, cols = _axis_matrices(height, width, tuple(scales), x.dtype, x.device)
    k = rows.shape[0]
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        # [B*H, W, C], one [W, C] matrix per image row: contract W, then H per image; channels stay innermost.
        by_column = _left_multiply(cols, x.permute(0, 2, 3, 1).reshape(batch * height, width, channels))
        pooled = _left_multiply(rows, by_column.view(batch, height, k * channels)).view(batch, k, k, channels)
        blocks = [pooled[:, r:r + s, r:r + s].reshape(batch, s * s, channels) for r, _, s in _diagonal_blocks(scales)]
        return torch.cat(blocks, 1).transpose(1, 2).contiguous()
    # [B*C*H, W] rows: contract W with one GEMM over every row of every channel, then H per channel.
    by_column = torch.mm(x.contiguous().view(-1, width), cols.t()).view(batch * channels, height, k)
    pooled = _left_multiply(rows, by_column)  # [B*C, K, K]
    blocks = [pooled[:, r:r + s, r:r + s].reshape(batch * channels, s * s) for r, _, s in _diagonal_blocks(scales)]
    return torch.cat(blocks, 1).view(batch, channels, -1)


@_autocast_off
def pyramid_pool_backward(grad_output: torch.Tensor, scales: list[int], height: int, width: int) -> torch.Tensor:
    """rows^T G cols per channel, G the [K, K] block-diagonal gradient: the forward's GEMMs transposed, in
    reverse order, so the intermediate is the small [B*C, H, K] and the last GEMM writes the gradient once."""
    batch, channels, _ = grad_output.shape
    rows, cols = _axis_matrices(height, width, tuple(scales), grad_output.dtype, grad_output.device)
    k = rows.shape[0]
    grad_pooled = grad_output.new_zeros(batch * channels, k, k)
    for r, c, s in _diagonal_blocks(scales):
        grad_pooled[:, r:r + s, r:r + s] = grad_output[:, :, c:c + s * s].reshape(batch * channels, s, s)
    grad_by_column = _left_multiply(rows.t(), grad_pooled)  # [B*C, H, K]
    return torch.mm(grad_by_column.view(-1, k), cols).view(batch, channels, height, width)


# --------------------------------------------------------------------------------------------- short_attention
#
# scores = scale * Q K^T (the scale is the GEMM's alpha, not a pass over the scores), P = softmax(scores),
# out = P V. P is the state kept for the backward: at ANN's S = 110 it is smaller than Q (Dk = 256).
# PyTorch's softmax keeps its row max and sum in fp32 for fp16 and bf16 inputs.
# A channel-first query (the [B, Dk, N] buffer of a conv output) turns the problem around: scores^T = K Q^T
# [B, S, N], the softmax over dim 1, out^T = V^T P^T. Every GEMM then reads and writes row-major [.., N]
# buffers (a GEMM with both operands column-major ran 1.7x slower on the CPU), P takes the query's layout like
# the output, and nothing is copied.
# Under no_grad the path stays the same: F.scaled_dot_product_attention measured slower on the CPU at ANN's
# shape (B=2, N=8192, S=110, Dk=Dv=256, fp32: 47 ms against 33 ms of one thread's CPU time) and is unmeasured
# on a GPU.

ATTENTION_PATH = "baddbmm(alpha=scale) -> softmax -> bmm"  # for bench rows to name the path timed


def _product_like(like: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """alpha * a @ b [B, m, n], laid out as ``like`` (empty_like_layout's rule): a channel-first ``like`` gets
    the transposed product (b^T a^T)^T, written straight into its [B, n, m] buffer."""
    if is_channel_first(like):
        return _scaled_bmm(b.transpose(1, 2), a.transpose(1, 2), alpha).transpose(1, 2)
    return _scaled_bmm(a, b, alpha)


def _scaled_bmm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 1.0:
        return torch.bmm(a, b)
    # beta = 0: the broadcast zero is never read, and alpha scales inside the GEMM.
    return torch.baddbmm(a.new_zeros(()), a, b, beta=0.0, alpha=alpha)


@_autocast_off
def short_attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if is_channel_first(query):
        probs_t = torch.softmax(_scaled_bmm(key, query.transpose(1, 2), scale), dim=1)  # [B, S, N]
        return torch.bmm(value.transpose(1, 2), probs_t).transpose(1, 2), probs_t.transpose(1, 2)
    probs = torch.softmax(_scaled_bmm(query, key.transpose(1, 2), scale), dim=-1)  # [B, N, S]
    return torch.bmm(probs, value), probs


@_autocast_off
def short_attention_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             out: torch.Tensor, probs: torch.Tensor,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_value = _product_like(value, probs.transpose(1, 2), grad_out)  # P^T dO [B, S, Dv]
    # dS = P * (dP - rowsum(dP * P)) with dP = dO V^T, computed in P's layout.
    if is_channel_first(query):
        probs_t = probs.transpose(1, 2)  # [B, S, N], contiguous
        grad_probs_t = torch.bmm(value, grad_out.transpose(1, 2))
        grad_scores = torch._softmax_backward_data(grad_probs_t, probs_t, 1, probs.dtype).transpose(1, 2)
    else:
        grad_probs = torch.bmm(grad_out, value.transpose(1, 2))
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
    grad_query = _product_like(query, grad_scores, key, alpha=scale)  # scale dS K [B, N, Dk]
    grad_key = _product_like(key, grad_scores.transpose(1, 2), query, alpha=scale)  # scale dS^T Q [B, S, Dk]
    return grad_query, grad_key, grad_value
