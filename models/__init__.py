"""ANN segmentation models with mmsegmentation-compatible structure and checkpoints."""

from models.ann import ARCHITECTURES, VARIANTS, ANNHead, ANNSegmentor, FCNHead, build_segmentor, segmentation_loss
from models.checkpoint import (
    CheckpointError,
    LoadResult,
    checkpoint_file,
    load_checkpoint,
    load_pretrained_backbone,
    read_checkpoint,
    unwrap_model,
)
from models.optimize import InferenceModel, fold_batchnorms, optimize_for_inference
from models.resnet import ResNetV1c

__all__ = [
    "ARCHITECTURES",
    "VARIANTS",
    "ANNHead",
    "ANNSegmentor",
    "CheckpointError",
    "FCNHead",
    "InferenceModel",
    "LoadResult",
    "ResNetV1c",
    "build_segmentor",
    "checkpoint_file",
    "fold_batchnorms",
    "load_checkpoint",
    "load_pretrained_backbone",
    "optimize_for_inference",
    "read_checkpoint",
    "segmentation_loss",
    "unwrap_model",
]
