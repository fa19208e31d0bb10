"""Write any checkpoint ``load_checkpoint`` accepts as a safetensors file.

    python -m annkernels.models.convert SRC DST.safetensors

SRC is a file (ours or mmseg's), an http(s) URL or a zoo name (``python -m annkernels.models.zoo``). The file
holds the weights, wrapper prefixes removed, and, for our training checkpoints, the training config as JSON
metadata (``config``). Optimizer and RNG states are left out: the file is for inference and fine-tuning, not for
resuming. A tensor the model stores under two names (APNB's shared key/query projection) is written once;
``load_checkpoint`` supplies the other name.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping

from safetensors.torch import save_file

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
    if isinstance(source, (str, os.PathLike)):
        name = f"checkpoint {os.fspath(source)}"
        checkpoint = read_checkpoint(checkpoint_file(source))
    else:
        name, checkpoint = "checkpoint", source
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write a checkpoint as a .safetensors file")
    parser.add_argument("source", help="checkpoint file (ours or mmseg's), http(s) URL or zoo name")
    parser.add_argument("destination", help="output file, *.safetensors")
    args = parser.parse_args(argv)
    try:
        path = to_safetensors(args.source, args.destination)
    except (CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
