"""short_attention on every backend built here, against the reference softmax(Q K^T * scale) V."""

import pytest
import torch

import annkernels
from annkernels.ops import reference

from conftest import assert_close, assert_within_reference_error, backend_cases, interpreted, poisoned_outputs

# (B, N, S, Dk, Dv); the interpreter runs the first four only.
CASES = [
    pytest.param((1, 1, 1, 8, 8), id="one-query-one-key"),  # softmax is exactly 1
    pytest.param((2, 91, 110, 32, 24), id="ann-keys-7x13-map"),  # ANN's S, Dk != Dv
    pytest.param((3, 50, 50, 16, 40), id="pspnet-keys"),  # PSPNet scales (1, 2, 3, 6) give S = 50
    pytest.param((1, 97, 17, 72, 72), id="odd-sizes"),
    pytest.param((2, 300, 110, 256, 256), id="ann-channels"),  # ANN's Dk = Dv = 256
    pytest.param((1, 20, 1024, 48, 20), id="widest-keys"),  # the largest supported S
]
INTERPRETED_CASES = [param.values[0] for param in CASES[:4]]
FLOAT32_TOLERANCE = dict(atol=2e-5, rtol=2e-4)


def _make(shape, layout, device, dtype=torch.float32):
    """[B, rows, D] tensor, either contiguous or the channel-first view a conv output gives."""
    batch, rows, dim = shape
    if layout == "channel_first":
        return torch.randn(batch, dim, rows, device=device, dtype=dtype).transpose(1, 2)
    return torch.randn(batch, rows, dim, device=device, dtype=dtype)


def _inputs(case, layout, device, dtype=torch.float32):
    batch, n, s, dk, dv = case
    query = _make((batch, n, dk), layout, device, dtype)
    key = _make((batch, s, dk), layout, device, dtype)
    value = _make((batch, s, dv), layout, device, dtype)
    return [t.requires_grad_(True) for t in (query, key, value)]


def _oracle(query, key, value, grad, scale=None):
    leaves = [t.detach().double().requires_grad_(True) for t in (query, key, value)]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out = reference.short_attention(*leaves, scale)
    return (out, *torch.autograd.grad(out, leaves, grad.double()))


def _check_forward_and_gradients(case, layout, device, backend):
    """Output and all three gradients of one fp32 case, outputs poisoned, against the float64 oracle."""
    query, key, value = _inputs(case, layout, device)
    with poisoned_outputs():
        out = annkernels.short_attention(query, key, value, backend=backend)
    grad = torch.randn_like(out)
    with poisoned_outputs():
        grads = torch.autograd.grad(out, (query, key, value), grad)
    expected = _oracle(query, key, value, grad)
    for name, actual, wanted in zip(("out", "grad_query", "grad_key", "grad_value"), (out, *grads), expected,
                                    strict=True):
        assert_close(actual, wanted, name=f"{name} {case} {layout}", **FLOAT32_TOLERANCE)


@pytest.mark.parametrize("device, backend", backend_cases())
@pytest.mark.parametrize("layout", ["channel_first", "contiguous"])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_reference(device, backend, layout, case):
    if interpreted(backend) and case not in INTERPRETED_CASES:
        pytest.skip("too large for the Triton interpreter")
    _check_forward_and_gradients(case, layout, device, backend)


@pytest.mark.parametrize("layout", ["channel_first", "contiguous"])
def test_cpu_outputs_beyond_the_streaming_store_size(layout):
    # The CPU kernel writes fp32 outputs of 8 MiB and more with non-temporal stores, line by line with an
    # unaligned head and tail; N = 8301 puts every channel-first line at a different alignment.
    if "cpu" not in annkernels.available_backends():
        pytest.skip("the CPU extension is not built")
    _check_forward_and_gradients((1, 8301, 110, 256, 256), layout, "cpu", "cpu")


@pytest.mark.parametrize("device, backend", backend_cases())
def test_output_and_gradients_keep_the_input_layout(device, backend):
    # A channel-first query gives a channel-first output, so the block's reshape back to NCHW is free.
    query, key, value = _inputs((2, 12, 10, 8, 6), "channel_first", device)
    out = annkernels.short_attention(query, key, value, backend=backend)
    assert out.transpose(1, 2).is_contiguous()
    grads = torch.autograd.grad(out.sum(), (query, key, value))
    for tensor, grad in zip((query, key, value), grads, strict=True):
        assert grad.stride() == tensor.stride()


