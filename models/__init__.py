"""ANN segmentation models with mmsegmentation-compatible structure and checkpoints.

Installed as ``annkernels.models`` from the repository's top-level models/ folder (setup.py maps it).
``annkernels.models.zoo`` (the released weights) loads on first use, so that ``python -m
annkernels.models.zoo`` runs it as a script without importing it twice.
"""

import importlib

from .ann import ARCHITECTURES, VARIANTS, ANNHead, ANNSegmentor, FCNHead, build_segmentor, segmentation_loss
from .checkpoint import (
    CheckpointError,
    LoadResult,
    checkpoint_file,
    load_checkpoint,
    load_pretrained_backbone,
    read_checkpoint,
    unwrap_model,
)
from .export import OnnxSegmentor, export_onnx
from .optimize import InferenceModel, fold_batchnorms, optimize_for_inference
from .resnet import ResNetV1c

if __name__ != "annkernels.models":
    # From the repository root `import models` finds this folder as a second, separate package: its classes, zoo
    # entries and checkpoint helpers would not be annkernels.models' own (isinstance and zoo additions fail).
    raise ImportError(f"import annkernels.models, not {__name__}: the models/ folder is installed under that name "
                      "(pip install -e . or pip install .)")

__all__ = [
    "ARCHITECTURES",
    "VARIANTS",
    "ANNHead",
    "ANNSegmentor",
    "CheckpointError",
    "FCNHead",
    "InferenceModel",
    "LoadResult",
    "OnnxSegmentor",
    "ResNetV1c",
    "build_segmentor",
    "checkpoint_file",
    "export_onnx",
    "fold_batchnorms",
    "load_checkpoint",
    "load_pretrained_backbone",
    "optimize_for_inference",
    "read_checkpoint",
    "segmentation_loss",
    "unwrap_model",
    "zoo",
]


def __getattr__(name: str):
    if name == "zoo":
        return importlib.import_module(".zoo", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
