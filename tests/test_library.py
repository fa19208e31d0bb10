"""The custom-op contract: torch.library.opcheck (schema, fake, autograd, dispatch) and torch.compile."""

import pytest
import torch

import annkernels
from annkernels.ops.pyramid_pool import PAIR_BACKENDS

from conftest import backend_cases

KERNEL_BACKENDS = backend_cases()


@pytest.mark.parametrize("device, backend", KERNEL_BACKENDS)
def test_opcheck_pyramid_pool(device, backend):
    x = torch.randn(2, 3, 7, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.annkernels.pyramid_pool.default, (x, [1, 2, 3], backend))
    grad = torch.randn(2, 3, 14, device=device)
    torch.library.opcheck(torch.ops.annkernels.pyramid_pool_grad.default, (grad, [1, 2, 3], 7, 5, backend))


@pytest.mark.parametrize("device, backend", [case for case in KERNEL_BACKENDS if case.values[1] in PAIR_BACKENDS])
def test_opcheck_pyramid_pool_pair(device, backend):
    first = torch.randn(2, 3, 7, 5, device=device, requires_grad=True)
    second = torch.randn(2, 4, 7, 5, device=device).to(memory_format=torch.channels_last).requires_grad_(True)
    torch.library.opcheck(torch.ops.annkernels.pyramid_pool_pair.default, (first, second, [1, 2, 3], backend))
    grads = (torch.randn(2, 3, 14, device=device), torch.randn(2, 14, 4, device=device).transpose(1, 2))
    torch.library.opcheck(torch.ops.annkernels.pyramid_pool_pair_grad.default, (*grads, [1, 2, 3], 7, 5, backend))


@pytest.mark.parametrize("device, backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("layout", ["channel_first", "contiguous"])
def test_opcheck_short_attention(device, backend, layout):
    def make(batch, rows, dim):
        if layout == "channel_first":
            return torch.randn(batch, dim, rows, device=device).transpose(1, 2).requires_grad_(True)
        return torch.randn(batch, rows, dim, device=device, requires_grad=True)

    query, key, value = make(2, 9, 8), make(2, 5, 8), make(2, 5, 4)
    torch.library.opcheck(torch.ops.annkernels.short_attention.default, (query, key, value, 0.3, backend))
    with torch.no_grad():
        out, softmax_state = torch.ops.annkernels.short_attention(query, key, value, 0.3, backend)
    grad_out = torch.randn_like(out)
    inputs = [tensor.detach() for tensor in (query, key, value)]
    torch.library.opcheck(torch.ops.annkernels.short_attention_grad.default,
                          (grad_out, *inputs, out, softmax_state, 0.3, backend))


@pytest.mark.parametrize("device, backend", KERNEL_BACKENDS)
def test_compiled_block_has_no_graph_break(device, backend):
    block = annkernels.APNB(16, 16, key_channels=8, value_channels=8, backend=backend).to(device)
    with torch.no_grad():
        block.stages[0].out_project.weight.normal_()
    feats = torch.randn(2, 16, 9, 7, device=device, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(feats)
    expected = block(feats)
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad(out.sum(), feats)
    (expected_grad,) = torch.autograd.grad(expected.sum(), feats)
    torch.testing.assert_close(grad, expected_grad)


def test_backend_context_manager_and_setter():
    assert annkernels.get_backend() == "auto"
    with annkernels.use_backend("reference"):
        assert annkernels.get_backend() == "reference"
    assert annkernels.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown annkernels backend"):
        annkernels.set_backend("fastest")


def test_auto_gives_cuda_tensors_to_composite_until_a_kernel_is_verified(monkeypatch, recwarn):
    # An unverified GPU kernel must be asked for by name; no GPU is needed to check the resolution.
    from annkernels import _backend

    monkeypatch.setattr(_backend, "GPU_VERIFIED", {})
    assert _backend.resolve("auto", torch.device("cuda")) == "composite"
    assert _backend.resolve("auto", torch.device("cuda", 1)) == "composite"
    assert _backend.resolve("auto", torch.device("meta")) == "composite"
    assert not [str(warning.message) for warning in recwarn if "annkernels" in str(warning.message)]

    monkeypatch.setattr(_backend, "GPU_VERIFIED", {"cuda": "H100, tests/ passed"})
    monkeypatch.setattr(_backend, "NATIVE_CUDA", True)
    assert _backend.resolve("auto", torch.device("cuda")) == "cuda"
    assert _backend.resolve("auto", torch.device("meta")) == "composite"  # a verified kernel is for CUDA tensors


def test_auto_without_the_extension_falls_back_to_composite_with_one_warning(monkeypatch):
    from annkernels import _backend

    monkeypatch.setattr(_backend, "NATIVE_CPU", False)
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(UserWarning, match="C\\+\\+ extension is not available.*composite"):
        assert _backend.resolve("auto", torch.device("cpu")) == "composite"


def test_composite_runs_on_every_device():
    for device in ("cpu", "cuda", "meta"):
        assert "composite" in annkernels.available_backends(device)


def test_triton_autotune_switch_keeps_the_first_fitting_config(monkeypatch):
    pytest.importorskip("triton")
    from annkernels.triton import common, pyramid_pool

    kernel = pyramid_pool._pyramid_pool_forward_kernel
    monkeypatch.setattr(common, "INTERPRET", False)  # as on a GPU
    monkeypatch.setenv(common.AUTOTUNE_SWITCH, "1")
    assert kernel.early_config_prune(kernel.configs, {}) == kernel.configs
    monkeypatch.setenv(common.AUTOTUNE_SWITCH, "0")
    assert kernel.early_config_prune(kernel.configs, {}) == kernel.configs[:1]


def test_triton_attention_is_tuned_per_size_class():
    pytest.importorskip("triton")
    from annkernels.triton import common, short_attention

    assert common.size_class(2048) < common.size_class(8192)  # timed separately
    assert common.size_class(9409) == common.size_class(16384)  # one timing per power of two
    kernels = (short_attention._short_attention_forward_kernel, short_attention._short_attention_backward_rows_kernel,
               short_attention._short_attention_backward_keys_kernel)
    for kernel in kernels:
        assert "rows_class" in kernel.keys
