"""The custom-op contract: torch.library.opcheck (schema, fake, autograd, dispatch) and torch.compile."""

import pytest
import torch
from conftest import backend_cases

import annkernels

KERNEL_BACKENDS = backend_cases()


@pytest.mark.parametrize("device, backend", KERNEL_BACKENDS)
def test_opcheck_pyramid_pool(device, backend):
    x = torch.randn(2, 3, 7, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.annkernels.pyramid_pool.default, (x, [1, 2, 3], backend))
    grad = torch.randn(2, 3, 14, device=device)
    torch.library.opcheck(torch.ops.annkernels.pyramid_pool_grad.default, (grad, [1, 2, 3], 7, 5, backend))


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


def test_auto_never_picks_an_unverified_gpu_kernel():
    # A CUDA kernel that has not run on a GPU must be asked for by name.
    from annkernels import _backend

    resolved = _backend.resolve("auto", torch.device("cuda"))
    assert resolved == "reference" or resolved in annkernels.GPU_VERIFIED
