"""Triton short-key attention: softmax(q k^T * scale) v with few keys (S <= 1024, ANN uses 110).

The whole score row [BLOCK_N, BLOCK_S] (BLOCK_S = next_power_of_2(S), padding keys masked with -inf)
stays on chip, so there is no online softmax and no N x S tensor in memory; the forward writes only
out and lse [B, N] (fp32), and the backward recomputes P from the scores. Head dims Dk, Dv (up to
1024, any value) are walked in BLOCK_D chunks with masks. Every operand may be a strided view; the
main case is the channel-first view of a [B, D, H, W] feature map, stride (D*N, 1, N), whose tiles
load coalesced along N.

Precision: softmax statistics are fp32 (fp64 for fp64 inputs). fp16/bf16 products run on tensor
cores with fp32 accumulation (P and dS are rounded to the input dtype before their products, as in
FlashAttention). fp32 products use input_precision="ieee", i.e. true fp32 FMA and no TF32, because
these kernels promise fp32 accuracy; this costs tensor-core speed for fp32 inputs.

Backward: dK and dV are sums over all N queries. Instead of float atomics, program (chunk, b) sums
its chunk of queries into a private fp32 workspace slice [S, D] (read-modify-write in a fixed tile
order, the first tile overwrites), and a second kernel adds the chunks in index order. The result
is bitwise reproducible for a given autotune config, and the chunk count is chosen to fill the GPU
even at B=1.
"""

import struct

import torch
import triton
import triton.language as tl

from annkernels.ops._common import empty_like_layout
from annkernels.triton.common import INTERPRET, autotune, dot, padded_block, size_class, sum_chunks, target_programs

# Query chunks of the backward are multiples of this; it must be a multiple of every BLOCK_N below.
_CHUNK_ALIGN = 64
# Budgets for the config prune: 32-bit registers per thread held by the tiles named in each kernel's
# estimate (two per fp64 value), and shared memory (sm_90 allows 227 KB per block). The estimate is
# rough; tests/test_triton_aot.py checks that no config it keeps spills registers on sm_90 at ANN's S.
_MAX_REGISTERS_PER_THREAD = 80
_MAX_SHARED_BYTES = 200 * 1024


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


def _pruner(tensor_core_configs, fma_configs, register_values):
    """Config prune: the config list for the dtype's dot path, minus configs whose
    ``register_values(BLOCK_N, BLOCK_S, BLOCK_D)`` or pipelined operand tiles exceed the budgets
    (rough estimates; tests/test_triton_aot.py checks the compiled shared memory and spills)."""

    def fits(config, block_s, elem_bytes):
        block_n, block_d = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_D"]
        registers_per_value = 2 if elem_bytes == 8 else 1  # statistics are fp32, fp64 for fp64 inputs
        registers = registers_per_value * register_values(block_n, block_s, block_d) / (32 * config.num_warps)
        # One query-side and one key-side operand tile per stage, plus the [BLOCK_N, BLOCK_S] operand.
        shared = (max(config.num_stages, 1) * (block_n + block_s) * block_d + block_n * block_s) * elem_bytes
        return registers <= _MAX_REGISTERS_PER_THREAD and shared <= _MAX_SHARED_BYTES

    def prune(configs, args):
        block_s, elem_bytes = args["BLOCK_S"], args["q_ptr"].element_size()
        # The interpreter computes exactly either way and runs fewer, larger steps with the wide tiles.
        candidates = fma_configs if elem_bytes >= 4 and not INTERPRET else tensor_core_configs
        # The last config of each list is the narrowest; it is kept for very wide S even if it spills.
        return [c for c in candidates if fits(c, block_s, elem_bytes)] or candidates[-1:]

    return prune