@pytest.mark.parametrize("device, backend", backend_cases())
def test_explicit_scale_and_mixed_layouts(device, backend):
    query = _make((2, 33, 16), "contiguous", device).requires_grad_(True)
    key = _make((2, 50, 16), "channel_first", device).requires_grad_(True)
    value = _make((2, 50, 8), "contiguous", device).requires_grad_(True)
    out = annkernels.short_attention(query, key, value, scale=0.7, backend=backend)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (query, key, value), grad)
    expected = _oracle(query, key, value, grad, scale=0.7)
    for name, actual, wanted in zip(("out", "grad_query", "grad_key", "grad_value"), (out, *grads), expected,
                                    strict=True):
        assert_close(actual, wanted, name=name, **FLOAT32_TOLERANCE)


@pytest.mark.parametrize("device, backend", backend_cases())
def test_large_scores_do_not_overflow(device, backend):
    # Scores of several hundred: a softmax without max-subtraction would overflow to inf/NaN. fp32
    # cannot compute scores near 1e3 to the output tolerance in general (a unit roundoff of each score is
    # ~6e-5, and the output moves by about that times |v| where two keys nearly tie), so query and key
    # hold integers from -30 to 30: with Dk = 16 every product, partial sum and the scale 0.25 are
    # exact in fp32 (and in TF32), and what remains is the softmax's own rounding.
    query, key, value = _inputs((1, 40, 110, 16, 16), "contiguous", device)
    with torch.no_grad():
        for tensor in (query, key):
            tensor.copy_(torch.randint_like(tensor, -30, 31))
    out = annkernels.short_attention(query, key, value, backend=backend)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (query, key, value), grad)
    expected = _oracle(query, key, value, grad)
    assert_close(out, expected[0], name="out", **FLOAT32_TOLERANCE)
    for name, actual, wanted in zip(("grad_query", "grad_key", "grad_value"), grads, expected[1:], strict=True):
        assert torch.isfinite(actual).all(), name
        assert_close(actual, wanted, name=name, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("device, backend", backend_cases())
def test_float64_gradcheck(device, backend):
    query, key, value = (t.detach().double().requires_grad_(True)
                         for t in _inputs((2, 7, 5, 4, 3), "channel_first", device))
    if backend == "cuda":
        # The CUDA kernels are tensor-core kernels for fp32, fp16 and bf16; float64 is refused by name.
        with pytest.raises(RuntimeError, match="unsupported dtype Double for the CUDA kernel"):
            annkernels.short_attention(query, key, value, backend=backend)
        return
    assert torch.autograd.gradcheck(lambda q, k, v: annkernels.short_attention(q, k, v, backend=backend),
                                    (query, key, value))


@pytest.mark.parametrize("device, backend", backend_cases())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_reference_error(device, backend, dtype):
    case = (2, 91, 110, 32, 24)
    query, key, value = _inputs(case, "channel_first", device, dtype)
    out = annkernels.short_attention(query, key, value, backend=backend)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (query, key, value), grad)

    lowp_leaves = [t.detach().clone().requires_grad_(True) for t in (query, key, value)]
    lowp_out = reference.short_attention(*lowp_leaves, case[3] ** -0.5)
    lowp = (lowp_out, *torch.autograd.grad(lowp_out, lowp_leaves, grad))
    expected = _oracle(query, key, value, grad)
    for name, actual, lowp_ref, wanted in zip(("out", "grad_query", "grad_key", "grad_value"), (out, *grads), lowp,
                                              expected, strict=True):
        assert actual.dtype == dtype
        assert_within_reference_error(actual, lowp_ref, wanted, name)


