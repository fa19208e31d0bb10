"""Triton short-key attention: softmax(q k^T * scale) v with few keys (S <= 1024, ANN uses 110).

The whole score row [BLOCK_N, BLOCK_S] (BLOCK_S = next_power_of_2(S), padding keys masked with -inf)
stays on chip, so there is no online softmax and no N x S tensor in memory; the forward writes only
out and lse [B, N] (fp32). The query, its output and gradients may be strided views; the main case
is the channel-first view of a [B, D, H, W] feature map, stride (D*N, 1, N), whose tiles load
coalesced along N.

Keys and values are small (S x (Dk + Dv) per image), so each launcher first packs them into one
zero-padded buffer [B, Dk + Dv, BLOCK_S]: rows 16-byte aligned and unmasked along S, which lets the
GPU compiler pipeline their tiles with asynchronous 16-byte copies whatever the caller's strides.
Dk and Dv are compile-time constants (each pair compiles once).

Precision: softmax statistics are fp32 (fp64 for fp64 inputs). All products run on tensor cores
except fp64's: fp16/bf16 directly with fp32 accumulation (P and dS are rounded to the input dtype
before their products, as in FlashAttention), fp32 with the three-pass "tf32x3" split, which keeps
fp32 accuracy.

Backward, in two kernels plus a fixed-order sum, none of them reading back what it wrote:
  rows kernel   per query tile: P and dP recomputed, dS = P * (dP - rowsum(P dP)) * scale, dQ = dS K;
                it writes P and dS [B, N, S] (input dtype) for the second kernel;
  keys kernel   [dK | dV] = [dS | P]^T [Q | dO], a GEMM split over N into fixed row ranges, each range's
                sum written once to an fp32 partial; ``sum_chunks`` adds the partials in range order.
The result is bitwise reproducible for a given autotune config, and the split count fills the GPU
even at B=1.

Offsets into the query-sized tensors are int64, so maps with N * D >= 2^31 elements index correctly.
"""

import struct

import torch
import triton
import triton.language as tl

from annkernels.ops._common import empty_like_layout
from annkernels.triton.common import INTERPRET, autotune, dot, padded_block, size_class, sum_chunks, target_programs

# Row ranges of the keys kernel are multiples of this; it must be a multiple of every BLOCK_N below.
_SPLIT_ALIGN = 64
# fp64 score rows [16, BLOCK_S] and value tiles [BLOCK_S, 16] must fit sm_90's 227 KB of shared memory.
_FP64_MAX_KEYS_ON_GPU = 512
# Rows of P and dS in the backward workspace are padded to this many keys (16-byte aligned rows).
_WORKSPACE_KEY_ALIGN = 16


@triton.jit
def _scaled(x, scale_hi, scale_lo):
    """x * scale in x's dtype. Float kernel arguments arrive as fp32, so the launcher splits scale into
    fp32 hi + lo; lo only matters for fp64, where it keeps the product fp64-accurate."""
    if x.dtype == tl.float64:
        return x * tl.cast(scale_hi, tl.float64) + x * tl.cast(scale_lo, tl.float64)
    else:
        return x * scale_hi


@triton.jit
def _softmax_rows(scores, key_ok, scale_hi, scale_lo):
    """Row softmax of scores * scale over the keys where ``key_ok``, and its logsumexp."""
    scores = tl.where(key_ok[None, :], _scaled(scores, scale_hi, scale_lo), -float("inf"))
    row_max = tl.max(scores, axis=1)
    p = tl.exp(scores - row_max[:, None])
    row_sum = tl.sum(p, axis=1)
    return p / row_sum[:, None], row_max + tl.log(row_sum)


def _split_scale(scale: float) -> tuple[float, float]:
    hi = struct.unpack("f", struct.pack("f", scale))[0]
    return hi, scale - hi


