"""APNB / AFNB / NonLocal2d: every backend gives the reference backend's outputs and gradients."""

import copy

import pytest
import torch
from torch import nn

import annkernels

from conftest import assert_close, backend_cases


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """The comparisons below allow 1e-4; TF32 convolutions and matmuls on a GPU (cuDNN's default) are
    off by about 1e-3, so they run in full fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _randomise(block):
    # out_project starts at zero, which would hide the attention path from the comparison.
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    return block


def _with_backend(block, backend):
    clone = copy.deepcopy(block)
    for stage in clone.stages:
        stage.backend = backend
    return clone


def _compare(block, backend, inputs, training):
    reference_block = _with_backend(block, "reference").train(training)
    tested_block = _with_backend(block, backend).train(training)
    leaves = [[t.clone().requires_grad_(True) for t in inputs] for _ in range(2)]
    outputs = [reference_block(*leaves[0]), tested_block(*leaves[1])]
    grad = torch.randn_like(outputs[0])
    for out in outputs:
        out.backward(grad)
    assert_close(outputs[1], outputs[0], atol=1e-4, rtol=1e-4, name="output")
    for index, (expected, actual) in enumerate(zip(leaves[0], leaves[1], strict=True)):
        assert_close(actual.grad, expected.grad, atol=1e-4, rtol=1e-4, name=f"input {index} grad")
    reference_params = dict(reference_block.named_parameters())
    for name, parameter in tested_block.named_parameters():
        assert_close(parameter.grad, reference_params[name].grad, atol=1e-3, rtol=1e-4, name=f"{name}.grad")


@pytest.mark.parametrize("device, backend", backend_cases())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_apnb_matches_reference_backend(device, backend, training):
    block = _randomise(annkernels.APNB(32, 24, key_channels=16, value_channels=12)).to(device)
    _compare(block, backend, [torch.randn(2, 32, 11, 9, device=device)], training)


@pytest.mark.parametrize("device, backend", backend_cases())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_afnb_matches_reference_backend(device, backend, training):
    block = _randomise(annkernels.AFNB(20, 28, 24, key_channels=16, value_channels=8, pool_scales=(1, 2, 3, 6)))
    block = block.to(device)
    _compare(block, backend, [torch.randn(2, 20, 7, 13, device=device), torch.randn(2, 28, 7, 13, device=device)],
             training)


def test_apnb_shares_key_and_query_projection():
    block = annkernels.APNB(16, 16, key_channels=8, value_channels=8)
    stage = block.stages[0]
    assert stage.query_project is stage.key_project
    keys = block.state_dict().keys()
    # Both names are saved, as in mmsegmentation's checkpoints.
    assert "stages.0.query_project.conv.weight" in keys and "stages.0.key_project.conv.weight" in keys


def test_afnb_has_separate_projections_and_no_fuse_relu():
    block = annkernels.AFNB(16, 24, 32, key_channels=8, value_channels=8)
    stage = block.stages[0]
    assert stage.query_project is not stage.key_project
    assert stage.query_project.conv.in_channels == 24 and stage.key_project.conv.in_channels == 16
    assert not hasattr(block.bottleneck, "activate")
    assert hasattr(annkernels.APNB(8, 8, 4, 4).bottleneck, "activate")


def test_zero_initialised_output_makes_context_zero():
    block = annkernels.APNB(16, 16, key_channels=8, value_channels=8).eval()
    feats = torch.randn(1, 16, 5, 6)
    stage = block.stages[0]
    assert torch.count_nonzero(stage(feats, feats)) == 0


def test_blocks_accept_sync_batchnorm_norm_layer():
    block = annkernels.APNB(16, 16, key_channels=8, value_channels=8, norm_layer=nn.SyncBatchNorm)
    assert isinstance(block.stages[0].key_project.bn, nn.SyncBatchNorm)


def test_block_rejects_wrong_channel_count():
    block = annkernels.APNB(16, 16, key_channels=8, value_channels=8)
    with pytest.raises(ValueError, match=r"feats must be \[B, 16, H, W\]"):
        block(torch.randn(1, 15, 5, 5))


@pytest.mark.parametrize("attention", ["matmul", "sdpa"])
def test_non_local_baseline_matches_its_definition(attention):
    block = _randomise(annkernels.NonLocal2d(12, key_channels=8, value_channels=6, attention=attention)).eval()
    feats = torch.randn(2, 12, 5, 7)
    key = block.key_project(feats).flatten(2).transpose(1, 2)
    value = block.value_project(feats).flatten(2).transpose(1, 2)
    context = torch.softmax(key @ key.transpose(1, 2) / 8**0.5, -1) @ value
    context = block.out_project(context.transpose(1, 2).reshape(2, 6, 5, 7))
    expected = block.bottleneck(torch.cat([context, feats], 1))
    assert_close(block(feats), expected, atol=1e-5, rtol=1e-5, name="non-local")


@pytest.mark.parametrize("device, backend", backend_cases())
def test_value_projection_runs_on_pooled_positions(device, backend):
    # The value conv is applied to the S pooled positions (the reorder), except on the reference backend,
    # which projects every pixel as mmseg does; the equivalence itself is the _compare tests above.
    block = annkernels.APNB(16, 16, key_channels=8, value_channels=8).to(device)
    pixelwise_calls = []
    block.stages[0].value_project.register_forward_hook(lambda *args: pixelwise_calls.append(1))
    feats = torch.randn(1, 16, 7, 5, device=device)
    _with_backend(block, backend)(feats)
    assert pixelwise_calls == []
    _with_backend(block, "reference")(feats)
    assert pixelwise_calls == [1]