@pytest.mark.parametrize("device, backend", backend_cases())
def test_backward_is_bitwise_deterministic(device, backend):
    case = INTERPRETED_CASES[1] if interpreted(backend) else (2, 600, 110, 32, 32)
    query, key, value = _inputs(case, "channel_first", device)
    out = annkernels.short_attention(query, key, value, backend=backend)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, (query, key, value), grad, retain_graph=True)
    second = torch.autograd.grad(out, (query, key, value), grad)
    for name, a, b in zip(("grad_query", "grad_key", "grad_value"), first, second, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("device, backend", backend_cases())
def test_autocast_keeps_the_inputs_dtype(device, backend):
    # The fake kernels promise outputs and gradients in the inputs' dtype; torch.compile relies on it.
    query, key, value = _inputs((2, 33, 10, 16, 8), "channel_first", device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = annkernels.short_attention(query, key, value, backend=backend)
    assert out.dtype == torch.float32
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (query, key, value), grad)
    expected = _oracle(query, key, value, grad)
    for name, actual, wanted in zip(("out", "grad_query", "grad_key", "grad_value"), (out, *grads), expected,
                                    strict=True):
        assert_close(actual, wanted, name=name, **FLOAT32_TOLERANCE)


def _good():
    return torch.randn(2, 10, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 6)


def _replace(index, tensor):
    inputs = list(_good())
    inputs[index] = tensor
    return inputs


@pytest.mark.parametrize("device, backend", backend_cases(include_reference=True))
@pytest.mark.parametrize("layout", ["channel_first", "contiguous"])
def test_empty_query_gives_empty_output_and_gradients(device, backend, layout):
    query, key, value = _inputs((2, 0, 5, 8, 6), layout, device)
    with poisoned_outputs():
        out = annkernels.short_attention(query, key, value, backend=backend)
    assert out.shape == (2, 0, 6) and out.dtype == query.dtype and out.device == query.device
    grad_query, grad_key, grad_value = torch.autograd.grad(out, (query, key, value), torch.randn_like(out))
    assert grad_query.shape == query.shape
    # No query attends to any key: the key and value gradients are zero, not unwritten.
    assert torch.equal(grad_key, torch.zeros_like(key)) and torch.equal(grad_value, torch.zeros_like(value))


@pytest.mark.parametrize("backend", ["reference", "composite"] +
                         (["cpu"] if "cpu" in annkernels.available_backends() else []))
@pytest.mark.parametrize(
    "inputs, scale, error, match",
    [
        (_replace(0, torch.randn(10, 8)), None, ValueError, "query must be 3-D"),
        (_replace(1, torch.randn(2, 5, 8, 1)), None, ValueError, "key must be 3-D"),
        (_replace(1, torch.randn(3, 5, 8)), None, ValueError, "batch sizes differ"),
        (_replace(1, torch.randn(2, 5, 7)), None, ValueError, "share Dk"),
        (_replace(2, torch.randn(2, 4, 6)), None, ValueError, "same number of keys S"),
        (_replace(2, torch.randn(2, 5, 6, dtype=torch.float64)), None, TypeError, "same dtype"),
        (_replace(0, torch.randint(0, 3, (2, 10, 8))), None, TypeError, "query must be float64"),
        (_replace(0, torch.randn(2, 10, 0)), None, ValueError, "query must not be empty"),
        (_replace(1, torch.randn(2, 0, 8)), None, ValueError, "key must not be empty"),
        (list(_good()), float("nan"), ValueError, "scale must be finite"),
        (list(_good()), float("inf"), ValueError, "scale must be finite"),
        (list(_good()), "0.5", TypeError, "scale must be a real number"),
    ],
)
def test_bad_input_raises_clear_error(backend, inputs, scale, error, match):
    with pytest.raises(error, match=match):
        annkernels.short_attention(*inputs, scale=scale, backend=backend)


def test_meta_tensors_give_shapes_without_a_warning(recwarn):
    # Shape propagation (FakeTensor, meta-device model init) resolves "auto" to a backend that runs anywhere.
    query = torch.randn(2, 8, 9, device="meta").transpose(1, 2)
    out = annkernels.short_attention(query, torch.randn(2, 5, 8, device="meta"), torch.randn(2, 5, 4, device="meta"))
    assert out.shape == (2, 9, 4) and out.device.type == "meta" and out.transpose(1, 2).is_contiguous()
    assert not [str(warning.message) for warning in recwarn if "annkernels" in str(warning.message)]


def test_mixed_devices_are_rejected():
    # The meta device stands in for a second device on a machine without a GPU.
    query, key, value = _good()
    with pytest.raises(ValueError, match="same device"):
        annkernels.short_attention(query.to("meta"), key, value)


@pytest.mark.skipif("triton" not in annkernels.available_backends("cpu"), reason="needs the Triton interpreter")
def test_triton_query_offsets_past_2_31_elements():
    # Query rows 2^26 elements apart, so rows 32 to 35 start past element 2^31 of one 4.7 GiB fp16 buffer.
    # torch.empty only reserves it and the kernels touch the query's 36 x 16 elements; a 32-bit offset
    # would wrap and read (or fault) elsewhere. The same query, compact, must give the same bits.
    rows, row_stride, dim = 36, 2**26, 16
    buffer = torch.empty((rows - 1) * row_stride + dim, dtype=torch.float16)
    query = buffer.as_strided((1, rows, dim), (buffer.numel(), row_stride, 1))
    query.copy_(torch.randn(1, rows, dim))
    assert query.storage_offset() + (rows - 1) * row_stride >= 2**31
    key, value = torch.randn(1, 20, dim, dtype=torch.float16), torch.randn(1, 20, 8, dtype=torch.float16)
    grad = torch.randn(1, rows, 8, dtype=torch.float16)
    results = []
    for q in (query, query.clone()):
        leaves = [t.detach().requires_grad_(True) for t in (q, key, value)]
        out = annkernels.short_attention(*leaves, backend="triton")
        results.append((out, *torch.autograd.grad(out, leaves, grad)))
    for name, strided, compact in zip(("out", "grad_query", "grad_key", "grad_value"), *results, strict=True):
        assert torch.equal(strided, compact), name
