"""models.build_segmentor: structure (exact mmseg parameter counts and state_dict keys), output shapes,
dropout placement, loss, input checks, backends, torch.compile / channels_last / bf16 autocast, and the
inference fast path (optimize_for_inference).

R-50/R-101 are built on the meta device (shapes only, no memory or init cost) or run on tiny inputs;
everything that runs many forwards uses ann_r18_d8.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import annkernels
from annkernels import models
from annkernels.models.optimize import fold_batchnorms

from conftest import assert_close

# docs/ann-spec.md §1.2 (counted from mmseg 1.2.2's model; APNB's shared key/query projection counted once).
BACKBONE_PARAMS = {"ann_r50_d8": 23_527_264, "ann_r101_d8": 42_519_392}
DECODE_HEAD_PARAMS = {19: 20_336_659, 21: 20_337_685, 150: 20_403_862}
AUX_HEAD_PARAMS = {19: 2_364_691, 21: 2_365_205, 150: 2_398_358}
TOTAL_PARAMS = {("ann_r50_d8", 19): 46_228_614, ("ann_r50_d8", 150): 46_329_484,
                ("ann_r101_d8", 19): 65_220_742, ("ann_r101_d8", 150): 65_321_612}


def _meta_model(name, num_classes, **options):
    with torch.device("meta"):
        return models.build_segmentor(name, num_classes, **options)


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _randomise_(model):
    """Random weights and BN statistics: out_project starts at zero, which would hide the attention path."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            else:
                tensor.copy_(torch.randn_like(tensor) * 0.1)
    return model


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return _randomise_(models.build_segmentor("ann_r18_d8", 7)).eval()


# ---------------------------------------------------------------- structure

@pytest.mark.parametrize("name, num_classes", [("ann_r50_d8", 19), ("ann_r50_d8", 21), ("ann_r50_d8", 150),
                                               ("ann_r101_d8", 19), ("ann_r101_d8", 150)])
def test_parameter_counts_equal_mmseg(name, num_classes):
    model = _meta_model(name, num_classes)
    assert _count(model.backbone) == BACKBONE_PARAMS[name]
    assert _count(model.decode_head) == DECODE_HEAD_PARAMS[num_classes]
    assert _count(model.auxiliary_head) == AUX_HEAD_PARAMS[num_classes]
    if (name, num_classes) in TOTAL_PARAMS:
        assert _count(model) == TOTAL_PARAMS[name, num_classes]


def _bn(prefix, channels):
    return [(f"{prefix}.{field}", (channels,)) for field in ("weight", "bias", "running_mean", "running_var")] + \
        [(f"{prefix}.num_batches_tracked", ())]


def _conv_module(prefix, out_channels, in_channels, kernel=1):
    return [(f"{prefix}.conv.weight", (out_channels, in_channels, kernel, kernel))] + _bn(f"{prefix}.bn", out_channels)


def _attention_stage(prefix, key_in, query_in, out_channels):
    return (_conv_module(f"{prefix}.key_project", 256, key_in)
            + _conv_module(f"{prefix}.query_project", 256, query_in)
            + [(f"{prefix}.value_project.weight", (256, key_in, 1, 1)), (f"{prefix}.value_project.bias", (256,)),
               (f"{prefix}.out_project.weight", (out_channels, 256, 1, 1)),
               (f"{prefix}.out_project.bias", (out_channels,))])


# docs/ann-spec.md §1.3, decode_head and auxiliary_head of R-50-D8 ADE20K (K=150), in mmseg's state_dict order.
SPEC_HEAD_KEYS = (
    [("decode_head.conv_seg.weight", (150, 512, 1, 1)), ("decode_head.conv_seg.bias", (150,))]
    + _attention_stage("decode_head.fusion.stages.0", 1024, 2048, 2048)
    + _conv_module("decode_head.fusion.bottleneck", 2048, 4096)
    + _conv_module("decode_head.bottleneck", 512, 2048, kernel=3)
    + _attention_stage("decode_head.context.stages.0", 512, 512, 512)
    + _conv_module("decode_head.context.bottleneck", 512, 1024)
    + [("auxiliary_head.conv_seg.weight", (150, 256, 1, 1)), ("auxiliary_head.conv_seg.bias", (150,))]
    + _conv_module("auxiliary_head.convs.0", 256, 1024, kernel=3)
)