# One config, so nothing is timed; through autotune like every kernel here, for one launch path.
@autotune(configs=[triton.Config({"BLOCK_D": 4}, num_warps=4)], key=["BLOCK_S"])
@triton.jit
def _pack_keys_values_kernel(
    k_ptr, v_ptr,  # k [B, S, Dk], v [B, S, Dv], any strides
    kv_ptr,  # [B, Dk + Dv, BLOCK_S] contiguous: row d < Dk is key dim d, row Dk + d value dim d; keys >= S are 0
    S, Dk, Dv,
    stride_kb, stride_ks, stride_kd,
    stride_vb, stride_vs, stride_vd,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Grid: (cdiv(Dk + Dv, BLOCK_D), B).
    b = tl.program_id(1).to(tl.int64)
    d = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    is_key = d < Dk
    is_value = (d >= Dk) & (d < Dk + Dv)
    key = tl.load(k_ptr + b * stride_kb + s[None, :] * stride_ks + d[:, None] * stride_kd,
                  mask=is_key[:, None] & (s[None, :] < S), other=0.0)
    value = tl.load(v_ptr + b * stride_vb + s[None, :] * stride_vs + (d - Dk)[:, None] * stride_vd,
                    mask=is_value[:, None] & (s[None, :] < S), other=0.0)
    tl.store(kv_ptr + (b * (Dk + Dv) + d[:, None]) * BLOCK_S + s[None, :], tl.where(is_key[:, None], key, value),
             mask=(is_key | is_value)[:, None])


def _pack_keys_values(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """[B, Dk + Dv, BLOCK_S] buffer of keys and values for the attention kernels (see the module docstring).
    Raises ValueError for a score row the GPU kernels cannot hold."""
    batch, num_keys, key_dim = key.shape
    if key.device.type == "cuda" and key.dtype == torch.float64 and num_keys > _FP64_MAX_KEYS_ON_GPU:
        raise ValueError(f"Triton short_attention holds the score row on chip: float64 takes at most "
                         f"{_FP64_MAX_KEYS_ON_GPU} keys on a GPU, got S = {num_keys}; use float32 or another backend")
    value_dim = value.shape[2]
    block_s = padded_block(num_keys)
    packed = torch.empty((batch, key_dim + value_dim, block_s), dtype=key.dtype, device=key.device)

    def grid(meta):
        return (triton.cdiv(key_dim + value_dim, meta["BLOCK_D"]), batch)

    _pack_keys_values_kernel[grid](key, value, packed, num_keys, key_dim, value_dim, *key.stride(), *value.stride(),
                                   BLOCK_S=block_s)
    return packed


def _pruner(configs_by_dtype, widest_fitting):
    """Config prune: the config list for the operand dtype, minus configs that cannot hold the score row
    (``widest_fitting(config)`` is the largest BLOCK_S a config takes). Each list's last config takes
    every BLOCK_S; the first one that fits is the one used untimed (tests/test_triton_aot.py checks them
    for spills on sm_90 at ANN's S)."""

    def prune(configs, args):
        candidates = configs_by_dtype[args["q_ptr"].element_size()]
        return [c for c in candidates if args["BLOCK_S"] <= widest_fitting(c)] or candidates[-1:]

    return prune


def _config(block_n, block_d, num_warps, num_stages, max_block_s):
    return triton.Config({"BLOCK_N": block_n, "BLOCK_D": block_d, "MAX_BLOCK_S": max_block_s},
                         num_warps=num_warps, num_stages=num_stages)


def _widest_fitting(config):
    return config.kwargs["MAX_BLOCK_S"]


# By operand bytes. Half and fp32 tiles run on tensor cores; fp32's tf32x3 split triples its operand
# registers, so its chunks are narrower. fp64 runs plain FMA code whose size grows with
# BLOCK_N * BLOCK_S * BLOCK_D. BLOCK_N = 64 first: 128 row tiles per image at N = 8192, so B = 2 fills
# 132 SMs. MAX_BLOCK_S is the widest score row a config holds without spilling (1024: the narrowest,
# kept for very wide S even where it spills).
_FORWARD_CONFIGS = {
    2: [_config(64, 64, 4, 3, 128), _config(128, 64, 8, 3, 128), _config(16, 32, 4, 2, 1024)],
    4: [_config(64, 32, 8, 3, 128), _config(16, 16, 4, 1, 1024)],
    8: [_config(32, 16, 4, 2, 128), _config(16, 16, 8, 1, 1024)],
}


def _all_configs(configs_by_dtype):
    return [c for configs in configs_by_dtype.values() for c in configs]


@autotune(configs=_all_configs(_FORWARD_CONFIGS), key=["rows_class", "BLOCK_S", "Dk", "Dv"],
          prune=_pruner(_FORWARD_CONFIGS, _widest_fitting))
@triton.jit
def _short_attention_forward_kernel(
    q_ptr, kv_ptr, out_ptr, lse_ptr,  # q [B,N,Dk], kv packed [B,Dk+Dv,BLOCK_S], out [B,N,Dv], lse [B,N] fp32
    N, S,
    rows_class,  # size_class(B * N): read only by the autotune key
    scale_hi, scale_lo,
    stride_qb, stride_qn, stride_qd,
    stride_ob, stride_on, stride_od,
    Dk: tl.constexpr,
    Dv: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MAX_BLOCK_S: tl.constexpr,  # read by the config prune only
    INTERPRET: tl.constexpr,
):
    # Grid: (cdiv(N, BLOCK_N), B). One program owns BLOCK_N query rows and all S keys.
    b = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # int64 indices: every offset is 64-bit (tests/test_triton_aot.py checks the compiled code).
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    dtype = q_ptr.dtype.element_ty
    stat_dtype = tl.float64 if dtype == tl.float64 else tl.float32
    q_rows = q_ptr + b * stride_qb + n[:, None] * stride_qn
    kv_base = kv_ptr + b * (Dk + Dv) * BLOCK_S

    scores = tl.zeros([BLOCK_N, BLOCK_S], dtype=stat_dtype)
    for d0 in range(0, Dk, BLOCK_D):
        dk = d0 + d
        q = tl.load(q_rows + dk[None, :] * stride_qd, mask=(n[:, None] < N) & (dk[None, :] < Dk),
                    other=0.0)
        k_t = tl.load(kv_base + dk[:, None] * BLOCK_S + s[None, :], mask=dk[:, None] < Dk, other=0.0)
        scores = dot(q, k_t, scores, "tf32x3", INTERPRET)

    p, lse = _softmax_rows(scores, s < S, scale_hi, scale_lo)
    tl.store(lse_ptr + b * N + n, lse.to(tl.float32), mask=n < N)

    p = p.to(dtype)
    out_rows = out_ptr + b * stride_ob + n[:, None] * stride_on
    for d0 in range(0, Dv, BLOCK_D):
        dv = d0 + d
        v = tl.load(kv_base + (Dk + dv)[None, :] * BLOCK_S + s[:, None], mask=dv[None, :] < Dv, other=0.0)
        out = dot(p, v, tl.zeros([BLOCK_N, BLOCK_D], dtype=stat_dtype), "tf32x3", INTERPRET)
        tl.store(out_rows + dv[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
                 mask=(n[:, None] < N) & (dv[None, :] < Dv))


# The rows kernel holds two score-sized tiles (P and dP), so its 64-row tiles take 8 warps.
_BACKWARD_ROWS_CONFIGS = {
    2: [_config(64, 64, 8, 3, 128), _config(32, 64, 4, 3, 128), _config(16, 32, 4, 2, 1024)],
    4: [_config(64, 32, 8, 3, 128), _config(16, 16, 4, 1, 1024)],
    8: [_config(32, 16, 8, 2, 128), _config(16, 16, 8, 1, 1024)],
}


@autotune(configs=_all_configs(_BACKWARD_ROWS_CONFIGS), key=["rows_class", "BLOCK_S", "Dk", "Dv"],
          prune=_pruner(_BACKWARD_ROWS_CONFIGS, _widest_fitting))
@triton.jit
def _short_attention_backward_rows_kernel(
    grad_out_ptr, q_ptr, kv_ptr,  # grad_out [B,N,Dv], q [B,N,Dk], kv packed [B,Dk+Dv,BLOCK_S]
    grad_q_ptr,  # [B, N, Dk], any strides
    p_ptr, grad_s_ptr,  # workspaces [B, N, WS] contiguous, input dtype
    N, S, WS,  # WS: workspace row length, S rounded up to 16
    rows_class,  # size_class(B * N): read only by the autotune key
    scale_hi, scale_lo,
    stride_gb, stride_gn, stride_gd,
    stride_qb, stride_qn, stride_qd,
    stride_dqb, stride_dqn, stride_dqd,
    Dk: tl.constexpr,
    Dv: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MAX_BLOCK_S: tl.constexpr,  # read by the config prune only
    INTERPRET: tl.constexpr,
):
    # Grid: (cdiv(N, BLOCK_N), B). One program owns BLOCK_N query rows: their dQ, P and dS rows.
    b = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # int64 indices: every offset is 64-bit (tests/test_triton_aot.py checks the compiled code).
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    row_ok = n < N
    dtype = q_ptr.dtype.element_ty
    stat_dtype = tl.float64 if dtype == tl.float64 else tl.float32
    q_rows = q_ptr + b * stride_qb + n[:, None] * stride_qn
    g_rows = grad_out_ptr + b * stride_gb + n[:, None] * stride_gn
    kv_base = kv_ptr + b * (Dk + Dv) * BLOCK_S

    # Recompute P with its own row max and sum rather than from the forward's lse: the whole row is
    # on chip, and a P consistent with this kernel's scores keeps dS exactly 0 on saturated rows
    # (|scores| in the hundreds), where exp(s - lse) would amplify rounding differences between the
    # two kernels' score sums. Padded keys and rows past N get P = 0.
    scores = tl.zeros([BLOCK_N, BLOCK_S], dtype=stat_dtype)
    for d0 in range(0, Dk, BLOCK_D):
        dk = d0 + d
        q = tl.load(q_rows + dk[None, :] * stride_qd, mask=row_ok[:, None] & (dk[None, :] < Dk),
                    other=0.0)
        k_t = tl.load(kv_base + dk[:, None] * BLOCK_S + s[None, :], mask=dk[:, None] < Dk, other=0.0)
        scores = dot(q, k_t, scores, "tf32x3", INTERPRET)
    p, _ = _softmax_rows(scores, s < S, scale_hi, scale_lo)
    p = tl.where(row_ok[:, None], p, 0.0)

    # dP = dO V^T.
    grad_p = tl.zeros([BLOCK_N, BLOCK_S], dtype=stat_dtype)
    for d0 in range(0, Dv, BLOCK_D):
        dv = d0 + d
        g = tl.load(g_rows + dv[None, :] * stride_gd, mask=row_ok[:, None] & (dv[None, :] < Dv),
                    other=0.0)
        v_t = tl.load(kv_base + (Dk + dv)[:, None] * BLOCK_S + s[None, :], mask=dv[:, None] < Dv, other=0.0)
        grad_p = dot(g, v_t, grad_p, "tf32x3", INTERPRET)

    # rowsum(dO * O) == rowsum(P * dP) since O = P V; the latter needs no pass over O.
    delta = tl.sum(p * grad_p, axis=1)
    grad_s = _scaled(p * (grad_p - delta[:, None]), scale_hi, scale_lo).to(dtype)

    workspace_offsets = (b * N + n[:, None]) * WS + s[None, :]
    workspace_mask = row_ok[:, None] & (s[None, :] < WS)
    tl.store(p_ptr + workspace_offsets, p.to(dtype), mask=workspace_mask)
    tl.store(grad_s_ptr + workspace_offsets, grad_s, mask=workspace_mask)

    # dQ = dS K.
    dq_rows = grad_q_ptr + b * stride_dqb + n[:, None] * stride_dqn
    for d0 in range(0, Dk, BLOCK_D):
        dk = d0 + d
        k = tl.load(kv_base + dk[None, :] * BLOCK_S + s[:, None], mask=dk[None, :] < Dk, other=0.0)
        grad_q = dot(grad_s, k, tl.zeros([BLOCK_N, BLOCK_D], dtype=stat_dtype), "tf32x3", INTERPRET)
        tl.store(dq_rows + dk[None, :] * stride_dqd, grad_q.to(grad_q_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (dk[None, :] < Dk))


@triton.jit
def _weighted_row_sum(weights_ptr, x_ptr, partial_ptr, b, split, num_splits, column_block,
                      N, S, WS, rows_per_split, stride_xb, stride_xn, stride_xd,
                      D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      INTERPRET: tl.constexpr):
    """partial[b, split, :, cols] = weights[b, rows, :]^T x[b, rows, cols] over this split's query rows,
    summed in row order and written once (cols: column block ``column_block`` of D)."""
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    cols = column_block.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    dtype = x_ptr.dtype.element_ty
    stat_dtype = tl.float64 if dtype == tl.float64 else tl.float32
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, N)
    x_base = x_ptr + b * stride_xb + cols[None, :] * stride_xd
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=stat_dtype)
    for n0 in range(row_start, row_end, BLOCK_N):
        n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = n < row_end
        weights = tl.load(weights_ptr + (b * N + n[:, None]) * WS + s[None, :],
                          mask=row_ok[:, None] & (s[None, :] < WS), other=0.0)
        x = tl.load(x_base + n[:, None] * stride_xn, mask=row_ok[:, None] & (cols[None, :] < D), other=0.0)
        acc = dot(tl.trans(weights), x, acc, "tf32x3", INTERPRET)
    tl.store(partial_ptr + ((b * num_splits + split) * S + s[:, None]) * D + cols[None, :], acc,
             mask=(s[:, None] < S) & (cols[None, :] < D))


# Registers: the [BLOCK_S, BLOCK_D] accumulator; operand tiles stream through shared memory. Wider column
# blocks re-read the P/dS rows fewer times.
_BACKWARD_KEYS_CONFIGS = {
    2: [_config(64, 64, 4, 3, 128), _config(64, 128, 8, 3, 128), _config(16, 16, 4, 2, 1024)],
    4: [_config(32, 32, 4, 3, 128), _config(16, 16, 4, 2, 1024)],
    8: [_config(32, 16, 4, 2, 128), _config(16, 16, 8, 1, 1024)],
}
_WIDEST_KEYS_BLOCK_D = max(c.kwargs["BLOCK_D"] for c in _all_configs(_BACKWARD_KEYS_CONFIGS))


@autotune(configs=_all_configs(_BACKWARD_KEYS_CONFIGS), key=["rows_class", "BLOCK_S", "Dk", "Dv"],
          prune=_pruner(_BACKWARD_KEYS_CONFIGS, _widest_fitting))
@triton.jit
def _short_attention_backward_keys_kernel(
    grad_out_ptr, q_ptr,  # grad_out [B,N,Dv], q [B,N,Dk], any strides
    p_ptr, grad_s_ptr,  # the rows kernel's workspaces [B, N, WS]
    dk_partial_ptr, dv_partial_ptr,  # [B, num_splits, S, Dk] / [..., Dv] contiguous, fp32 (fp64 for fp64)
    N, S, WS, rows_per_split,
    rows_class,  # size_class(B * N): read only by the autotune key
    stride_gb, stride_gn, stride_gd,
    stride_qb, stride_qn, stride_qd,
    Dk: tl.constexpr,
    Dv: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MAX_BLOCK_S: tl.constexpr,  # read by the config prune only
    INTERPRET: tl.constexpr,
):
    # Grid: (cdiv(Dk, BLOCK_D) + cdiv(Dv, BLOCK_D), num_splits, B). Column blocks of [dK | dV] side by side:
    # dK = dS^T Q first, then dV = P^T dO.
    column_block = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = tl.program_id(2).to(tl.int64)
    key_blocks: tl.constexpr = triton.cdiv(Dk, BLOCK_D)
    if column_block < key_blocks:
        _weighted_row_sum(grad_s_ptr, q_ptr, dk_partial_ptr, b, split, num_splits, column_block,
                          N, S, WS, rows_per_split, stride_qb, stride_qn, stride_qd,
                          Dk, BLOCK_S, BLOCK_N, BLOCK_D, INTERPRET)
    else:
        _weighted_row_sum(p_ptr, grad_out_ptr, dv_partial_ptr, b, split, num_splits, column_block - key_blocks,
                          N, S, WS, rows_per_split, stride_gb, stride_gn, stride_gd,
                          Dv, BLOCK_S, BLOCK_N, BLOCK_D, INTERPRET)


def short_attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(query key^T * scale) value.

    Args:
        query: [B, N, Dk], key: [B, S, Dk], value: [B, S, Dv]; any strides, one floating dtype.
        scale: multiplier of the scores.
    Returns:
        out [B, N, Dv] in query's layout (see empty_like_layout), lse [B, N] fp32 contiguous.
    """
    batch, num_queries, key_dim = query.shape
    num_keys, value_dim = value.shape[1], value.shape[2]
    out = empty_like_layout(query, num_queries, value_dim)
    lse = torch.empty((batch, num_queries), dtype=torch.float32, device=query.device)
    if out.numel() == 0:
        return out, lse
    packed = _pack_keys_values(key, value)

    def grid(meta):
        return (triton.cdiv(num_queries, meta["BLOCK_N"]), batch)

    _short_attention_forward_kernel[grid](
        query, packed, out, lse,
        num_queries, num_keys, size_class(batch * num_queries), *_split_scale(scale),
        *query.stride(), *out.stride(),
        Dk=key_dim, Dv=value_dim, BLOCK_S=packed.shape[2], INTERPRET=INTERPRET,
    )
    return out, lse


def _split_rows(num_queries: int, programs_per_split: int, device) -> int:
    """Query rows per split of the keys kernel: a multiple of _SPLIT_ALIGN, with enough splits to give
    every SM a program."""
    splits = max(1, triton.cdiv(target_programs(device), programs_per_split))
    return max(_SPLIT_ALIGN, num_queries // splits // _SPLIT_ALIGN * _SPLIT_ALIGN)


def short_attention_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`short_attention_forward`.

    ``out`` and ``lse`` are part of the op schema but not read: the whole score row is on chip, so P
    is recomputed with its own normalisation and rowsum(dO * O) as the equal rowsum(P * dP).

    Returns:
        (grad_query, grad_key, grad_value), each in the layout of its input.
    """
    batch, num_queries, key_dim = query.shape
    num_keys, value_dim = value.shape[1], value.shape[2]
    grad_query = empty_like_layout(query, num_queries, key_dim)
    grad_key = empty_like_layout(key, num_keys, key_dim)
    grad_value = empty_like_layout(value, num_keys, value_dim)
    if num_queries == 0 or num_keys == 0 or batch == 0:
        return grad_query, grad_key.zero_(), grad_value.zero_()
    packed = _pack_keys_values(key, value)
    block_s = packed.shape[2]
    rows_class = size_class(batch * num_queries)

    workspace_keys = triton.cdiv(num_keys, _WORKSPACE_KEY_ALIGN) * _WORKSPACE_KEY_ALIGN
    probabilities = torch.empty((batch, num_queries, workspace_keys), dtype=query.dtype, device=query.device)
    grad_scores = torch.empty_like(probabilities)

    def rows_grid(meta):
        return (triton.cdiv(num_queries, meta["BLOCK_N"]), batch)

    _short_attention_backward_rows_kernel[rows_grid](
        grad_out, query, packed, grad_query, probabilities, grad_scores,
        num_queries, num_keys, workspace_keys, rows_class, *_split_scale(scale),
        *grad_out.stride(), *query.stride(), *grad_query.stride(),
        Dk=key_dim, Dv=value_dim, BLOCK_S=block_s, INTERPRET=INTERPRET,
    )

    column_blocks = triton.cdiv(key_dim, _WIDEST_KEYS_BLOCK_D) + triton.cdiv(value_dim, _WIDEST_KEYS_BLOCK_D)
    rows_per_split = _split_rows(num_queries, batch * column_blocks, query.device)
    num_splits = triton.cdiv(num_queries, rows_per_split)
    partial_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    dk_partial = torch.empty((batch, num_splits, num_keys, key_dim), dtype=partial_dtype, device=query.device)
    dv_partial = torch.empty((batch, num_splits, num_keys, value_dim), dtype=partial_dtype, device=query.device)

    def keys_grid(meta):
        return (triton.cdiv(key_dim, meta["BLOCK_D"]) + triton.cdiv(value_dim, meta["BLOCK_D"]), num_splits, batch)

    _short_attention_backward_keys_kernel[keys_grid](
        grad_out, query, probabilities, grad_scores, dk_partial, dv_partial,
        num_queries, num_keys, workspace_keys, rows_per_split, rows_class,
        *grad_out.stride(), *query.stride(),
        Dk=key_dim, Dv=value_dim, BLOCK_S=block_s, INTERPRET=INTERPRET,
    )
    sum_chunks(dk_partial, grad_key)
    sum_chunks(dv_partial, grad_value)
    return grad_query, grad_key, grad_value
