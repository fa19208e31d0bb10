"""pyramid_pool on every backend built here, against the reference (adaptive_avg_pool2d per scale + cat)."""

import pytest
import torch

import annkernels
from annkernels.ops import reference

from conftest import assert_close, assert_within_reference_error, backend_cases, interpreted, poisoned_outputs

SHAPES = [
    pytest.param((1, 1, 1, 1), id="one-pixel"),  # every bin of every scale is that pixel
    pytest.param((2, 3, 7, 13), id="7x13"),  # odd and unequal; 7 < 8 so scale-8 bins overlap
    pytest.param((1, 4, 5, 3), id="5x3"),  # H and W smaller than scales 6 and 8
    pytest.param((3, 2, 64, 32), id="64x32"),  # scale 8 divides, 3 and 6 overlap
    pytest.param((1, 3, 97, 97), id="97x97"),  # the 769-crop feature map: every scale but 1 is uneven
]
SCALES = [(1,), (1, 2, 3, 6), (1, 3, 6, 8)]
# The interpreter runs Triton kernels slowly: give it the small shapes only.
INTERPRETED_SHAPES = [param.values[0] for param in SHAPES[:3]]

FLOAT32_TOLERANCE = dict(atol=1e-6, rtol=1e-5)


def _expected(x, scales):
    return reference.pyramid_pool(x.double(), list(scales))


@pytest.mark.parametrize("device, backend", backend_cases())
@pytest.mark.parametrize("scales", SCALES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_reference(device, backend, scales, channels_last, shape):
    if interpreted(backend) and shape not in INTERPRETED_SHAPES:
        pytest.skip("too large for the Triton interpreter")
    x = torch.randn(shape, device=device, dtype=torch.float32)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with poisoned_outputs():
        out = annkernels.pyramid_pool(x, scales, backend=backend)
    assert_close(out, _expected(x, scales), name="out", **FLOAT32_TOLERANCE)

    grad = torch.randn_like(out)
    with poisoned_outputs():
        (grad_x,) = torch.autograd.grad(out, x, grad)
    x64 = x.detach().double().requires_grad_(True)
    (expected_grad,) = torch.autograd.grad(_expected(x64, scales), x64, grad.double())
    assert_close(grad_x, expected_grad, name="grad_x", **FLOAT32_TOLERANCE)


@pytest.mark.parametrize("device, backend", backend_cases())
def test_strided_grad_output(device, backend):
    # Autograd may hand backward a non-contiguous gradient, e.g. from a transpose downstream.
    x = torch.randn(2, 5, 9, 11, device=device, requires_grad=True)
    out = annkernels.pyramid_pool(x, backend=backend)
    grad = torch.randn(2, 110, 5, device=device).transpose(1, 2)
    (grad_x,) = torch.autograd.grad(out, x, grad)
    x64 = x.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(_expected(x64, (1, 3, 6, 8)), x64, grad.double())
    assert_close(grad_x, expected, name="grad_x", **FLOAT32_TOLERANCE)


@pytest.mark.parametrize("device, backend", backend_cases())
def test_float64_gradcheck(device, backend):
    # gradcheck differentiates numerically per input element: keep it small for the Triton interpreter.
    shape = (1, 2, 5, 3) if interpreted(backend) else (2, 3, 7, 5)
    x = torch.randn(shape, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: annkernels.pyramid_pool(t, (1, 2, 3, 6), backend=backend), (x,))


@pytest.mark.parametrize("device, backend", backend_cases())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_reference_error(device, backend, dtype):
    scales = (1, 3, 6, 8)
    x = torch.randn(2, 8, 31, 37, device=device, dtype=dtype, requires_grad=True)
    out = annkernels.pyramid_pool(x, scales, backend=backend)
    grad = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, grad)

    x_lowp = x.detach().clone().requires_grad_(True)
    out_lowp = reference.pyramid_pool(x_lowp, list(scales))
    (grad_lowp,) = torch.autograd.grad(out_lowp, x_lowp, grad)
    x64 = x.detach().double().requires_grad_(True)
    out64 = _expected(x64, scales)
    (grad64,) = torch.autograd.grad(out64, x64, grad.double())
    assert_within_reference_error(out, out_lowp, out64, "out")
    assert_within_reference_error(grad_x, grad_lowp, grad64, "grad_x")


@pytest.mark.parametrize("device, backend", backend_cases())
def test_backward_is_bitwise_deterministic(device, backend):
    x = torch.randn(2, 16, 33, 47, device=device, requires_grad=True)
    out = annkernels.pyramid_pool(x, backend=backend)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, x, grad, retain_graph=True)[0]
    second = torch.autograd.grad(out, x, grad)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("device, backend", backend_cases())