def _spec_backbone_keys(blocks_per_layer):
    keys = []
    for index, (out_channels, in_channels) in zip((0, 3, 6), ((32, 3), (32, 32), (64, 32)), strict=True):
        keys += [(f"backbone.stem.{index}.weight", (out_channels, in_channels, 3, 3))]
        keys += _bn(f"backbone.stem.{index + 1}", out_channels)
    in_channels = 64
    for layer, blocks in enumerate(blocks_per_layer, 1):
        planes = 64 * 2 ** (layer - 1)
        for block in range(blocks):
            prefix = f"backbone.layer{layer}.{block}"
            block_in = in_channels if block == 0 else 4 * planes
            keys += [(f"{prefix}.conv1.weight", (planes, block_in, 1, 1))] + _bn(f"{prefix}.bn1", planes)
            keys += [(f"{prefix}.conv2.weight", (planes, planes, 3, 3))] + _bn(f"{prefix}.bn2", planes)
            keys += [(f"{prefix}.conv3.weight", (4 * planes, planes, 1, 1))] + _bn(f"{prefix}.bn3", 4 * planes)
            if block == 0:
                keys += [(f"{prefix}.downsample.0.weight", (4 * planes, in_channels, 1, 1))]
                keys += _bn(f"{prefix}.downsample.1", 4 * planes)
        in_channels = 4 * planes
    return keys


@pytest.mark.parametrize("name, blocks, total", [("ann_r50_d8", (3, 4, 6, 3), 390),
                                                 ("ann_r101_d8", (3, 4, 23, 3), 696)])
def test_state_dict_keys_and_shapes_equal_mmseg(name, blocks, total):
    state_dict = _meta_model(name, 150).state_dict()
    assert len(state_dict) == total
    backbone = [(k, tuple(v.shape)) for k, v in state_dict.items() if k.startswith("backbone.")]
    heads = [(k, tuple(v.shape)) for k, v in state_dict.items() if not k.startswith("backbone.")]
    assert backbone == _spec_backbone_keys(blocks)
    assert heads == SPEC_HEAD_KEYS
    conv_biases = [k for k in state_dict if k.endswith(".bias") and state_dict[k[:-4] + "weight"].dim() == 4]
    # Only value_project, out_project (x2 blocks) and conv_seg (x2 heads) have conv biases (docs/ann-spec.md §1.3).
    assert sorted(k.rsplit(".", 2)[-2] for k in conv_biases) == ["conv_seg"] * 2 + ["out_project"] * 2 + \
        ["value_project"] * 2


def test_apnb_key_and_query_projection_are_one_module():
    model = _meta_model("ann_r18_d8", 3)
    stage = model.decode_head.context.stages[0]
    assert stage.query_project is stage.key_project
    fusion = model.decode_head.fusion.stages[0]
    assert fusion.query_project is not fusion.key_project


def test_authors_variant_structure():
    model = _meta_model("ann_r101_d8", 19, variant="authors")
    assert model.align_corners is True
    assert model.backbone.stem[0].out_channels == 64 and model.backbone.stem[6].out_channels == 128
    assert model.backbone.maxpool.ceil_mode
    head = model.decode_head
    for conv in (head.fusion.stages[0].key_project.conv, head.fusion.stages[0].query_project.conv,
                 head.fusion.bottleneck.conv, head.bottleneck.conv, head.context.stages[0].key_project.conv,
                 head.context.bottleneck.conv):
        assert conv.bias is not None
    assert model.auxiliary_head.convs[0].conv.out_channels == 512
    assert isinstance(head.dropout, torch.nn.Identity)
    for block in (head.fusion, head.context):
        assert isinstance(block.dropout, torch.nn.Dropout2d) and block.dropout.p == 0.05
    assert model.auxiliary_head.dropout.p == 0.05


