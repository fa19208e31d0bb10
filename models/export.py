"""ONNX export of an ANN segmentor, at a fixed input size or at any size, and an ONNX Runtime runner for it.

``adaptive_avg_pool2d`` to 3x3/6x6/8x8 has no ONNX form when the sizes do not divide the feature map
(pytorch#42653, mmsegmentation#1840). annkernels resolves every backend to the reference one during an export,
which keeps its custom ops out of the graph, and the reference's export form builds the pyramid pooling in the
graph from the runtime map size with adaptive pooling's own bins (``annkernels.ops.reference.pyramid_pool_in_graph``):
exact at every size, so ``dynamic_size=True`` only has to mark height and width free.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import unwrap_model

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# ONNX metadata_props keys read back by OnnxSegmentor.
RESIZED_KEY = "annkernels.resized_to_input"
ALIGN_CORNERS_KEY = "annkernels.align_corners"
NUM_CLASSES_KEY = "annkernels.num_classes"  # the output's shape may not carry it (Resize's shape inference)


def export_onnx(model: nn.Module, path: str | os.PathLike, height: int, width: int, dynamic_size: bool = False,
                resize_to_input: bool = False, opset: int | None = None, example_batch: int = 2,
                dynamo: bool = False) -> str:
    """Export ``model`` (eval-mode main logits) to ONNX.

    Args:
        model: an ANNSegmentor; exported in eval mode (its mode is restored afterwards).
        path: output .onnx file.
        height, width: the size of the tracing input. With dynamic_size=False also the only size the graph
            accepts (its pooling matrices are built for that size's 1/8-resolution map).
        dynamic_size: export height and width as free dimensions; the pyramid pooling, the padding and the
            final resize follow the runtime size. Exact at every size (see the module docstring).
        resize_to_input: end the graph with ``model.predict``'s bilinear resize to the input size, so the
            output is [batch, K, H, W]; otherwise it is the 1/8-resolution [batch, K, ceil(H/8), ceil(W/8)].
        opset: ONNX opset (None: the exporter's default).
        example_batch: batch of the tracing input (the exported batch dimension is always dynamic; 2 avoids
            torch.export specialising a size-1 dimension).
        dynamo: False (the default, and the one the tests use) picks the TorchScript exporter, deprecated
            since torch 2.9 but exporting both graphs on torch 2.11 and 2.13. True picks the torch.export-based
            one, which also exports both on 2.11 and 2.13 (the dynamic graph checked by hand at five sizes,
            within 1e-6 of eager) but is ~10x slower: for ann_r18_d8 on 2 busy shared cores, dynamic size
            16 s TorchScript against 146 s (2.13) and 179 s (2.11); fixed size 3 s against 73 s.

    Returns:
        The path. Graph: input "images" [batch, 3, height, width] float32 -> output "logits"; the metadata
        records whether the output is already at the input size, the model's align_corners and its class
        count, which ``OnnxSegmentor`` reads.
    """
    for name, value in (("height", height), ("width", width), ("example_batch", example_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    model = unwrap_model(model)
    parameter = next(model.parameters())
    images = torch.randn(example_batch, 3, height, width, dtype=parameter.dtype, device=parameter.device)
    network = _Predictor(model) if resize_to_input else model
    spatial = {2: "height", 3: "width"} if dynamic_size else {}
    output_spatial = ({2: "height", 3: "width"} if resize_to_input else {2: "map_height", 3: "map_width"}) \
        if dynamic_size else {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if dynamo:
                dimensions = {0: torch.export.Dim("batch", min=1)}
                dimensions.update({axis: torch.export.Dim(name, min=1) for axis, name in spatial.items()})
                dynamic = {"dynamic_shapes": {"images": dimensions}}
            else:
                dynamic = {"dynamic_axes": {INPUT_NAME: {0: "batch", **spatial},
                                            OUTPUT_NAME: {0: "batch", **output_spatial}}}
            torch.onnx.export(network, (images,), os.fspath(path), input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opset, dynamo=dynamo, **dynamic)
    finally:
        model.train(was_training)
    _write_metadata(path, {RESIZED_KEY: str(resize_to_input), ALIGN_CORNERS_KEY: str(model.align_corners),
                           NUM_CLASSES_KEY: str(model.num_classes)})
    return os.fspath(path)


class _Predictor(nn.Module):
    """model.predict as a module's forward, for the exporter."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.predict(images)


def _write_metadata(path, entries: dict[str, str]) -> None:
    import onnx

    exported = onnx.load(os.fspath(path))
    for key, value in entries.items():
        exported.metadata_props.add(key=key, value=value)
    onnx.save(exported, os.fspath(path))


class OnnxSegmentor:
    """An exported segmentor run by ONNX Runtime, called like the PyTorch model.

    ``runner(images)`` gives the graph's logits and ``runner.predict(images)`` the logits at the input size
    (resized bilinearly, as ANNSegmentor.predict, when the graph ends at 1/8 resolution), so it can stand in for
    the model in train/prediction.py. Images: normalised float [B, 3, H, W] tensors or arrays; a fixed-size
    graph takes only its own H x W.
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",)):
        import onnxruntime

        self.path = os.fspath(path)
        self.session = onnxruntime.InferenceSession(self.path, providers=list(providers))
        metadata = self.session.get_modelmeta().custom_metadata_map
        if NUM_CLASSES_KEY not in metadata:
            raise ValueError(f"{self.path} was not written by annkernels' export_onnx (no {NUM_CLASSES_KEY} "
                             "metadata): export it again")
        self.resized_to_input = metadata.get(RESIZED_KEY) == "True"
        self.align_corners = metadata.get(ALIGN_CORNERS_KEY) == "True"
        self.num_classes = int(metadata[NUM_CLASSES_KEY])
        height, width = self.session.get_inputs()[0].shape[2:]
        # A named (str) dimension is free; an int one is the size the graph was exported for.
        self.input_size = (height, width) if isinstance(height, int) and isinstance(width, int) else None

    def __call__(self, images) -> torch.Tensor:
        images = torch.as_tensor(images)
        self._check(images)
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: array})
        return torch.from_numpy(logits).to(images.device)

    def predict(self, images) -> torch.Tensor:
        images = torch.as_tensor(images)
        logits = self(images)
        if self.resized_to_input:
            return logits
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=self.align_corners)

    def _check(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.path}: images must be [B, 3, H, W], got shape {tuple(images.shape)}")
        if images.numel() == 0:
            raise ValueError(f"{self.path}: images must not be empty, got shape {tuple(images.shape)}")
        if self.input_size is not None and tuple(images.shape[2:]) != self.input_size:
            raise ValueError(f"{self.path} was exported for {self.input_size[0]}x{self.input_size[1]} images, got "
                             f"{images.shape[2]}x{images.shape[3]}: resize them, or export with dynamic_size=True")
