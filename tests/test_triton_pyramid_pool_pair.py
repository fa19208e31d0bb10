"""annkernels.triton.pyramid_pool.pyramid_pool_pair_forward / pyramid_pool_pair_backward: an attention
block's key and value maps pooled, and their gradients gathered back, in one launch of the forward or
backward kernel; each map against the reference (adaptive_avg_pool2d per scale + cat, and its autograd
gradient) and against the single-map launcher, on CPU in the Triton interpreter (and on CUDA where there
is one)."""

import pytest
import torch

import annkernels
from annkernels.ops import reference

from conftest import DEVICES, assert_close, assert_within_reference_error, poisoned_outputs

triton = pytest.importorskip("triton")

TRITON_DEVICES = [pytest.param(device, id=device, marks=[pytest.mark.cuda] if device == "cuda" else [])
                  for device in DEVICES if "triton" in annkernels.available_backends(device)]
pytestmark = pytest.mark.skipif(not TRITON_DEVICES, reason="needs Triton (the interpreter on CPU)")

SCALES = (1, 3, 6, 8)
# (B, C1, C2, H, W): odd, unequal H and W (smaller than scale 8, so its bins overlap), one pixel, and
# channel counts that leave a partial channel block in each map, so the program that crosses from the
# first map to the second starts mid-batch.
SHAPES = [
    pytest.param((1, 3, 5, 9, 11), id="b1-9x11"),
    pytest.param((2, 4, 2, 13, 7), id="b2-13x7"),
    pytest.param((2, 1, 3, 1, 1), id="b2-1x1"),
    pytest.param((2, 70, 33, 5, 3), id="b2-partial-blocks"),
]
LAYOUTS = [("nchw", "nchw"), ("nhwc", "nhwc"), ("sliced", "nhwc"), ("nchw", "sliced")]
TOLERANCE = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}


def _make(shape, layout, dtype, device):
    if layout == "sliced":
        # An offset view: its first element is not the storage's, and no stride is the compact one.
        batch, channels, height, width = shape
        big = torch.randn(batch, channels + 3, height + 2, width + 5, device=device, dtype=torch.float64)
        return big.to(dtype)[:, 2:channels + 2, 1:height + 1, 3:width + 3]
    x = torch.randn(shape, device=device, dtype=torch.float64).to(dtype)
    return x.to(memory_format=torch.channels_last) if layout == "nhwc" else x


def _check(actual, x, scales, name):
    assert actual.is_contiguous(), f"{name}: not contiguous"
    assert actual.dtype == x.dtype and actual.device == x.device
    oracle = reference.pyramid_pool(x.double(), list(scales))
    if x.dtype in TOLERANCE:
        assert_close(actual, oracle, name=name, **TOLERANCE[x.dtype])
    else:
        assert not torch.isnan(actual).any(), f"{name}: NaN elements"
        assert_within_reference_error(actual, reference.pyramid_pool(x, list(scales)), oracle, name)


def _bitwise_comparable() -> bool:
    # Untimed autotune takes the first config for the pair and for each map alone, so at one pixel split
    # (every shape here below 2048 pixels) both compute the same sums in the same order.
    from annkernels.triton.common import timing_configs

    return not timing_configs()


