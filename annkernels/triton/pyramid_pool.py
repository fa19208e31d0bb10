"""Triton pyramid pooling: every adaptive-average-pool scale in one pass over the input.

Bin t of the pyramid (scales concatenated, row-major inside a scale) covers rows
[floor(i*H/s), ceil((i+1)*H/s)) and columns [floor(j*W/s), ceil((j+1)*W/s)), exactly the bins of
``F.adaptive_avg_pool2d``. Both directions are written as a product with the 0/1 pixel-to-bin
membership matrix M [H*W, S], built on chip from index arithmetic, so the work runs on tensor cores:

  forward   out[c, t]  = sum_p x[c, p] * M[p, t] / area[t]      (reads x once for all scales)
  backward  gin[c, p]  = sum_t (g[c, t] / area[t]) * M[p, t]    (a gather: each pixel written once)

Each direction takes one or two feature maps of the same B, H, W and dtype (an attention block's key
and value inputs, with their own C and strides; in the backward, their pooled gradients) in one launch:
its programs are the channel blocks of the first map, then those of the second. A single map is the same
kernel with an empty second map (C2 = 0).
When the channel blocks cannot fill the GPU, the forward also splits each plane's pixels over programs,
which write fp32 partial averages that a second kernel adds in split order (deterministic).
M is exact in every dtype. fp32 products use the "tf32x3" split (fp32-accurate on tensor cores),
fp64 uses plain FMA ("ieee"), fp16/bf16 feed tensor cores directly (the backward rounds g / area to
the input dtype for that); accumulation is fp32 (fp64 for fp64). Offsets are int64, so feature maps
with C*H*W >= 2^31 elements index correctly. Validation happens in annkernels/ops; these launchers
only assert internal invariants.
"""

import torch
import triton
import triton.language as tl

from annkernels.triton.common import INTERPRET, autotune, dot, padded_block, sum_chunks, target_programs

# The forward splits the pixels of a plane over several programs when B * C alone cannot fill the GPU;
# splits are multiples of every BLOCK_P and hold at least this many pixels.
_SPLIT_ALIGN = 128
_MIN_PIXELS_PER_SPLIT = 1024


@triton.jit
def _bin_bounds(t, H, W, SCALES: tl.constexpr):
    """Row/column ranges [hs, he) x [ws, we) of pyramid bins ``t``; bins t >= S get rows past H."""
    # Scale and first bin index of the scale each t falls in (scales are laid out in order).
    scale = tl.full(t.shape, SCALES[0], tl.int32)
    first = tl.zeros_like(t)
    offset = 0
    for k in tl.static_range(1, len(SCALES)):
        offset += SCALES[k - 1] * SCALES[k - 1]
        later = t >= offset
        scale = tl.where(later, SCALES[k], scale)
        first = tl.where(later, offset, first)
    i = (t - first) // scale
    j = (t - first) % scale
    return (i * H) // scale, ((i + 1) * H + scale - 1) // scale, (j * W) // scale, ((j + 1) * W + scale - 1) // scale


@triton.jit
def _membership_dot(values, member, acc, INTERPRET: tl.constexpr):
    """acc + values @ member for a boolean ``member``; fp32-accurate for fp32 values."""
    if INTERPRET and values.dtype != tl.float64:
        # dot upcasts half operands to fp32 there anyway, and the interpreter's bool -> bf16 cast is wrong.
        member = member.to(tl.float32)
    else:
        member = member.to(values.dtype)
    return dot(values, member, acc, "tf32x3", INTERPRET)