def test_build_errors():
    with pytest.raises(ValueError, match="ann_r18_d8, ann_r50_d8, ann_r101_d8"):
        models.build_segmentor("ann_r34_d8", 19)
    with pytest.raises(ValueError, match="valid variants: mmseg, authors"):
        models.build_segmentor("ann_r18_d8", 19, variant="paper")
    with pytest.raises(ValueError, match="num_classes"):
        models.build_segmentor("ann_r18_d8", 0)
    with pytest.raises(ValueError, match="norm_layer"):
        models.build_segmentor("ann_r18_d8", 19, norm_layer="GN")
    with pytest.raises(ValueError, match="dropout"):
        models.build_segmentor("ann_r18_d8", 19, dropout=1.5)


def test_norm_layer_option_reaches_every_norm():
    model = _meta_model("ann_r18_d8", 4, norm_layer="SyncBN")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)


def test_initialisation_follows_mmseg():
    torch.manual_seed(0)
    model = models.build_segmentor("ann_r18_d8", 150)
    for head in (model.decode_head, model.auxiliary_head):
        std = head.conv_seg.weight.std().item()
        assert 0.008 < std < 0.012 and not head.conv_seg.bias.any()
    for block in (model.decode_head.fusion, model.decode_head.context):
        assert not block.stages[0].out_project.weight.any() and not block.stages[0].out_project.bias.any()
    conv = model.decode_head.bottleneck.conv  # Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (out * k * k))
    expected = math.sqrt(2.0 / (conv.out_channels * 9))
    assert abs(conv.weight.std().item() / expected - 1) < 0.05


# ---------------------------------------------------------------- shapes and data flow

@pytest.mark.parametrize("height, width, batch", [(97, 97, 2), (257, 513, 1), (33, 48, 3), (8, 9, 1)])
def test_r18_output_shapes(r18, height, width, batch):
    images = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        assert r18(images).shape == (batch, 7, math.ceil(height / 8), math.ceil(width / 8))


def test_predict_is_full_resolution(r18):
    with torch.no_grad():
        assert r18.predict(torch.randn(2, 3, 21, 30)).shape == (2, 7, 21, 30)


@pytest.mark.parametrize("name", ["ann_r50_d8", "ann_r101_d8"])
def test_large_variants_output_shapes(name):
    model = models.build_segmentor(name, 5)
    images = torch.randn(1, 3, 12, 17)  # tiny: these runs only check the plumbing
    with torch.no_grad():
        outputs = model.train()(images)
        assert outputs["out"].shape == outputs["aux"].shape == (1, 5, 2, 3)
        assert model.eval()(images).shape == (1, 5, 2, 3)


def test_train_mode_returns_main_and_aux(r18):
    r18.train()
    try:
        with torch.no_grad():
            outputs = r18(torch.randn(2, 3, 17, 26))
    finally:
        r18.eval()
    assert set(outputs) == {"out", "aux"}
    assert outputs["out"].shape == outputs["aux"].shape == (2, 7, 3, 4)


def test_authors_variant_keeps_ceil_mode_sizes():
    model = models.build_segmentor("ann_r18_d8", 3, variant="authors").eval()
    with torch.no_grad():
        # 64 -> stem 32 -> ceil-mode max-pool 17 -> 9 (mmseg: 8); odd 97 -> 49 -> 25 -> 13 as mmseg.
        assert model(torch.randn(1, 3, 64, 97)).shape == (1, 3, 9, 13)


def test_predict_resizes_with_configured_align_corners(r18):
    images = torch.randn(1, 3, 20, 27)
    with torch.no_grad():
        logits = r18(images)
        expected = F.interpolate(logits, size=(20, 27), mode="bilinear", align_corners=False)
        assert_close(r18.predict(images), expected, atol=0, rtol=0, name="predict")


