"""Write any checkpoint ``load_checkpoint`` accepts as a safetensors file, or as an ONNX graph.

    python -m annkernels.models.convert SRC DST.safetensors
    python -m annkernels.models.convert SRC DST.onnx --dynamic-size [--resize-to-input] [--size H W] [--model ...]

SRC is a file (ours or mmseg's), an http(s) URL or a zoo name (``python -m annkernels.models.zoo``).

A safetensors file holds the weights, wrapper prefixes removed, and, for our training checkpoints, the training
config as JSON metadata (``config``). Optimizer and RNG states are left out: the file is for inference and
fine-tuning, not for resuming. A tensor the model stores under two names (APNB's shared key/query projection)
is written once; ``load_checkpoint`` supplies the other name.

An ONNX graph is ``export_onnx`` of the segmentor with those weights (see its docstring). The architecture is
--model, else the one our checkpoint's config or the zoo entry names; the class count is the checkpoint's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping

from . import zoo
from .checkpoint import (
    CONFIG_METADATA_KEY,
    SAFETENSORS_SUFFIX,
    CheckpointError,
    checkpoint_file,
    extract_state_dict,
    read_checkpoint,
)


def to_safetensors(source, destination: str | os.PathLike) -> str:
    """Write ``source`` (path, URL, zoo name or loaded checkpoint) to ``destination``; returns its path."""
    destination = os.fspath(destination)
    if not destination.endswith(SAFETENSORS_SUFFIX):
        raise ValueError(f"destination must end in {SAFETENSORS_SUFFIX} (load_checkpoint tells the formats apart "
                         f"by it), got {destination}")
    from safetensors.torch import save_file

    name, checkpoint = _read(source)
    tensors = _without_aliases(extract_state_dict(checkpoint, name))
    metadata = {}
    config = checkpoint.get("config") if isinstance(checkpoint, Mapping) else None
    if isinstance(config, Mapping):
        try:
            metadata[CONFIG_METADATA_KEY] = json.dumps(config, sort_keys=True)
        except TypeError as error:
            raise CheckpointError(f"{name}: its config cannot be written as JSON ({error})") from error
    partial = f"{destination}.partial"
    save_file(tensors, partial, metadata=metadata)
    os.replace(partial, destination)  # a reader never sees a half-written file
    return destination


def _without_aliases(state_dict: dict) -> dict:
    """One entry per tensor (safetensors refuses shared storage), each a contiguous copy."""
    kept, seen = {}, set()
    for key, tensor in state_dict.items():
        identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.numel() > 0 and identity in seen:
            continue
        seen.add(identity)
        kept[key] = tensor.detach().contiguous().clone()
    return kept


def to_onnx(source, destination: str | os.PathLike, height: int, width: int, architecture: str | None = None,
            **export_options) -> str:
    """export_onnx of the segmentor ``source``'s weights fit (see the module docstring); returns the path."""
    from .export import export_onnx
    from .hub import pretrained_segmentor

    name, checkpoint = _read(source)
    config = checkpoint.get("config") if isinstance(checkpoint, Mapping) else None
    released = zoo.RELEASED.get(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else None
    if architecture is None and isinstance(config, Mapping):
        architecture = config.get("model")
    if architecture is None and released is not None:
        architecture = released.architecture
    if architecture is None:
        raise CheckpointError(f"{name} does not say its architecture: pass it (--model ann_r50_d8, ...)")
    model = pretrained_segmentor(architecture, source)
    return export_onnx(model, destination, height, width, **export_options)


def _read(source) -> tuple[str, object]:
    if isinstance(source, (str, os.PathLike)):
        return f"checkpoint {os.fspath(source)}", read_checkpoint(checkpoint_file(source))
    return "checkpoint", source


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write a checkpoint as a .safetensors file or an .onnx graph")
    parser.add_argument("source", help="checkpoint file (ours or mmseg's), http(s) URL or zoo name")
    parser.add_argument("destination", help="output file: *.safetensors or *.onnx")
    onnx = parser.add_argument_group("ONNX export")
    onnx.add_argument("--model", help="architecture, e.g. ann_r50_d8 (default: the checkpoint's or zoo entry's)")
    onnx.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"),
                      help="input size: the only one a fixed-size graph takes; the tracing size otherwise")
    onnx.add_argument("--dynamic-size", action="store_true", help="any input height and width")
    onnx.add_argument("--resize-to-input", action="store_true",
                      help="end with the bilinear resize to the input size (default: 1/8-resolution logits)")
    args = parser.parse_args(argv)
    if not args.destination.endswith((".onnx", SAFETENSORS_SUFFIX)):
        parser.error(f"destination must end in {SAFETENSORS_SUFFIX} or .onnx, got {args.destination}")
    try:
        if args.destination.endswith(".onnx"):
            path = to_onnx(args.source, args.destination, *args.size, architecture=args.model,
                           dynamic_size=args.dynamic_size, resize_to_input=args.resize_to_input)
        else:
            path = to_safetensors(args.source, args.destination)
    except (CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