# Spill-free on sm_90 in every dtype (tests/test_triton_aot.py). Wider or fewer-warp tiles spill for
# fp32, whose tf32x3 split triples the operands (32/64 with 4 warps, 64/64 with 8), and for fp64.
_FORWARD_CONFIGS = [
    triton.Config({"BLOCK_C": 32, "BLOCK_P": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_C": 64, "BLOCK_P": 32}, num_warps=8, num_stages=1),
]


# Keyed on both channel counts: how the programs divide between the maps, and the pixel splits, differ
# between a single map (C2 = 0) and a pair with the same total.
@autotune(configs=_FORWARD_CONFIGS, key=["C1", "C2", "H", "W", "BLOCK_S"])
@triton.jit
def _pyramid_pool_forward_kernel(
    x1_ptr, out1_ptr,  # first map: x1 [B, C1, H, W] any strides; out1 [B, num_splits, C1, S] contiguous
    x2_ptr, out2_ptr,  # second map, the same with C2 (C2 = 0: none; the pointers are then unused)
    B, C1, C2, H, W, S, PIXELS_PER_SPLIT,
    stride_1b, stride_1c, stride_1h, stride_1w,
    stride_2b, stride_2c, stride_2h, stride_2w,
    SCALES: tl.constexpr,  # tuple of pool sizes, S = sum(s*s)
    BLOCK_S: tl.constexpr,  # >= S, >= 16
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,  # pixels (flattened h*W + w) per step
    INTERPRET: tl.constexpr,
):
    # Grid: (B * (cdiv(C1, BLOCK_C) + cdiv(C2, BLOCK_C)), num_splits). Program (bc, split) owns BLOCK_C
    # channel planes of one image of one map, streams pixels [split * PIXELS_PER_SPLIT, +PIXELS_PER_SPLIT)
    # once and keeps the bin averages over them, all S bins, [BLOCK_C, BLOCK_S] in registers.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    first_programs = B * tl.cdiv(C1, BLOCK_C)
    # One uniform branch picks the map; the pixel loop below is shared, so the kernel holds one copy of it.
    # The casts give both branches the same types (an argument equal to 1 arrives as a constant).
    if pid < first_programs:
        x_ptr = x1_ptr
        out_ptr = out1_ptr
        C = tl.cast(C1, tl.int32)
        block = pid
        stride_xb = tl.cast(stride_1b, tl.int64)
        stride_xc = tl.cast(stride_1c, tl.int64)
        stride_xh = tl.cast(stride_1h, tl.int64)
        stride_xw = tl.cast(stride_1w, tl.int64)
    else:
        x_ptr = x2_ptr
        out_ptr = out2_ptr
        C = tl.cast(C2, tl.int32)
        block = pid - first_programs
        stride_xb = tl.cast(stride_2b, tl.int64)
        stride_xc = tl.cast(stride_2c, tl.int64)
        stride_xh = tl.cast(stride_2h, tl.int64)
        stride_xw = tl.cast(stride_2w, tl.int64)
    num_cblocks = tl.cdiv(C, BLOCK_C)
    b = (block // num_cblocks).to(tl.int64)
    c = (block % num_cblocks).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    t = tl.arange(0, BLOCK_S)
    hs, he, ws, we = _bin_bounds(t, H, W, SCALES)
    acc_dtype = tl.float64 if x1_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros([BLOCK_C, BLOCK_S], dtype=acc_dtype)

    x_rows = x_ptr + b * stride_xb + c[:, None] * stride_xc
    p_start = split * PIXELS_PER_SPLIT
    p_end = tl.minimum(p_start + PIXELS_PER_SPLIT, H * W)
    for p0 in range(p_start, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        h = p // W
        w = p % W
        x = tl.load(x_rows + h[None, :].to(tl.int64) * stride_xh + w[None, :].to(tl.int64) * stride_xw,
                    mask=(c[:, None] < C) & (p[None, :] < p_end), other=0.0)
        # Masked pixels load as 0, so their (possibly real) bins gain nothing.
        member = (h[:, None] >= hs[None, :]) & (h[:, None] < he[None, :]) \
            & (w[:, None] >= ws[None, :]) & (w[:, None] < we[None, :])
        acc = _membership_dot(x, member, acc, INTERPRET)

    area = ((he - hs) * (we - ws)).to(acc_dtype)
    out = acc / tl.where(t < S, area, 1.0)[None, :]
    tl.store(out_ptr + ((b * num_splits + split) * C + c[:, None]) * S + t[None, :].to(tl.int64),
             out.to(out_ptr.dtype.element_ty), mask=(c[:, None] < C) & (t[None, :] < S))


# 16/128 spills with 4 warps, 64/64 even with 8.
_BACKWARD_CONFIGS = [
    triton.Config({"BLOCK_C": 32, "BLOCK_P": 64}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_C": 16, "BLOCK_P": 128}, num_warps=8, num_stages=1),
]


# Keyed on both channel counts, as the forward: the programs divide differently between the maps.
@autotune(configs=_BACKWARD_CONFIGS, key=["C1", "C2", "H", "W", "BLOCK_S"])
@triton.jit
def _pyramid_pool_backward_kernel(
    g1_ptr, gin1_ptr,  # first map: g1 [B, C1, S] any strides; gin1 [B, C1, H, W] contiguous
    g2_ptr, gin2_ptr,  # second map, the same with C2 (C2 = 0: none; the pointers are then unused)
    B, C1, C2, H, W, S,
    stride_1b, stride_1c, stride_1s,
    stride_2b, stride_2c, stride_2s,
    SCALES: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    # Grid: (B * (cdiv(C1, BLOCK_C) + cdiv(C2, BLOCK_C)), cdiv(H*W, BLOCK_P)). Each program gathers the
    # pyramid gradient of BLOCK_C channels of one image of one map into BLOCK_P pixels and writes them
    # once: no atomics, fixed summation order.
    pid_bc = tl.program_id(0)
    pid_p = tl.program_id(1)
    first_programs = B * tl.cdiv(C1, BLOCK_C)
    # One uniform branch picks the map, so the gather below exists once; the casts give both branches the
    # same types (an argument equal to 1, a channel count or a stride, arrives as a constant).
    if pid_bc < first_programs:
        g_ptr = g1_ptr
        gin_ptr = gin1_ptr
        C = tl.cast(C1, tl.int32)
        block = pid_bc
        stride_gb = tl.cast(stride_1b, tl.int64)
        stride_gc = tl.cast(stride_1c, tl.int64)
        stride_gs = tl.cast(stride_1s, tl.int64)
    else:
        g_ptr = g2_ptr
        gin_ptr = gin2_ptr
        C = tl.cast(C2, tl.int32)
        block = pid_bc - first_programs
        stride_gb = tl.cast(stride_2b, tl.int64)
        stride_gc = tl.cast(stride_2c, tl.int64)
        stride_gs = tl.cast(stride_2s, tl.int64)
    num_cblocks = tl.cdiv(C, BLOCK_C)
    b = (block // num_cblocks).to(tl.int64)
    c = (block % num_cblocks).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    t = tl.arange(0, BLOCK_S)
    hs, he, ws, we = _bin_bounds(t, H, W, SCALES)
    dtype = g1_ptr.dtype.element_ty
    acc_dtype = tl.float64 if dtype == tl.float64 else tl.float32

    g = tl.load(g_ptr + b * stride_gb + c[:, None] * stride_gc + t[None, :].to(tl.int64) * stride_gs,
                mask=(c[:, None] < C) & (t[None, :] < S), other=0.0).to(acc_dtype)
    area = ((he - hs) * (we - ws)).to(acc_dtype)
    # Rounded back to the input dtype, so that fp16/bf16 products run on tensor cores in one pass (M is
    # exact in every dtype; each pixel sums at most a few of these in fp32).
    g = (g / tl.where(t < S, area, 1.0)[None, :]).to(dtype)

    p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    h = p // W
    w = p % W
    member_t = (hs[:, None] <= h[None, :]) & (h[None, :] < he[:, None]) \
        & (ws[:, None] <= w[None, :]) & (w[None, :] < we[:, None])
    grad_in = _membership_dot(g, member_t, tl.zeros([BLOCK_C, BLOCK_P], dtype=acc_dtype), INTERPRET)
    plane = tl.cast(H, tl.int64) * W
    tl.store(gin_ptr + (b * C + c[:, None]) * plane + p[None, :],
             grad_in.to(gin_ptr.dtype.element_ty),
             mask=(c[:, None] < C) & (p[None, :] < plane))


def _pyramid_block(scales) -> tuple[tuple[int, ...], int, int]:
    scales = tuple(int(s) for s in scales)
    size = sum(s * s for s in scales)
    assert scales and min(scales) > 0, "scales are validated by annkernels.ops"
    return scales, size, padded_block(size)


def _forward(inputs: tuple[torch.Tensor, ...], scales: list[int]) -> tuple[torch.Tensor, ...]:
    """Pyramid pooling of one or two maps [B, Ci, H, W] (same B, H, W, dtype, device) in one kernel launch."""
    scales, size, block_s = _pyramid_block(scales)
    first = inputs[0]
    batch, _, height, width = first.shape
    assert len(inputs) in (1, 2)
    assert all(x.shape[0] == batch and x.shape[2:] == first.shape[2:] and x.dtype == first.dtype
               and x.device == first.device for x in inputs), "validated by annkernels.ops"
    channels = [x.shape[1] for x in inputs]
    outs = tuple(torch.empty((batch, c, size), dtype=first.dtype, device=first.device) for c in channels)
    if all(out.numel() == 0 for out in outs):
        return outs
    # (A map with C = 0 beside a non-empty one simply gets no programs.)
    pixels = height * width
    # Programs from (image, map, channel block) alone, counted with the widest BLOCK_C: both maps fill the
    # GPU together, so a pair splits its pixels no more than either map alone would.
    widest = max(c.kwargs["BLOCK_C"] for c in _FORWARD_CONFIGS)
    programs = batch * sum(triton.cdiv(c, widest) for c in channels)
    num_splits = max(1, min(triton.cdiv(target_programs(first.device), programs), pixels // _MIN_PIXELS_PER_SPLIT))
    pixels_per_split = triton.cdiv(triton.cdiv(pixels, num_splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    num_splits = triton.cdiv(pixels, pixels_per_split)
    if num_splits == 1:
        partials = outs
    else:
        partial_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        partials = tuple(torch.empty((batch, num_splits, c, size), dtype=partial_dtype, device=first.device)
                         for c in channels)
    # A single map runs as a pair with an empty second map: C2 = 0 gives it no programs, and its pointers
    # and strides (the first map's again) are never used.
    second, second_partial, second_channels = (inputs[1], partials[1], channels[1]) if len(inputs) == 2 \
        else (first, partials[0], 0)

    def grid(meta):
        return (batch * (triton.cdiv(channels[0], meta["BLOCK_C"]) + triton.cdiv(second_channels, meta["BLOCK_C"])),
                num_splits)

    _pyramid_pool_forward_kernel[grid](
        first, partials[0], second, second_partial,
        batch, channels[0], second_channels, height, width, size, pixels_per_split,
        *first.stride(), *second.stride(),
        SCALES=scales, BLOCK_S=block_s, INTERPRET=INTERPRET,
    )
    if num_splits == 1:
        return outs
    # Each split already divided by the bin area; adding them in split order stays deterministic. One
    # reduction launch per map: the partials are small next to the maps, and each map's output is its
    # own contiguous tensor.
    return tuple(sum_chunks(partial, out) for partial, out in zip(partials, outs, strict=True))


def pyramid_pool_forward(input: torch.Tensor, scales: list[int]) -> torch.Tensor:
    """Pyramid pooling of ``input`` [B, C, H, W] (any strides) -> [B, C, S] contiguous, S = sum(s*s).

    Equals ``torch.cat([F.adaptive_avg_pool2d(input, s).flatten(2) for s in scales], 2)``.
    """
    return _forward((input,), scales)[0]


def pyramid_pool_pair_forward(first: torch.Tensor, second: torch.Tensor,
                              scales: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value pooling of one block in one launch: :func:`pyramid_pool_forward` of ``first``
    [B, C1, H, W] and of ``second`` [B, C2, H, W] (same B, H, W, dtype and device; any strides each)
    -> ([B, C1, S], [B, C2, S]), both contiguous."""
    return _forward((first, second), scales)


def _backward(grads: tuple[torch.Tensor, ...], scales: list[int], height: int,
              width: int) -> tuple[torch.Tensor, ...]:
    """Gradients of one or two pooled maps [B, Ci, S] (same B, dtype, device) -> [B, Ci, height, width]
    each, contiguous, in one kernel launch."""
    scales, size, block_s = _pyramid_block(scales)
    first = grads[0]
    batch = first.shape[0]
    assert len(grads) in (1, 2)
    assert all(g.dim() == 3 and g.shape[0] == batch and g.dtype == first.dtype and g.device == first.device
               for g in grads), "validated by annkernels.ops"
    assert all(g.shape[2] == size for g in grads), "grad_output's last dim must equal sum(s*s)"
    channels = [g.shape[1] for g in grads]
    grad_inputs = tuple(torch.empty((batch, c, height, width), dtype=first.dtype, device=first.device)
                        for c in channels)
    if all(gin.numel() == 0 for gin in grad_inputs):
        return grad_inputs
    # As in _forward: a single map is a pair whose empty second map (C2 = 0, the first map's tensors and
    # strides again) gets no programs, and a map with C = 0 beside a non-empty one gets none either.
    second, second_gin, second_channels = (grads[1], grad_inputs[1], channels[1]) if len(grads) == 2 \
        else (first, grad_inputs[0], 0)

    def grid(meta):
        return (batch * (triton.cdiv(channels[0], meta["BLOCK_C"]) + triton.cdiv(second_channels, meta["BLOCK_C"])),
                triton.cdiv(height * width, meta["BLOCK_P"]))

    _pyramid_pool_backward_kernel[grid](
        first, grad_inputs[0], second, second_gin,
        batch, channels[0], second_channels, height, width, size,
        *first.stride(), *second.stride(),
        SCALES=scales, BLOCK_S=block_s, INTERPRET=INTERPRET,
    )
    return grad_inputs


def pyramid_pool_backward(grad_output: torch.Tensor, scales: list[int], height: int, width: int) -> torch.Tensor:
    """Gradient of :func:`pyramid_pool_forward`: ``grad_output`` [B, C, S] (any strides) -> [B, C, H, W]
    contiguous; each pixel sums, over scales, the gradients of the bins that contain it / bin area."""
    return _backward((grad_output,), scales, height, width)[0]


def pyramid_pool_pair_backward(grad_first: torch.Tensor, grad_second: torch.Tensor, scales: list[int],
                               height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of :func:`pyramid_pool_pair_forward` in one launch: :func:`pyramid_pool_backward` of
    ``grad_first`` [B, C1, S] and of ``grad_second`` [B, C2, S] (same B, dtype and device; any strides each,
    stride 0 included) -> ([B, C1, height, width], [B, C2, height, width]), both contiguous."""
    return _backward((grad_first, grad_second), scales, height, width)
