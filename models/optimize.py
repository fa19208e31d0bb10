"""Inference fast path: BatchNorm and the attention output projections folded into convolutions,
channels_last, inductor with freezing.

Load checkpoints into the ``ANNSegmentor`` first, then optimise: folding changes the parameters (every conv
gets a bias, the BatchNorms and output projections become identities), so the optimised model's state_dict no
longer matches mmseg's.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_eval

from annkernels.nn import AFNB, APNB

from .ann import ANNSegmentor
from .checkpoint import unwrap_model


def _conv_norm_pairs(module: nn.Module):
    """(conv name, norm name) pairs where the norm directly follows the conv inside ``module``: consecutive
    children of a Sequential (ConvModule, the stem, a downsample) or ``conv<k>``/``bn<k>`` of a residual block."""
    children = module._modules
    if isinstance(module, nn.Sequential):
        names = list(children)
        return [(a, b) for a, b in zip(names, names[1:], strict=False)
                if isinstance(children[a], nn.Conv2d) and isinstance(children[b], _BatchNorm)]
    return [(name, "bn" + name.removeprefix("conv")) for name, child in children.items()
            if name.startswith("conv") and isinstance(child, nn.Conv2d)
            and isinstance(children.get("bn" + name.removeprefix("conv")), _BatchNorm)]


def fold_batchnorms(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm into the conv before it, in place; the norm becomes nn.Identity.

    Raises ValueError if a BatchNorm is left that does not directly follow a conv (it could not be folded).
    """
    if any(module.training for module in model.modules() if isinstance(module, _BatchNorm)):
        raise ValueError("fold_batchnorms needs eval-mode BatchNorms (running statistics); call model.eval()")
    for parent in list(model.modules()):  # a module reached twice (APNB's shared projection) is listed once
        for conv_name, norm_name in _conv_norm_pairs(parent):
            folded = fuse_conv_bn_eval(getattr(parent, conv_name), getattr(parent, norm_name))
            setattr(parent, conv_name, folded)
            setattr(parent, norm_name, nn.Identity())
    left = [name for name, module in model.named_modules() if isinstance(module, _BatchNorm)]
    if left:
        raise ValueError(f"cannot fold BatchNorm layers that do not follow a conv: {', '.join(left)}")
    return model


@torch.no_grad()
def fold_output_projections(model: nn.Module) -> nn.Module:
    """Fold each APNB/AFNB stage's out_project into its block's fuse conv, in place.

    out_project is a 1x1 conv with bias and reaches the fuse's 1x1 conv only through the concat (the fuse's
    norm and activation come after that conv and are untouched), so
    conv(cat[W_o c + b_o, x]) = (W_c W_o) c + W_x x + (b + W_c b_o), where W_c, W_x are the fuse columns that read
    the context and the input. The fuse then reads the Cv-channel context directly: for ann_r50_d8's AFNB,
    256 + 2048 input channels instead of 4096 and no 256 -> 2048 conv, about 10% of the model's eval FLOPs.
    """
    for block in model.modules():
        if not isinstance(block, (APNB, AFNB)) or len(block.stages) != 1:
            continue
        project, fuse = block.stages[0].out_project, block.bottleneck.conv
        if not isinstance(project, nn.Conv2d):
            continue  # folded already
        context_channels = project.out_channels
        weight = fuse.weight.double().flatten(1)
        context_weight, input_weight = weight[:, :context_channels], weight[:, context_channels:]
        composed = nn.Conv2d(project.in_channels + input_weight.shape[1], fuse.out_channels, 1).to(fuse.weight)
        composed.weight.copy_(torch.cat([context_weight @ project.weight.double().flatten(1), input_weight], 1)
                              .reshape(composed.weight.shape))
        bias = context_weight @ project.bias.double()
        composed.bias.copy_(bias if fuse.bias is None else bias + fuse.bias.double())
        block.bottleneck.conv = composed
        block.stages[0].out_project = nn.Identity()
    return model


class InferenceModel(nn.Module):
    """An optimised ANNSegmentor for inference: ``model(images)`` gives the 1/8-resolution logits and
    ``model.predict(images)`` the logits resized to the input, as ``ANNSegmentor`` does in eval mode.
    Gradients are off; inputs of any memory format are accepted."""

    def __init__(self, network: ANNSegmentor, channels_last: bool, compiled: Callable | None,
                 log: Callable[[str], Any] | None):
        super().__init__()
        self.network = network
        self.channels_last = channels_last
        self.num_classes = network.num_classes
        self.align_corners = network.align_corners
        self._compiled = compiled
        self._log = log
        self._shapes_seen: set[tuple[int, ...]] = set()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last and isinstance(images, torch.Tensor) and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            if self._compiled is None:
                return self.network(images)
            shape = tuple(images.shape)
            if shape not in self._shapes_seen:
                self._shapes_seen.add(shape)
                if self._log is not None:
                    self._log(f"torch.compile (inductor, freezing): first call at input {list(shape)} compiles "
                              "the model, tens of seconds on a CPU (later runs reuse torch's compile cache)")
            return self._compiled(images)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        logits = self(images)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=self.align_corners)

    def train(self, mode: bool = True) -> "InferenceModel":
        if mode:
            raise RuntimeError("an optimised inference model cannot train: its BatchNorms are folded into the "
                               "convolutions; optimise a copy and train the original")
        return super().train(False)


def optimize_for_inference(model: nn.Module, *, channels_last: bool = True, compile: bool = True,
                           log: Callable[[str], Any] | None = print) -> InferenceModel:
    """A copy of ``model`` made fast for eval: BatchNorm folded into every conv, each attention block's output
    projection folded into its fuse conv (``fold_output_projections``), optionally channels_last weights and
    activations, optionally ``torch.compile`` with inductor and freezing (weights become constants of the
    compiled graph, so inductor can pre-pack them for the CPU's convolution library).

    Args:
        model: an ANNSegmentor (or one wrapped in DDP/compile); it is not modified. Load checkpoints first.
        channels_last: store weights and run activations in channels_last (NHWC), the layout the CPU and
            GPU convolution kernels prefer.
        compile: compile on the first call at each new input shape; that takes tens of seconds on a CPU,
            announced through ``log``. Inductor's on-disk caches (on by default in torch) make later
            processes faster. False gives the eager folded model; prefer it for inputs of many sizes.
        log: receives the compile notice (None: silent).

    Returns:
        InferenceModel in eval mode with gradients off; its logits match ``model.eval()``'s to ~1e-5 in fp32.
    """
    network = unwrap_model(model)
    if not isinstance(network, ANNSegmentor):
        raise TypeError(f"optimize_for_inference expects an ANNSegmentor, got {type(network).__name__}")
    network = fold_output_projections(fold_batchnorms(_eval_copy(network)))
    network.requires_grad_(False)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    # dynamic=False: one graph per input shape, so the compile notice is exact.
    compiled = torch.compile(network, dynamic=False, options={"freezing": True}) if compile else None
    return InferenceModel(network, channels_last, compiled, log).eval()


def _eval_copy(network: ANNSegmentor) -> ANNSegmentor:
    was_training = network.training
    try:
        return copy.deepcopy(network.eval())
    finally:
        network.train(was_training)