def _record_inputs(module, calls):
    return module.register_forward_hook(lambda mod, args, out: calls.append(tuple(args[0].shape[:2])))


def test_dropout_placement_mmseg(r18):
    # mmseg: one Dropout2d(0.1) applied after AFNB (2048-wide for R-50, 512 for R-18) and before conv_seg,
    # none inside the blocks; the auxiliary head drops out before its conv_seg.
    model = copy.deepcopy(r18).train()
    head = model.decode_head
    assert isinstance(head.dropout, torch.nn.Dropout2d) and head.dropout.p == 0.1
    assert isinstance(head.fusion.dropout, torch.nn.Identity) and isinstance(head.context.dropout, torch.nn.Identity)
    head_calls, aux_calls, seg_calls = [], [], []
    hooks = [_record_inputs(head.dropout, head_calls), _record_inputs(model.auxiliary_head.dropout, aux_calls),
             _record_inputs(head.conv_seg, seg_calls)]
    with torch.no_grad():
        model(torch.randn(2, 3, 12, 12))
    for hook in hooks:
        hook.remove()
    assert head_calls == [(2, 512), (2, 128)]
    assert aux_calls == [(2, 64)]
    assert seg_calls == [(2, 128)]


# ---------------------------------------------------------------- input checks

@pytest.mark.parametrize("images, error, match", [
    (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), TypeError, "floating-point"),
    (torch.zeros(3, 16, 16), ValueError, r"\[B, 3, H, W\]"),
    (torch.zeros(1, 4, 16, 16), ValueError, r"\[B, 3, H, W\]"),
    (torch.zeros(0, 3, 16, 16), ValueError, "empty"),
    ([[0.0]], TypeError, "torch.Tensor"),
])
def test_bad_input_is_rejected(r18, images, error, match):
    with pytest.raises(error, match=match):
        r18(images)
    with pytest.raises(error, match=match):
        r18.predict(images)


# ---------------------------------------------------------------- loss

def _manual_ce(logits, target, ignore_index, divide_by_all):
    logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    log_probs = logits.log_softmax(1)
    labelled = target != ignore_index
    picked = log_probs.gather(1, target.clamp(max=logits.shape[1] - 1)[:, None])[:, 0]
    total = -(picked * labelled).sum()
    return total / (target.numel() if divide_by_all else labelled.sum())


def test_loss_matches_mmseg_averaging():
    logits = {"out": torch.randn(2, 5, 4, 6), "aux": torch.randn(2, 5, 4, 6)}
    target = torch.randint(0, 5, (2, 29, 45))
    target[:, :10] = 255  # about a third of the pixels unlabelled
    for avg_non_ignore in (False, True):
        total, parts = models.segmentation_loss(logits, target, avg_non_ignore=avg_non_ignore)
        main = _manual_ce(logits["out"], target, 255, divide_by_all=not avg_non_ignore)
        aux = _manual_ce(logits["aux"], target, 255, divide_by_all=not avg_non_ignore)
        assert_close(parts["loss_out"], main, 1e-6, 1e-5, "main loss")
        assert_close(parts["loss_aux"], aux, 1e-6, 1e-5, "aux loss")
        assert_close(total, main + 0.4 * aux, 1e-6, 1e-5, "total loss")
    resized = F.interpolate(logits["out"], size=(29, 45), mode="bilinear", align_corners=False)
    labelled = target != 255
    accuracy = ((resized.argmax(1) == target) & labelled).sum() * 100.0 / labelled.sum()
    assert_close(parts["acc_seg"], accuracy, 1e-5, 0, "acc_seg")


def test_loss_edge_cases():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.full((1, 16, 16), 255)
    total, parts = models.segmentation_loss(logits, target, avg_non_ignore=True)
    assert total.item() == 0 and set(parts) == {"loss_out", "acc_seg"}
    total.backward()  # an all-ignored batch still has a (zero) gradient path
    with pytest.raises(ValueError, match="target"):
        models.segmentation_loss(logits, torch.zeros(1, 16, 16))  # float labels