class _CountedKernel:
    """Stands in for an autotuned kernel: records each launch's grid, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids, self.launches = kernel, [], 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            def counted(meta):
                size = grid(meta) if callable(grid) else grid
                self.grids.append(tuple(size))
                return size

            self.launches += 1
            return self.kernel[counted](*args, **kwargs)

        return launch


@pytest.fixture
def launches(monkeypatch):
    """The forward and reduction kernels, counted."""
    from annkernels.triton import common, pyramid_pool

    forward = _CountedKernel(pyramid_pool._pyramid_pool_forward_kernel)
    reduction = _CountedKernel(common._sum_chunks_kernel)
    monkeypatch.setattr(pyramid_pool, "_pyramid_pool_forward_kernel", forward)
    monkeypatch.setattr(common, "_sum_chunks_kernel", reduction)
    return forward, reduction


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layouts", LAYOUTS, ids="-".join)
@pytest.mark.parametrize("shape", SHAPES)
def test_pair_matches_reference_and_single_maps(device, dtype, layouts, shape, launches):
    from annkernels.triton import pyramid_pool

    batch, c1, c2, height, width = shape
    first = _make((batch, c1, height, width), layouts[0], dtype, device)
    second = _make((batch, c2, height, width), layouts[1], dtype, device)
    out1, out2 = pyramid_pool.pyramid_pool_pair_forward(first, second, list(SCALES))
    forward, reduction = launches
    assert forward.launches == 1 and reduction.launches == 0

    size = sum(s * s for s in SCALES)
    assert out1.shape == (batch, c1, size) and out2.shape == (batch, c2, size)
    _check(out1, first, SCALES, "first")
    _check(out2, second, SCALES, "second")
    alone = [pyramid_pool.pyramid_pool_forward(x, list(SCALES)) for x in (first, second)]
    for pooled, single, name in zip((out1, out2), alone, ("first", "second"), strict=True):
        if _bitwise_comparable():
            assert torch.equal(pooled, single), f"{name}: differs from pyramid_pool_forward alone"
        else:
            assert_close(pooled, single, name=name, atol=0, rtol=1e-6 if dtype != torch.bfloat16 else 1e-2)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("height, width", [(48, 49), (64, 75)], ids=["48x49", "64x75"])
def test_split_pixels_one_forward_launch_one_reduction_per_map(device, dtype, height, width, launches, monkeypatch):
    # Few channel blocks and many pixels: the pixels of each plane are split over programs that write
    # partials, and sum_chunks adds them. The split count comes from both maps' channel blocks together
    # (2 here); a map alone would split 4 ways where the pixels allow it (64x75), so there the pair sums in
    # another order than the single-map launcher, as close to the reference.
    from annkernels.triton import pyramid_pool

    monkeypatch.setattr(pyramid_pool, "target_programs", lambda device: 4)  # as the interpreter's
    first = _make((1, 3, height, width), "nchw", dtype, device)
    second = _make((1, 5, height, width), "sliced", dtype, device)
    out1, out2 = pyramid_pool.pyramid_pool_pair_forward(first, second, list(SCALES))
    forward, reduction = launches
    pixels = height * width
    splits = triton.cdiv(pixels, triton.cdiv(triton.cdiv(pixels, 2), 128) * 128)  # 2 of 128-pixel multiples
    assert forward.launches == 1 and forward.grids[-1][1] == splits > 1
    assert reduction.launches == 2  # one per map
    _check(out1, first, SCALES, "first")
    _check(out2, second, SCALES, "second")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_single_map_is_the_same_kernel_with_an_empty_second_map(device, launches):
    from annkernels.triton import pyramid_pool

    x = _make((2, 40, 9, 11), "nhwc", torch.float32, device)
    out = pyramid_pool.pyramid_pool_forward(x, list(SCALES))
    forward, reduction = launches
    # Channel blocks of the first map only (BLOCK_C is 32 or 64): none for the empty second one.
    assert forward.launches == 1 and reduction.launches == 0 and forward.grids[-1] in ((4, 1), (2, 1))
    _check(out, x, SCALES, "out")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_pair_grid_covers_both_maps(device, launches):
    from annkernels.triton import pyramid_pool

    first = _make((2, 40, 9, 11), "nchw", torch.float32, device)
    second = _make((2, 70, 9, 11), "nchw", torch.float32, device)
    pyramid_pool.pyramid_pool_pair_forward(first, second, list(SCALES))
    forward, _ = launches
    # 2 images x (2 + 3) blocks of 32 channels, or 2 x (1 + 2) of 64.
    assert forward.launches == 1 and forward.grids[-1] in ((10, 1), (6, 1))


# ---- backward ----

# How the gradient of each map arrives: autograd hands the backward transposed gradients (a transpose
# downstream), offset views, and stride-0 expansions (the gradient of a sum or of a broadcast).
GRAD_LAYOUTS = [("contiguous", "transposed"), ("transposed", "expanded"), ("sliced", "broadcast"),
                ("expanded", "contiguous")]
GRAD_TOLERANCE = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}


def _make_grad(shape, layout, dtype, device):
    batch, channels, size = shape

    def randn(*dims):
        return torch.randn(dims, device=device, dtype=torch.float64).to(dtype)

    if layout == "transposed":
        return randn(batch, size, channels).transpose(1, 2)
    if layout == "sliced":
        return randn(batch, channels + 2, size + 3)[:, 1:channels + 1, 2:size + 2]
    if layout == "expanded":  # every stride 0
        return randn().expand(batch, channels, size)
    if layout == "broadcast":  # stride 0 over images and channels only
        return randn(1, 1, size).expand(batch, channels, size)
    return randn(batch, channels, size)


def _check_grad(actual, grad, height, width, scales, name):
    """``actual`` against autograd's gradient of the reference pooling of a [B, C, height, width] map."""
    batch, channels, _ = grad.shape
    assert actual.shape == (batch, channels, height, width), f"{name}: shape {tuple(actual.shape)}"
    assert actual.is_contiguous(), f"{name}: not contiguous"
    assert actual.dtype == grad.dtype and actual.device == grad.device
    assert not torch.isnan(actual).any(), f"{name}: NaN elements (unwritten?)"

    def reference_grad(dtype):
        x = torch.zeros((batch, channels, height, width), device=grad.device, dtype=dtype, requires_grad=True)
        (gradient,) = torch.autograd.grad(reference.pyramid_pool(x, list(scales)), x, grad.to(dtype))
        return gradient

    oracle = reference_grad(torch.float64)
    if grad.dtype in GRAD_TOLERANCE:
        assert_close(actual, oracle, name=name, **GRAD_TOLERANCE[grad.dtype])
    else:
        assert_within_reference_error(actual, reference_grad(grad.dtype), oracle, name)


