"""What the Triton kernels share: the dot-product rule, the deterministic sum of per-chunk partials,
block sizes, grid sizing, and how autotune picks a config.

Autotune times its configs on a GPU. It takes the first config that fits, untimed, in the interpreter
(every config computes the same there) and when ``ANNKERNELS_TRITON_AUTOTUNE=0``: correctness tests
then JIT-compile one config per kernel and shape instead of all of them.

Timing launches and synchronizes, which CUDA-graph capture forbids. Each kernel times its configs on the
first call with a new autotune key (a new size class, S or dtype) and reuses the choice afterwards, so
a graph must be captured after one eager call at the same shapes (a warm-up); a first call inside
capture raises an error that says so instead of failing inside the CUDA driver.
"""

import os

import torch
import triton
import triton.language as tl
from triton.runtime.driver import driver

from annkernels import _backend

INTERPRET = _backend.TRITON_INTERPRET
AUTOTUNE_SWITCH = "ANNKERNELS_TRITON_AUTOTUNE"


def timing_configs() -> bool:
    """True when autotune times every candidate config, False when it takes the first one."""
    return not INTERPRET and os.environ.get(AUTOTUNE_SWITCH, "1") != "0"


def _benchmark(kernel_call, quantiles):
    if not timing_configs():
        # One config is left and the autotuner launches it next; nothing to time. Some Triton versions
        # call this even for a single config, and the interpreter has no driver to time with.
        return [0.0] * len(quantiles)
    return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


def _stream_capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_not_tuning_in_capture(kernel_name: str, num_candidates: int, capturing: bool) -> None:
    """Raise if ``kernel_name`` would time ``num_candidates`` configs while a CUDA graph is captured."""
    if capturing and num_candidates > 1:
        raise RuntimeError(
            f"annkernels: the Triton kernel {kernel_name} meets a new shape inside CUDA-graph capture and would "
            f"time its {num_candidates} configs there, which capture forbids. Call the op once at the same "
            f"shapes, dtype and device before capturing (a warm-up), or set {AUTOTUNE_SWITCH}=0 to use the "
            f"first fitting config untimed.")


def autotune(configs, key, prune=None):
    """``triton.autotune`` over ``configs`` with ``key``. ``prune(configs, args)`` returns the configs that
    can run with the launch's arguments (a dict by parameter name); see the module docstring for which
    of them are timed, and for CUDA-graph capture."""

    def decorator(kernel):
        # Triton calls this only on the first launch with a new autotune key, before any timing.
        def early_config_prune(configs, named_args, **kwargs):
            candidates = prune(configs, {**named_args, **kwargs}) if prune else configs
            if not timing_configs():
                return candidates[:1]
            check_not_tuning_in_capture(kernel.__name__, len(candidates), _stream_capturing())
            return candidates

        return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": early_config_prune},
                               do_bench=_benchmark)(kernel)

    return decorator


def size_class(rows: int) -> int:
    """Autotune key for a problem's row count: the power of two at or above it, at least 1024. Each size
    class gets its own timing (the best tile differs between N = 2048 and N = 8192) without a retune
    for every image size."""
    return max(1024, triton.next_power_of_2(rows))


def padded_block(size: int) -> int:
    """A block holding ``size`` elements: the next power of two, at least 16 (tl.dot's smallest side)."""
    return max(16, triton.next_power_of_2(size))


def target_programs(device) -> int:
    """Programs that fill ``device``: one per SM on a GPU; in the interpreter a few, so that the
    split-and-reduce paths run in tests."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@triton.jit
def dot(a, b, acc, FP32_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b in acc's dtype: tensor cores for fp16/bf16, ``FP32_PRECISION`` ("ieee": plain FMA,
    "tf32x3": fp32-accurate on tensor cores) for fp32, plain FMA for fp64. The interpreter multiplies
    bf16 bit patterns in tl.dot, so under it half operands are upcast to fp32."""
    if INTERPRET and a.dtype != tl.float64 and a.dtype != tl.float32:
        # One exact product, as the GPU's single half-precision pass (the interpreter ignores the precision;
        # "ieee" keeps the product count of tools/gpu/triton_static.py right).
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=acc.dtype)
    # out_dtype follows acc: some Triton versions default it to fp32 even for fp64 operands.
    if a.dtype == tl.float64:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=FP32_PRECISION, out_dtype=acc.dtype)
    else:
        return tl.dot(a, b, acc, out_dtype=acc.dtype)


_SUM_CHUNKS_CONFIGS = [
    triton.Config({"BLOCK": 256}, num_warps=2),
    triton.Config({"BLOCK": 1024}, num_warps=4),
]


@autotune(configs=_SUM_CHUNKS_CONFIGS, key=["size", "num_chunks"])
@triton.jit
def _sum_chunks_kernel(
    partial_ptr,  # [B, num_chunks, size] contiguous (size = R * D)
    out_ptr,  # [B, R, D], any strides
    num_chunks, size, D,
    stride_ob, stride_or, stride_od,
    BLOCK: tl.constexpr,
):
    # Grid: (cdiv(size, BLOCK), B). Adds the chunk partials in index order: deterministic.
    b = tl.program_id(1).to(tl.int64)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < size
    acc = tl.zeros([BLOCK], dtype=partial_ptr.dtype.element_ty)
    for chunk in range(num_chunks):
        acc += tl.load(partial_ptr + (b * num_chunks + chunk) * size + idx, mask=mask, other=0.0)
    tl.store(out_ptr + b * stride_ob + (idx // D) * stride_or + (idx % D) * stride_od,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_chunks(partial: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[b] = sum over c of partial[b, c], in index order (bitwise reproducible, no atomics).

    partial: [B, num_chunks, R, D] contiguous; out: [B, R, D], any strides (written, and returned).
    """
    batch, num_chunks, rows, cols = partial.shape
    assert partial.is_contiguous() and out.shape == (batch, rows, cols)
    size = rows * cols

    def grid(meta):
        return (triton.cdiv(size, meta["BLOCK"]), batch)

    _sum_chunks_kernel[grid](partial, out, num_chunks, size, cols, *out.stride())
    return out
