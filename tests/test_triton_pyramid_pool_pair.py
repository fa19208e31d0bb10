"""annkernels.triton.pyramid_pool.pyramid_pool_pair_forward: an attention block's key and value maps pooled
in one launch of the forward kernel, each against the reference (adaptive_avg_pool2d per scale + cat) and
against the single-map launcher, on CPU in the Triton interpreter (and on CUDA where there is one)."""

import pytest
import torch

import annkernels
from annkernels.ops import reference

from conftest import DEVICES, assert_close, assert_within_reference_error

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