def test_autocast_keeps_the_inputs_dtype(device, backend):
    # The fake kernels promise outputs and gradients in the inputs' dtype; torch.compile relies on it.
    x = torch.randn(2, 3, 7, 13, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = annkernels.pyramid_pool(x, backend=backend)
    assert out.dtype == torch.float32
    assert_close(out, _expected(x, (1, 3, 6, 8)), name="out", **FLOAT32_TOLERANCE)
    (grad_x,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert grad_x.dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference", "composite"] +
                         (["cpu"] if "cpu" in annkernels.available_backends() else []))
@pytest.mark.parametrize(
    "make_input, scales, error, match",
    [
        (lambda: torch.randn(3, 4, 5), (1, 3), ValueError, "x must be 4-D"),
        (lambda: torch.randn(1, 2, 3, 4, dtype=torch.float64).long(), (1,), TypeError, "x must be float64"),
        (lambda: torch.randn(1, 2, 0, 4), (1,), ValueError, "x must not be empty"),
        (lambda: torch.randn(1, 2, 3, 4), (), ValueError, "scales must not be empty"),
        (lambda: torch.randn(1, 2, 3, 4), (1, 0), ValueError, "scales must be positive"),
        (lambda: torch.randn(1, 2, 3, 4), (1, -3), ValueError, "scales must be positive"),
        (lambda: torch.randn(1, 2, 3, 4), (1, 2.5), TypeError, "scales must be positive ints"),
        (lambda: [[1.0]], (1,), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_input_raises_clear_error(backend, make_input, scales, error, match):
    with pytest.raises(error, match=match):
        annkernels.pyramid_pool(make_input(), scales, backend=backend)


def test_unknown_or_unusable_backend_is_named():
    x = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="unknown annkernels backend 'fast'"):
        annkernels.pyramid_pool(x, backend="fast")
    with pytest.raises(RuntimeError, match="backend 'cuda' runs on CUDA tensors"):
        annkernels.pyramid_pool(x, backend="cuda")


@pytest.mark.skipif("triton" not in annkernels.available_backends("cpu"), reason="needs the Triton interpreter")
def test_triton_input_offsets_past_2_31_elements():
    # The second channel plane starts at element 2^31 of one 4 GiB fp16 buffer: torch.empty only reserves
    # it and the kernel touches 2 x 15 elements; a 32-bit offset would wrap and read (or fault) elsewhere.
    # The same input, compact, must give the same bits.
    buffer = torch.empty(2**31 + 15, dtype=torch.float16)
    x = buffer.as_strided((1, 2, 5, 3), (buffer.numel(), 2**31, 3, 1))
    x.copy_(torch.randn(1, 2, 5, 3))
    outs = [annkernels.pyramid_pool(t, (1, 2, 3), backend="triton") for t in (x, x.clone())]
    assert torch.equal(*outs)


# ---- pyramid_pool_pair: two maps of one size in one pass ----

PAIR_SHAPES = [
    pytest.param((1, 3, 2, 9, 11), id="B1-9x11"),  # (B, C1, C2, H, W): unequal channels, odd sizes
    pytest.param((2, 2, 5, 1, 1), id="B2-1x1"),
    pytest.param((2, 4, 3, 13, 7), id="B2-13x7"),
]


def _pair_inputs(device, shape, dtype=torch.float32):
    batch, first_channels, second_channels, height, width = shape
    first = torch.randn(batch, first_channels, height, width, device=device, dtype=dtype)
    # The value source as a block sees it: channels_last, and an offset view of a wider map.
    wide = torch.randn(batch, second_channels + 1, height, width, device=device, dtype=dtype)
    second = wide.to(memory_format=torch.channels_last)[:, 1:]
    return first.requires_grad_(True), second.requires_grad_(True)


@pytest.mark.parametrize("device, backend", backend_cases(include_reference=True))
@pytest.mark.parametrize("scales", [(1, 3, 6, 8), (1, 2, 3, 6)], ids=str)
@pytest.mark.parametrize("shape", PAIR_SHAPES)
def test_pair_matches_each_map_pooled_alone(device, backend, scales, shape):
    first, second = _pair_inputs(device, shape)
    with poisoned_outputs():
        outs = annkernels.pyramid_pool_pair(first, second, scales, backend=backend)
    grads_out = [torch.randn_like(out) for out in outs]
    with poisoned_outputs():
        grads = torch.autograd.grad(outs, (first, second), grads_out)
    for name, x, out, grad_out, grad in zip(("first", "second"), (first, second), outs, grads_out, grads,
                                            strict=True):
        x64 = x.detach().double().requires_grad_(True)
        expected = _expected(x64, scales)
        (expected_grad,) = torch.autograd.grad(expected, x64, grad_out.double())
        assert_close(out, expected, name=f"pooled {name}", **FLOAT32_TOLERANCE)
        # A 1x1 map's pixel adds all S bin gradients in fp32 (the reference backend too).
        assert_close(grad, expected_grad, name=f"grad {name}", atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device, backend", backend_cases())
def test_pair_float64_gradcheck_and_one_unused_output(device, backend):
    first, second = (t.detach().double().requires_grad_(True) for t in _pair_inputs(device, (1, 2, 3, 5, 3)))
    assert torch.autograd.gradcheck(
        lambda a, b: annkernels.pyramid_pool_pair(a, b, (1, 2, 3), backend=backend), (first, second))
    # Only the first output reaches the loss: the second map's gradient is None, not zeros or garbage.
    pooled, _ = annkernels.pyramid_pool_pair(first, second, (1, 2, 3), backend=backend)
    grads = torch.autograd.grad(pooled.sum(), (first, second), allow_unused=True)
    assert grads[1] is None or not grads[1].any()
    assert_close(grads[0], torch.autograd.grad(annkernels.pyramid_pool(first, (1, 2, 3), backend="reference").sum(),
                                               first)[0], atol=1e-12, rtol=1e-12, name="grad first")


@pytest.mark.parametrize("device, backend", backend_cases())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pair_half_precision_equals_pooling_each_map(device, backend, dtype):
    # The pair runs the single-map kernels' arithmetic on each map: the same bits, both ways.
    first, second = _pair_inputs(device, (2, 8, 6, 31, 37), dtype)
    outs = annkernels.pyramid_pool_pair(first, second, backend=backend)
    grads_out = [torch.randn_like(out) for out in outs]
    grads = torch.autograd.grad(outs, (first, second), grads_out)
    for x, out, grad_out, grad in zip((first, second), outs, grads_out, grads, strict=True):
        alone = annkernels.pyramid_pool(x, backend=backend)
        assert out.dtype == grad.dtype == dtype
        assert torch.equal(out, alone)
        assert torch.equal(grad, torch.autograd.grad(alone, x, grad_out)[0])


@pytest.mark.parametrize("device, backend", backend_cases())
def test_pair_of_mismatched_maps_pools_each(device, backend):
    # Different dtypes or sizes cannot share a launch; each map is pooled on its own.
    first = torch.randn(1, 2, 9, 11, device=device)
    for second in (torch.randn(1, 3, 9, 11, device=device, dtype=torch.float64),
                   torch.randn(1, 3, 7, 11, device=device)):
        outs = annkernels.pyramid_pool_pair(first, second, backend=backend)
        for x, out in zip((first, second), outs, strict=True):
            assert out.dtype == x.dtype
            assert_close(out, _expected(x, (1, 3, 6, 8)), name="out", **FLOAT32_TOLERANCE)


@pytest.mark.parametrize(
    "make_inputs, error, match",
    [
        (lambda: (torch.randn(3, 4, 5), torch.randn(1, 2, 3, 4)), ValueError, "first must be 4-D"),
        (lambda: (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 0, 4)), ValueError, "second must not be empty"),
        (lambda: (torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4).long()), TypeError, "second must be float64"),
    ],
)
def test_pair_bad_input_raises_clear_error(make_inputs, error, match):
    with pytest.raises(error, match=match):
        annkernels.pyramid_pool_pair(*make_inputs())


@pytest.mark.skipif("cpu" not in annkernels.available_backends("cpu"), reason="needs the C++ kernels")
def test_pair_kernel_ops_check_their_maps():
    first = torch.randn(1, 2, 9, 11)
    with pytest.raises(RuntimeError, match="must share batch, height and width"):
        torch.ops.annkernels._pyramid_pool_pair_forward(first, torch.randn(1, 2, 9, 10), [1, 3])
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.annkernels._pyramid_pool_pair_forward(first, first.double(), [1, 3])
    grad = torch.randn(1, 2, 10)
    with pytest.raises(RuntimeError, match="must share the batch"):
        torch.ops.annkernels._pyramid_pool_pair_backward(grad, torch.randn(2, 2, 10), [1, 3], 9, 11)
    with pytest.raises(RuntimeError, match=r"must have shape \[B, C, 10\]"):
        torch.ops.annkernels._pyramid_pool_pair_backward(grad, torch.randn(1, 2, 9), [1, 3], 9, 11)
