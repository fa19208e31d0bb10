"""pyramid_pool: adaptive average pooling at several scales, flattened and concatenated.

The public function validates, resolves the backend and calls the custom op `annkernels::pyramid_pool`,
whose autograd formula calls `annkernels::pyramid_pool_grad`. Both forward to the backend's kernels
(csrc/{cpu,cuda}/pyramid_pool.*, annkernels/triton/pyramid_pool.py, annkernels/ops/composite.py); "reference"
stays in plain PyTorch.

`pyramid_pool_pair` pools two maps of one size together (custom op `annkernels::pyramid_pool_pair`, whose
autograd formula calls `annkernels::pyramid_pool_pair_grad`): APNB and AFNB pool the key map and the value
source of a block that way, one launch per direction on the GPU backends.
"""

from __future__ import annotations

from typing import Sequence

import torch

from annkernels import _backend
from annkernels.ops import reference
from annkernels.ops._common import check_scales, check_tensor, kernel


def pyramid_pool(x: torch.Tensor, scales: Sequence[int] = (1, 3, 6, 8), backend: str | None = None) -> torch.Tensor:
    """Pyramid sampling of ANN: adaptive average pooling at every scale, concatenated.

    Args:
        x: [B, C, H, W] float64/float32/float16/bfloat16, contiguous or channels_last; any H, W >= 1.
        scales: output sizes s of the square pools; S = sum(s * s) (110 for (1, 3, 6, 8)).
        backend: "auto", "cpu", "cuda", "triton", "composite", "reference", or None for the current default.

    Returns:
        [B, C, S] in x's dtype, equal to
        ``torch.cat([F.adaptive_avg_pool2d(x, s).flatten(2) for s in scales], 2)``.
    """
    check_tensor("x", x, 4, "[B, C, H, W]")
    scales = check_scales(scales)
    name = _backend.resolve(backend, x.device)
    if name == "reference":
        return reference.pyramid_pool(x, scales)
    return torch.ops.annkernels.pyramid_pool(x, scales, name)


# Backends with kernels that pool two maps, and take their gradients, in one pass (the CUDA and Triton kernels
# in one launch per direction; the CPU kernels share the bin geometry). The others pool each map on its own,
# with the same results.
PAIR_BACKENDS = ("cpu", "cuda", "triton")


def pyramid_pool_pair(first: torch.Tensor, second: torch.Tensor, scales: Sequence[int] = (1, 3, 6, 8),
                      backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pyramid_pool(first), pyramid_pool(second))``, in one pass over both maps where the backend can.

    Args:
        first, second: [B, C1, H, W] and [B, C2, H, W] as for `pyramid_pool`. Maps that differ in dtype,
            device, batch, height or width are pooled one at a time.
        scales, backend: as for `pyramid_pool`.

    Returns:
        ([B, C1, S], [B, C2, S]) in the maps' dtypes, equal to what `pyramid_pool` returns for each.
    """
    check_tensor("first", first, 4, "[B, C1, H, W]")
    check_tensor("second", second, 4, "[B, C2, H, W]")
    scales = check_scales(scales)
    name = _backend.resolve(backend, first.device)
    same_geometry = (first.dtype == second.dtype and first.device == second.device
                     and first.shape[0] == second.shape[0] and first.shape[2:] == second.shape[2:])
    if name not in PAIR_BACKENDS or not same_geometry:
        return pyramid_pool(first, scales, backend), pyramid_pool(second, scales, backend)
    return torch.ops.annkernels.pyramid_pool_pair(first, second, scales, name)


@torch.library.custom_op("annkernels::pyramid_pool", mutates_args=())
def _pyramid_pool(x: torch.Tensor, scales: list[int], backend: str) -> torch.Tensor:
    return kernel(backend, "pyramid_pool_forward")(x, scales)


@_pyramid_pool.register_fake
def _(x, scales, backend):
    return x.new_empty((x.shape[0], x.shape[1], sum(s * s for s in scales)))


@torch.library.custom_op("annkernels::pyramid_pool_grad", mutates_args=())
def _pyramid_pool_grad(grad_output: torch.Tensor, scales: list[int], height: int, width: int,
                       backend: str) -> torch.Tensor:
    return kernel(backend, "pyramid_pool_backward")(grad_output, scales, height, width)


@_pyramid_pool_grad.register_fake
def _(grad_output, scales, height, width, backend):
    return grad_output.new_empty((grad_output.shape[0], grad_output.shape[1], height, width))


def _setup_context(ctx, inputs, output):
    x, ctx.scales, ctx.backend = inputs
    ctx.height, ctx.width = x.shape[-2:]


def _backward(ctx, grad_output):
    grad_input = _pyramid_pool_grad(grad_output, ctx.scales, ctx.height, ctx.width, ctx.backend)
    return grad_input, None, None


_pyramid_pool.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("annkernels::pyramid_pool_pair", mutates_args=())
def _pyramid_pool_pair(first: torch.Tensor, second: torch.Tensor, scales: list[int],
                       backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return kernel(backend, "pyramid_pool_pair_forward")(first, second, scales)


@_pyramid_pool_pair.register_fake
def _(first, second, scales, backend):
    bins = sum(s * s for s in scales)
    return first.new_empty((*first.shape[:2], bins)), second.new_empty((*second.shape[:2], bins))


def _setup_pair_context(ctx, inputs, output):
    first, second, ctx.scales, ctx.backend = inputs
    ctx.height, ctx.width = first.shape[-2:]


@torch.library.custom_op("annkernels::pyramid_pool_pair_grad", mutates_args=())
def _pyramid_pool_pair_grad(grad_first: torch.Tensor, grad_second: torch.Tensor, scales: list[int], height: int,
                            width: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return kernel(backend, "pyramid_pool_pair_backward")(grad_first, grad_second, scales, height, width)


@_pyramid_pool_pair_grad.register_fake
def _(grad_first, grad_second, scales, height, width, backend):
    return (grad_first.new_empty((*grad_first.shape[:2], height, width)),
            grad_second.new_empty((*grad_second.shape[:2], height, width)))


def _pair_backward(ctx, grad_first, grad_second):
    if grad_first is not None and grad_second is not None:
        grads = _pyramid_pool_pair_grad(grad_first, grad_second, ctx.scales, ctx.height, ctx.width, ctx.backend)
    else:  # one output did not reach the loss: its map gets no gradient
        grads = [None if grad is None else _pyramid_pool_grad(grad, ctx.scales, ctx.height, ctx.width, ctx.backend)
                 for grad in (grad_first, grad_second)]
    return *grads, None, None


_pyramid_pool_pair.register_autograd(_pair_backward, setup_context=_setup_pair_context)