# fp16/bf16 dots run on tensor cores and like wide BLOCK_D; fp32/fp64 dots are unrolled FMA code
# whose size grows with BLOCK_N * BLOCK_S * BLOCK_D, so their chunks stay narrow.
_FORWARD_TENSOR_CORE_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_D": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_D": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 16, "BLOCK_D": 32}, num_warps=8, num_stages=1),
]
_FORWARD_FMA_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "BLOCK_D": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 16, "BLOCK_D": 16}, num_warps=8, num_stages=1),
]
# Registers: the score/P tile and one output tile.
_prune_forward_configs = _pruner(_FORWARD_TENSOR_CORE_CONFIGS, _FORWARD_FMA_CONFIGS,
                                lambda block_n, block_s, block_d: block_n * (block_s + block_d))


@autotune(configs=_FORWARD_TENSOR_CORE_CONFIGS + _FORWARD_FMA_CONFIGS, key=["rows_class", "BLOCK_S", "Dk", "Dv"],
          prune=_prune_forward_configs)
@triton.jit
def _short_attention_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,  # q [B,N,Dk], k [B,S,Dk], v [B,S,Dv], out [B,N,Dv], lse [B,N] fp32
    N, S, Dk, Dv,
    rows_class,  # size_class(B * N): read only by the autotune key
    scale_hi, scale_lo,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_ks, stride_kd,
    stride_vb, stride_vs, stride_vd,
    stride_ob, stride_on, stride_od,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # Grid: (cdiv(N, BLOCK_N), B). One program owns BLOCK_N query rows and all S keys.
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    stat_dtype = tl.float64 if q_ptr.dtype.element_ty == tl.float64 else tl.float32
    q_base = q_ptr + b * stride_qb
    k_base = k_ptr + b * stride_kb
    v_base = v_ptr + b * stride_vb

    scores = tl.zeros([BLOCK_N, BLOCK_S], dtype=stat_dtype)
    for d0 in range(0, Dk, BLOCK_D):
        dk = d0 + d
        q = tl.load(q_base + n[:, None] * stride_qn + dk[None, :] * stride_qd,
                    mask=(n[:, None] < N) & (dk[None, :] < Dk), other=0.0)
        k_t = tl.load(k_base + s[None, :] * stride_ks + dk[:, None] * stride_kd,
                      mask=(s[None, :] < S) & (dk[:, None] < Dk), other=0.0)
        scores = dot(q, k_t, scores, "ieee", INTERPRET)

    p, lse = _softmax_rows(scores, s < S, scale_hi, scale_lo)
    tl.store(lse_ptr + b * N + n, lse.to(tl.float32), mask=n < N)

    p = p.to(v_ptr.dtype.element_ty)
    for d0 in range(0, Dv, BLOCK_D):
        dv = d0 + d
        v = tl.load(v_base + s[:, None] * stride_vs + dv[None, :] * stride_vd,
                    mask=(s[:, None] < S) & (dv[None, :] < Dv), other=0.0)
        out = dot(p, v, tl.zeros([BLOCK_N, BLOCK_D], dtype=stat_dtype), "ieee", INTERPRET)
        tl.store(out_ptr + b * stride_ob + n[:, None] * stride_on + dv[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=(n[:, None] < N) & (dv[None, :] < Dv))


# One list serves both dot paths: wider tiles (32/32 with 4 warps, 64/32 with 8) spill on sm_90.
_BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "BLOCK_D": 16}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_N": 16, "BLOCK_D": 16}, num_warps=8, num_stages=1),
]
# Registers: P and dP tiles, a dQ tile and a dK/dV workspace tile.
_prune_backward_configs = _pruner(
    _BACKWARD_CONFIGS, _BACKWARD_CONFIGS,
    lambda block_n, block_s, block_d: 2 * block_n * block_s + (block_n + block_s) * block_d)