# ---------------------------------------------------------------- backends, compile, layouts, dtypes

def _with_backend(model, backend):
    """A copy of ``model`` whose attention blocks run on ``backend`` (None: the model as built, "auto")."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = backend
    return model


@pytest.mark.parametrize("backend", [name for name in ("cpu", "composite")
                                     if name in annkernels.available_backends("cpu")])
def test_backend_matches_reference_on_whole_model(r18, backend):
    reference = _with_backend(r18, "reference")
    native = _with_backend(r18, backend)
    images = torch.randn(2, 3, 27, 21)  # 4 x 3 maps at 1/8: S = 110 keys exceed the 12 positions
    with torch.no_grad():
        assert_close(native(images), reference(images), 1e-4, 1e-4, "eval logits")
    outputs = []
    for model in (reference, native):
        model.train()
        torch.manual_seed(1)  # same dropout masks
        result = model(images)
        (result["out"].square().mean() + result["aux"].square().mean()).backward()
        outputs.append(result)
    assert_close(outputs[1]["out"], outputs[0]["out"], 1e-4, 1e-4, "train logits")
    reference_grads = dict(reference.named_parameters())
    for name, parameter in native.named_parameters():
        assert_close(parameter.grad, reference_grads[name].grad, 1e-4, 1e-3, f"{name}.grad")


@pytest.mark.parametrize("backend", [None, "composite"], ids=["auto", "composite"])
def test_torch_compile_fullgraph_aot_eager(r18, backend):
    # aot_eager traces the whole model (custom ops through their fake kernels) without inductor's C++
    # code generation, which takes minutes on two CPU cores; the inductor run is the slow test below.
    model = _with_backend(r18, backend)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    images = torch.randn(1, 3, 33, 35)
    with torch.no_grad():
        assert_close(compiled(images), model(images), 1e-5, 1e-5, "compiled logits")


def test_torch_compile_fullgraph_training_step():
    # The training step (train-mode forward with BatchNorm updates, loss, backward through the custom ops'
    # registered autograd) traces as one graph. Dropout off: compiled and eager dropout masks differ.
    model = _randomise_(models.build_segmentor("ann_r18_d8", 5, dropout=0.0)).train()
    compiled_model = copy.deepcopy(model)
    images, target = torch.randn(2, 3, 33, 35), torch.randint(0, 5, (2, 33, 35))

    def loss_of(network):
        return models.segmentation_loss(network(images), target, align_corners=network.align_corners)[0]

    compiled = torch.compile(loss_of, backend="aot_eager", fullgraph=True)
    expected, actual = loss_of(model), compiled(compiled_model)
    expected.backward()
    actual.backward()
    assert_close(actual, expected, 1e-5, 1e-5, "compiled loss")
    grads = dict(model.named_parameters())
    for name, parameter in compiled_model.named_parameters():
        assert_close(parameter.grad, grads[name].grad, 1e-5, 1e-4, f"{name}.grad")
    bn, compiled_bn = model.backbone.stem[1], compiled_model.backbone.stem[1]
    assert_close(compiled_bn.running_mean, bn.running_mean, 1e-6, 1e-5, "BatchNorm running mean")


@pytest.mark.slow
def test_torch_compile_inductor(r18):
    compiled = torch.compile(r18, fullgraph=True)
    images = torch.randn(1, 3, 33, 35)
    with torch.no_grad():
        assert_close(compiled(images), r18(images), 1e-4, 1e-4, "compiled logits")


def test_channels_last_matches_contiguous(r18):
    images = torch.randn(2, 3, 37, 29)
    model = copy.deepcopy(r18).to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = r18(images)
        actual = model(images.contiguous(memory_format=torch.channels_last))
    assert_close(actual, expected, 1e-4, 1e-4, "channels_last logits")


@pytest.mark.parametrize("backend", [None, "composite"], ids=["auto", "composite"])
def test_bf16_autocast_on_cpu(r18, backend):
    model = _with_backend(r18, backend)
    images = torch.randn(1, 3, 41, 41)
    with torch.no_grad():
        expected = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model(images)
    assert actual.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits; through ~20 layers the logits stay within a few % of their range.
    error = (actual.float() - expected).abs().max().item()
    assert error <= 0.05 * expected.abs().max().item(), f"bf16 error {error:.3g} vs scale {expected.abs().max():.3g}"


# ---------------------------------------------------------------- optimize_for_inference

@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
def test_folded_model_gives_the_same_logits(r18, channels_last):
    fast = models.optimize_for_inference(r18, channels_last=channels_last, compile=False)
    assert not any(isinstance(module, _BatchNorm) for module in fast.modules())
    fusion = fast.network.decode_head.fusion  # out_project folded into the fuse: 64 + 512 inputs, not 1024
    assert isinstance(fusion.stages[0].out_project, torch.nn.Identity)
    assert fusion.bottleneck.conv.in_channels == 64 + 512
    assert all(not parameter.requires_grad for parameter in fast.parameters())
    images = torch.randn(2, 3, 37, 29)
    with torch.no_grad():
        expected = r18(images)
        expected_full = r18.predict(images)
    actual = fast(images)
    assert actual.requires_grad is False
    assert_close(actual, expected, 1e-4, 1e-4, "logits")
    assert_close(fast.predict(images), expected_full, 1e-4, 1e-4, "predict")
    if channels_last:
        first_conv = fast.network.backbone.stem[0]
        assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_original_model_is_left_alone(r18):
    model = copy.deepcopy(r18).train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    models.optimize_for_inference(model, compile=False)
    assert model.training
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert isinstance(model.backbone.stem[1], _BatchNorm)


def test_authors_variant_folds_into_biased_convs():
    torch.manual_seed(1)
    model = _randomise_(models.build_segmentor("ann_r18_d8", 5, variant="authors")).eval()
    assert model.decode_head.bottleneck.conv.bias is not None
    fast = models.optimize_for_inference(model, compile=False)
    images = torch.randn(1, 3, 41, 33)
    with torch.no_grad():
        assert_close(fast(images), model(images), 1e-4, 1e-4, "authors-variant logits")


def test_mmseg_checkpoint_loads_before_optimisation(r18, tmp_path):
    path = tmp_path / "ann_r18.pth"
    torch.save({"meta": {"mmseg_version": "1.2.2"}, "state_dict": r18.state_dict()}, path)
    model = models.build_segmentor("ann_r18_d8", 7)
    models.load_checkpoint(model, path)
    fast = models.optimize_for_inference(model.eval(), compile=False)
    images = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        assert_close(fast(images), r18(images), 1e-4, 1e-4, "logits after checkpoint load")


def test_bad_uses_are_rejected(r18):
    with pytest.raises(TypeError, match="ANNSegmentor"):
        models.optimize_for_inference(torch.nn.Conv2d(3, 3, 1), compile=False)
    with pytest.raises(ValueError, match="eval-mode BatchNorms"):
        fold_batchnorms(copy.deepcopy(r18).train())
    unfoldable = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.BatchNorm2d(3)).eval()
    with pytest.raises(ValueError, match="do not follow a conv: 1"):
        fold_batchnorms(unfoldable)
    fast = models.optimize_for_inference(r18, compile=False)
    with pytest.raises(RuntimeError, match="cannot train"):
        fast.train()


@pytest.mark.slow
def test_compiled_fast_path_gives_the_same_logits(r18):
    notices = []
    fast = models.optimize_for_inference(r18, log=notices.append)
    images = torch.randn(1, 3, 33, 35)
    with torch.no_grad():
        expected = r18(images)
    assert_close(fast(images), expected, 1e-4, 1e-4, "compiled logits")
    assert_close(fast(images), expected, 1e-4, 1e-4, "compiled logits, second call")
    assert len(notices) == 1 and "compiles" in notices[0]
