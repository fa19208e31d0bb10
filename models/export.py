"""ONNX export of an ANN segmentor at a fixed input size with a dynamic batch dimension.

``adaptive_avg_pool2d`` to 3x3/6x6/8x8 has no ONNX form when the sizes do not divide the feature map
(pytorch#42653, mmsegmentation#1840). At a fixed H x W the pyramid pooling is a constant linear map, so the
reference backend of annkernels, when ``torch.onnx.is_in_onnx_export()``, computes it as
``x.flatten(2) @ M`` with M = ``annkernels.ops.reference.pooling_matrix(h, w, scales)`` [h*w, S]: one MatMul
whose batch dimension stays free. annkernels resolves every backend to the reference one during an export,
which also keeps its custom ops out of the graph.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .checkpoint import unwrap_model

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def export_onnx(model: nn.Module, path: str | os.PathLike, height: int, width: int, opset: int | None = None,
                example_batch: int = 2, dynamo: bool = False) -> str:
    """Export ``model`` (eval-mode main logits) to ONNX.

    Args:
        model: an ANNSegmentor; exported in eval mode (its mode is restored afterwards).
        path: output .onnx file.
        height, width: the fixed input size; the pooling matrices are built for its 1/8-resolution map.
        opset: ONNX opset (None: the exporter's default).
        example_batch: batch of the tracing input (the exported batch dimension is dynamic; 2 avoids
            torch.export specialising a size-1 dimension).
        dynamo: False uses the TorchScript exporter (deprecated since torch 2.9, but ~20x faster here: 3 s
            versus 73 s for ann_r18_d8 on 2 shared cores); True uses the torch.export-based one. Both give
            a graph without adaptive pooling and matched PyTorch to ~1e-5 in our check.

    Returns:
        The path. Graph: input "images" [batch, 3, height, width] float32 -> "logits" [batch, K, h, w].
    """
    for name, value in (("height", height), ("width", width), ("example_batch", example_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    model = unwrap_model(model)
    parameter = next(model.parameters())
    images = torch.randn(example_batch, 3, height, width, dtype=parameter.dtype, device=parameter.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if dynamo:
                dynamic = {"dynamic_shapes": {"images": {0: torch.export.Dim("batch", min=1)}}}
            else:
                dynamic = {"dynamic_axes": {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}}
            torch.onnx.export(model, (images,), os.fspath(path), input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opset, dynamo=dynamo, **dynamic)
    finally:
        model.train(was_training)
    return os.fspath(path)