@autotune(configs=_BACKWARD_CONFIGS, key=["rows_class", "BLOCK_S", "Dk", "Dv"], prune=_prune_backward_configs)
@triton.jit
def _short_attention_backward_kernel(
    grad_out_ptr, q_ptr, k_ptr, v_ptr,  # grad_out [B,N,Dv], q [B,N,Dk], k/v [B,S,D]
    grad_q_ptr,  # [B, N, Dk], any strides
    dk_partial_ptr, dv_partial_ptr,  # fp32 workspaces [B, num_chunks, S, Dk] / [..., Dv], contiguous
    N, S, Dk, Dv, CHUNK_N,
    rows_class,  # size_class(B * N): read only by the autotune key
    scale_hi, scale_lo,
    stride_gb, stride_gn, stride_gd,
    stride_qb, stride_qn, stride_qd,
    stride_kb, stride_ks, stride_kd,
    stride_vb, stride_vs, stride_vd,
    stride_dqb, stride_dqn, stride_dqd,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # Grid: (num_chunks, B). Program (chunk, b) walks query tiles of rows [chunk*CHUNK_N, +CHUNK_N),
    # writes their dQ rows, and accumulates their dK/dV contributions into its workspace slice.
    chunk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    num_chunks = tl.num_programs(0)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    stat_dtype = tl.float64 if q_ptr.dtype.element_ty == tl.float64 else tl.float32
    dtype = q_ptr.dtype.element_ty
    q_base = q_ptr + b * stride_qb
    k_base = k_ptr + b * stride_kb
    v_base = v_ptr + b * stride_vb
    g_base = grad_out_ptr + b * stride_gb
    dq_base = grad_q_ptr + b * stride_dqb
    slice_index = b * num_chunks + chunk
    dk_slice = dk_partial_ptr + slice_index * S * Dk + s[:, None] * Dk
    dv_slice = dv_partial_ptr + slice_index * S * Dv + s[:, None] * Dv

    chunk_start = chunk * CHUNK_N
    chunk_end = tl.minimum(chunk_start + CHUNK_N, N)
    for n0 in range(chunk_start, chunk_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        row_ok = n < chunk_end
        accumulate = n0 > chunk_start
        # The previous tile's workspace stores may come from other threads than this tile's loads of
        # the same addresses; a CTA barrier orders them.
        tl.debug_barrier()

        # Recompute P with its own row max and sum rather than from the forward's lse: the whole row is
        # on chip, and a P consistent with this kernel's scores keeps dS exactly 0 on saturated rows
        # (|scores| in the hundreds), where exp(s - lse) would amplify rounding differences between the
        # two kernels' score sums. Padded keys and rows outside the chunk get P = 0.
        scores = tl.zeros([BLOCK_N, BLOCK_S], dtype=stat_dtype)
        for d0 in range(0, Dk, BLOCK_D):
            dk = d0 + d
            q = tl.load(q_base + n[:, None] * stride_qn + dk[None, :] * stride_qd,
                        mask=row_ok[:, None] & (dk[None, :] < Dk), other=0.0)
            k_t = tl.load(k_base + s[None, :] * stride_ks + dk[:, None] * stride_kd,
                          mask=(s[None, :] < S) & (dk[:, None] < Dk), other=0.0)
            scores = dot(q, k_t, scores, "ieee", INTERPRET)
        p, _ = _softmax_rows(scores, s < S, scale_hi, scale_lo)
        p = tl.where(row_ok[:, None], p, 0.0)

        # dP = dO V^T, and dV += P^T dO in the same pass over dO.
        grad_p = tl.zeros([BLOCK_N, BLOCK_S], dtype=stat_dtype)
        p_t = tl.trans(p.to(dtype))
        for d0 in range(0, Dv, BLOCK_D):
            dv = d0 + d
            g = tl.load(g_base + n[:, None] * stride_gn + dv[None, :] * stride_gd,
                        mask=row_ok[:, None] & (dv[None, :] < Dv), other=0.0)
            v_t = tl.load(v_base + s[None, :] * stride_vs + dv[:, None] * stride_vd,
                          mask=(s[None, :] < S) & (dv[:, None] < Dv), other=0.0)
            grad_p = dot(g, v_t, grad_p, "ieee", INTERPRET)
            dv_ptrs = dv_slice + dv[None, :]
            dv_mask = (s[:, None] < S) & (dv[None, :] < Dv)
            dv_acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=stat_dtype)
            if accumulate:
                dv_acc = tl.load(dv_ptrs, mask=dv_mask, other=0.0).to(stat_dtype)
            dv_acc = dot(p_t, g, dv_acc, "ieee", INTERPRET)
            tl.store(dv_ptrs, dv_acc, mask=dv_mask)

        # rowsum(dO * O) == rowsum(P * dP) since O = P V; the latter needs no pass over O.
        delta = tl.sum(p * grad_p, axis=1)
        grad_s = _scaled(p * (grad_p - delta[:, None]), scale_hi, scale_lo).to(dtype)
        grad_s_t = tl.trans(grad_s)

        # dQ = dS K (rows owned by this program), dK += dS^T Q.
        for d0 in range(0, Dk, BLOCK_D):
            dk = d0 + d
            k = tl.load(k_base + s[:, None] * stride_ks + dk[None, :] * stride_kd,
                        mask=(s[:, None] < S) & (dk[None, :] < Dk), other=0.0)
            grad_q = dot(grad_s, k, tl.zeros([BLOCK_N, BLOCK_D], dtype=stat_dtype), "ieee", INTERPRET)
            tl.store(dq_base + n[:, None] * stride_dqn + dk[None, :] * stride_dqd,
                     grad_q.to(grad_q_ptr.dtype.element_ty), mask=row_ok[:, None] & (dk[None, :] < Dk))
            q = tl.load(q_base + n[:, None] * stride_qn + dk[None, :] * stride_qd,
                        mask=row_ok[:, None] & (dk[None, :] < Dk), other=0.0)
            dk_ptrs = dk_slice + dk[None, :]
            dk_mask = (s[:, None] < S) & (dk[None, :] < Dk)
            dk_acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=stat_dtype)
            if accumulate:
                dk_acc = tl.load(dk_ptrs, mask=dk_mask, other=0.0).to(stat_dtype)
            dk_acc = dot(grad_s_t, q, dk_acc, "ieee", INTERPRET)
            tl.store(dk_ptrs, dk_acc, mask=dk_mask)


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

    def grid(meta):
        return (triton.cdiv(num_queries, meta["BLOCK_N"]), batch)

    _short_attention_forward_kernel[grid](
        query, key, value, out, lse,
        num_queries, num_keys, key_dim, value_dim, size_class(batch * num_queries), *_split_scale(scale),
        *query.stride(), *key.stride(), *value.stride(), *out.stride(),
        BLOCK_S=padded_block(num_keys), INTERPRET=INTERPRET,
    )
    return out, lse


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

    per_batch = max(1, target_programs(query.device) // batch)
    chunk_n = triton.cdiv(triton.cdiv(num_queries, per_batch), _CHUNK_ALIGN) * _CHUNK_ALIGN
    num_chunks = triton.cdiv(num_queries, chunk_n)
    partial_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    dk_partial = torch.empty((batch, num_chunks, num_keys, key_dim), dtype=partial_dtype, device=query.device)
    dv_partial = torch.empty((batch, num_chunks, num_keys, value_dim), dtype=partial_dtype, device=query.device)

    _short_attention_backward_kernel[(num_chunks, batch)](
        grad_out, query, key, value, grad_query, dk_partial, dv_partial,
        num_queries, num_keys, key_dim, value_dim, chunk_n, size_class(batch * num_queries), *_split_scale(scale),
        *grad_out.stride(), *query.stride(), *key.stride(), *value.stride(), *grad_query.stride(),
        BLOCK_S=padded_block(num_keys), INTERPRET=INTERPRET,
    )
    sum_chunks(dk_partial, grad_key)
    sum_chunks(dv_partial, grad_value)
    return grad_query, grad_key, grad_value