@pytest.fixture
def backward_launches(monkeypatch):
    """The backward kernel, counted."""
    from annkernels.triton import pyramid_pool

    backward = _CountedKernel(pyramid_pool._pyramid_pool_backward_kernel)
    monkeypatch.setattr(pyramid_pool, "_pyramid_pool_backward_kernel", backward)
    return backward


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layouts", GRAD_LAYOUTS, ids="-".join)
@pytest.mark.parametrize("shape", SHAPES)
def test_pair_backward_matches_reference_and_single_maps(device, dtype, layouts, shape, backward_launches):
    from annkernels.triton import pyramid_pool

    batch, c1, c2, height, width = shape
    size = sum(s * s for s in SCALES)
    grad_first = _make_grad((batch, c1, size), layouts[0], dtype, device)
    grad_second = _make_grad((batch, c2, size), layouts[1], dtype, device)
    with poisoned_outputs():
        gin1, gin2 = pyramid_pool.pyramid_pool_pair_backward(grad_first, grad_second, list(SCALES), height, width)
    assert backward_launches.launches == 1

    _check_grad(gin1, grad_first, height, width, SCALES, "grad_first")
    _check_grad(gin2, grad_second, height, width, SCALES, "grad_second")
    with poisoned_outputs():
        alone = [pyramid_pool.pyramid_pool_backward(g, list(SCALES), height, width)
                 for g in (grad_first, grad_second)]
    for gathered, single, name in zip((gin1, gin2), alone, ("grad_first", "grad_second"), strict=True):
        if _bitwise_comparable():
            assert torch.equal(gathered, single), f"{name}: differs from pyramid_pool_backward alone"
        else:
            assert_close(gathered, single, name=name, atol=0, rtol=1e-6 if dtype != torch.bfloat16 else 1e-2)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_single_map_backward_is_the_same_kernel_with_an_empty_second_map(device, backward_launches):
    from annkernels.triton import pyramid_pool

    grad = _make_grad((2, 40, 110), "transposed", torch.float32, device)
    with poisoned_outputs():
        gin = pyramid_pool.pyramid_pool_backward(grad, list(SCALES), 9, 11)
    # Channel blocks of the first map only (32 channels by 64 pixels, or 16 by 128): none for the second.
    assert backward_launches.launches == 1 and backward_launches.grids[-1] in ((4, 2), (6, 1))
    _check_grad(gin, grad, 9, 11, SCALES, "grad")


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_pair_backward_grid_covers_both_maps(device, backward_launches):
    from annkernels.triton import pyramid_pool

    grads = [_make_grad((2, c, 110), "contiguous", torch.float32, device) for c in (40, 70)]
    pyramid_pool.pyramid_pool_pair_backward(*grads, list(SCALES), 9, 11)
    # 2 images x (2 + 3) blocks of 32 channels by 2 blocks of 64 pixels, or 2 x (3 + 5) of 16 by 1 of 128.
    assert backward_launches.launches == 1 and backward_launches.grids[-1] in ((10, 2), (16, 1))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_pair_backward_with_an_empty_map(device, backward_launches):
    # A map with no channels gets no programs; the other map's gradient is still complete.
    from annkernels.triton import pyramid_pool

    grad_first = _make_grad((2, 0, 110), "contiguous", torch.float32, device)
    grad_second = _make_grad((2, 3, 110), "transposed", torch.float32, device)
    with poisoned_outputs():
        gin1, gin2 = pyramid_pool.pyramid_pool_pair_backward(grad_first, grad_second, list(SCALES), 9, 11)
    assert backward_launches.launches == 1 and gin1.shape == (2, 0, 9, 11)
    _check_grad(gin2, grad_second, 9, 11, SCALES, "grad_second")
