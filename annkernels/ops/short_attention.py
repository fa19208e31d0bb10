"""short_attention: softmax(Q K^T * scale) V over a short key set (ANN's S = 110 pyramid samples).

The public function validates, resolves the backend and calls the custom op `annkernels::short_attention`,
which returns the output and the state its backward, `annkernels::short_attention_grad`, needs: the
probabilities on the CPU and in the composite formulation, the row log-sum-exp on GPUs (csrc/ops.cpp says why).
Both forward to the backend's kernels (csrc/{cpu,cuda}/short_attention.*, annkernels/triton/short_attention.py,
annkernels/ops/composite.py).
"""

from __future__ import annotations

import torch

from annkernels import _backend
from annkernels.ops import reference
from annkernels.ops._common import check_same, check_scale, check_tensor, empty_like_layout, kernel


def short_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """Fused attention of many queries over a few keys.

    Args:
        query: [B, N, Dk]; N may be 0 (an empty output, an empty query gradient, zero key and value
            gradients). The channel-first view ``x.flatten(2).transpose(1, 2)`` of a [B, Dk, H, W] map is
            taken as it is, without a copy.
        key: [B, S, Dk].
        value: [B, S, Dv]. S, Dk and Dv need not be powers of two.
        scale: multiplies the scores before the softmax; default Dk ** -0.5.
        backend: "auto", "cpu", "cuda", "triton", "composite", "reference", or None for the current default.

    Returns:
        [B, N, Dv] = softmax(query @ key^T * scale, dim=-1) @ value, in query's dtype. For a
        channel-first query the result is the channel-first view of a [B, Dv, N] tensor, so
        ``out.transpose(1, 2).reshape(B, Dv, H, W)`` is free.
    """
    check_tensor("query", query, 3, "[B, N, Dk]", empty_dim=1)
    check_tensor("key", key, 3, "[B, S, Dk]")
    check_tensor("value", value, 3, "[B, S, Dv]")
    check_same(("query", "key", "value"), (query, key, value))
    batch, _, key_dim = query.shape
    if key.shape[0] != batch or value.shape[0] != batch:
        raise ValueError(f"batch sizes differ: query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}")
    if key.shape[2] != key_dim:
        raise ValueError(f"query and key must share Dk (last dim), got query {tuple(query.shape)} and "
                         f"key {tuple(key.shape)}")
    if value.shape[1] != key.shape[1]:
        raise ValueError(f"key and value must have the same number of keys S (dim 1), got key "
                         f"{tuple(key.shape)} and value {tuple(value.shape)}")
    scale = key_dim**-0.5 if scale is None else check_scale(scale)
    name = _backend.resolve(backend, query.device)
    if query.shape[1] == 0 and name != "reference":
        # No rows for a kernel to work on: PyTorch's GEMMs give the empty output and the zero key and
        # value gradients on any device.
        name = "composite"
    if name == "reference":
        return reference.short_attention(query, key, value, scale)
    out, _ = torch.ops.annkernels.short_attention(query, key, value, scale, name)
    return out


@torch.library.custom_op("annkernels::short_attention", mutates_args=())
def _short_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return kernel(backend, "short_attention_forward")(query, key, value, scale)


# Read from the CPU kernels once, outside any tracing, so the fake below never re-derives it.
_CPU_KEY_ALIGNMENT = torch.ops.annkernels._short_attention_cpu_key_alignment() if _backend.NATIVE_CPU else None


def _softmax_state_like(query, key, backend):
    """The forward's second output (csrc/ops.cpp): P with the key axis padded on the CPU, P in the query's
    layout in the composite formulation, the row log-sum-exp on GPUs."""
    if backend == "composite":
        return empty_like_layout(query, query.shape[1], key.shape[1])
    if backend == "cpu":
        dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
        padded_keys = -(-key.shape[1] // _CPU_KEY_ALIGNMENT) * _CPU_KEY_ALIGNMENT
        return query.new_empty((query.shape[0], query.shape[1], padded_keys), dtype=dtype)
    return query.new_empty(query.shape[:2], dtype=torch.float32)


@_short_attention.register_fake
def _(query, key, value, scale, backend):
    return empty_like_layout(query, query.shape[1], value.shape[2]), _softmax_state_like(query, key, backend)


@torch.library.custom_op("annkernels::short_attention_grad", mutates_args=())
def _short_attention_grad(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          out: torch.Tensor, softmax_state: torch.Tensor, scale: float,
                          backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernel(backend, "short_attention_backward")(grad_out, query, key, value, out, softmax_state, scale)


@_short_attention_grad.register_fake
def _(grad_out, query, key, value, out, softmax_state, scale, backend):
    return (empty_like_layout(query, query.shape[1], query.shape[2]),
            empty_like_layout(key, key.shape[1], key.shape[2]),
            empty_like_layout(value, value.shape[1], value.shape[2]))


def _setup_context(ctx, inputs, output):
    query, key, value, ctx.scale, ctx.backend = inputs
    out, softmax_state = output
    ctx.save_for_backward(query, key, value, out, softmax_state)
    ctx.mark_non_differentiable(softmax_state)


def _backward(ctx, grad_out, _grad_softmax_state):
    query, key, value, out, softmax_state = ctx.saved_tensors
    grad_query, grad_key, grad_value = _short_attention_grad(grad_out, query, key, value, out, softmax_state,
                                                             ctx.scale, ctx.backend)
    return grad_query, grad_key, grad_value, None, None


_short_attention.register_autograd(_backward, setup_context=_setup_context)
