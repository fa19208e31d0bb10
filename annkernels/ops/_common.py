"""Input validation, the output-layout rule and kernel lookup shared by the op wrappers and the Triton
launchers."""

from __future__ import annotations

import importlib
import math

import torch

SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, tensor, ndim: int, layout: str, empty_dim: int | None = None) -> None:
    """Type, rank, dtype, and no empty dimension except ``empty_dim`` (which may be 0)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(tensor.shape)}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float64, float32, float16 or bfloat16, got {tensor.dtype}")
    if any(size == 0 for dim, size in enumerate(tensor.shape) if dim != empty_dim):
        raise ValueError(f"{name} must not be empty, got shape {tuple(tensor.shape)}")


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    first_name, first = names[0], tensors[0]
    for name, tensor in zip(names[1:], tensors[1:], strict=True):
        if tensor.dtype != first.dtype:
            raise TypeError(f"{first_name} and {name} must have the same dtype, got {first.dtype} and {tensor.dtype}")
        if tensor.device != first.device:
            raise ValueError(
                f"{first_name} and {name} must be on the same device, got {first.device} and {tensor.device}"
            )


def check_scales(scales) -> list[int]:
    try:
        values = list(scales)
    except TypeError:
        raise TypeError(f"scales must be a sequence of positive ints, got {scales!r}") from None
    if not values:
        raise ValueError("scales must not be empty")
    for s in values:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"scales must be positive ints, got {scales!r}")
        if s <= 0:
            raise ValueError(f"scales must be positive, got {scales!r}")
    return values


def check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a real number, got {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r} (it would turn every score into NaN or inf)")
    return float(scale)


def is_channel_first(tensor: torch.Tensor) -> bool:
    """True for a [B, rows, D] view of a [B, D, rows] buffer, the layout outputs and gradients inherit."""
    return tensor.shape[1] > 1 and tensor.shape[2] > 1 and tensor.stride(1) == 1


def empty_like_layout(like: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[B, rows, cols] in ``like``'s dtype, device and layout: a transposed [B, cols, rows] buffer when
    ``like`` is a channel-first view, so outputs and gradients keep the layout of the tensor they stand
    for. The Python side of annkernels::empty_like_layout (csrc/include/annkernels/checks.h)."""
    if is_channel_first(like):
        return like.new_empty((like.shape[0], cols, rows)).transpose(1, 2)
    return like.new_empty((like.shape[0], rows, cols))


def kernel(backend: str, name: str):
    """`name` (e.g. "short_attention_backward") for a concrete backend: the private C++ kernel op
    (``torch.ops.annkernels._<name>``, csrc/ops.cpp) or its Triton twin.

    C++ ops dispatch on the tensors' device themselves; Triton kernels live in annkernels/triton/<op>.py and
    the composite formulation in annkernels/ops/composite.py.
    """
    if backend == "composite":
        return getattr(importlib.import_module("annkernels.ops.composite"), name)
    if backend == "triton":
        op = next(op for op in ("pyramid_pool", "short_attention") if name.startswith(op))
        return getattr(importlib.import_module(f"annkernels.triton.{op}"), name)
    return getattr(torch.ops.annkernels, f"_{name}")
