"""Loading our own, mmsegmentation's and ImageNet backbone checkpoints into an ANN segmentor.

A source is a local path, an http(s) URL, a model zoo name (``python -m annkernels.models.zoo``: mmseg's
released ANN models, ``open-mmlab://resnet50_v1c`` and the other ImageNet backbones) or an already loaded
object. URLs and zoo names are downloaded once into torch's hub cache (``torch.hub.get_dir()/checkpoints``)
with torch.hub's own downloader; a file name carrying a hash prefix (``name-<sha256 prefix>.pth``, as mmseg's)
is checked.

Accepted contents:
- our training checkpoints: ``{"model": state_dict, ...}``, keys possibly prefixed ``module.`` (DDP) or
  ``_orig_mod.`` (torch.compile);
- mmseg 0.x/1.x ANN checkpoints: ``{"state_dict": ..., "meta": ...}`` with ``backbone.`` / ``decode_head.`` /
  ``auxiliary_head.`` keys, which equal ours (APNB's shared key/query projection is stored under both names);
- mmseg ImageNet ResNet-V1c checkpoints (keys without ``backbone.``, plus ``fc.*``), through
  ``load_pretrained_backbone``.

- safetensors files (``*.safetensors``, e.g. written by ``python -m annkernels.models.convert``): the tensors,
  plus our training config when the file's metadata carries it as JSON under ``config``.

Files are read with ``torch.load(weights_only=True)`` or with safetensors: nothing in the file is executed.
Checkpoints whose metadata pickles other objects (numpy scalars, mmengine message hubs, ...) are still readable:
those objects are replaced by inert ``UnloadedObject`` placeholders (with a warning) and the tensors load as
usual.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import urllib.parse
import warnings
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from .ann import init_classifier

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
CLASSIFIER_SUFFIXES = ("conv_seg.weight", "conv_seg.bias")
NUM_CLASSES_MISMATCH_MODES = ("error", "reinit")
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_MAX_PLACEHOLDERS = 64
_LISTED_KEYS = 12  # keys shown per category in error messages
# The sha256 prefix in names like resnet50_v1c-2cccc1ad.pth. torch.hub's own pattern also takes "-d8." in
# "ann_r50-d8.pth" for a hash, so at least 8 hex digits are required here.
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.")
SAFETENSORS_SUFFIX = ".safetensors"
CONFIG_METADATA_KEY = "config"  # safetensors metadata entry holding the training config as JSON


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A source that is no existing file, URL or zoo name."""


class LoadResult(NamedTuple):
    missing_keys: list[str]  # left at their current values (non-strict loads only)
    unexpected_keys: list[str]  # in the checkpoint, not in the model (ignored)
    reinitialized: list[str]  # classifier modules re-initialised for a different class count


class UnloadedObject:
    """Stand-in for a non-tensor object pickled in checkpoint metadata; keeps the raw arguments only."""

    source = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<UnloadedObject {self.source}>"


def read_checkpoint(path: str | os.PathLike) -> object:
    """torch.load on CPU with weights_only=True; unknown metadata globals become UnloadedObject placeholders.
    A ``.safetensors`` file reads as ``{"model": tensors}``, plus ``"config"`` when its metadata has one."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(SAFETENSORS_SUFFIX):
        return _read_safetensors(path)
    placeholders: dict[str, tuple[type, str]] = {}
    while True:
        try:
            with torch.serialization.safe_globals(list(placeholders.values())):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            break
        except pickle.UnpicklingError as error:
            match = _UNSUPPORTED_GLOBAL.search(str(error))
            if match is None or match.group(1) in placeholders or len(placeholders) >= _MAX_PLACEHOLDERS:
                raise CheckpointError(f"cannot read checkpoint file {path}: {_first_line(error)}") from error
            name = match.group(1)
            placeholders[name] = (type("UnloadedObject", (UnloadedObject,), {"source": name}), name)
        except Exception as error:
            raise CheckpointError(f"cannot read checkpoint file {path} (corrupt or not a torch.save file): "
                                  f"{type(error).__name__}: {_first_line(error)}") from error
    if placeholders:
        warnings.warn(f"{path}: metadata objects of type {', '.join(placeholders)} were not unpickled "
                      "(weights_only loading runs no code from the file); they are UnloadedObject placeholders. "
                      "The tensors are unaffected.", stacklevel=3)
    return checkpoint


def _read_safetensors(path: str) -> dict:
    try:
        from safetensors import safe_open
    except ImportError as error:
        raise CheckpointError(f"reading {path} needs the safetensors package: pip install safetensors") from error
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except Exception as error:
        raise CheckpointError(f"cannot read safetensors file {path} (corrupt or not a safetensors file): "
                              f"{type(error).__name__}: {_first_line(error)}") from error
    checkpoint: dict = {"model": tensors}
    if CONFIG_METADATA_KEY in metadata:
        try:
            checkpoint["config"] = json.loads(metadata[CONFIG_METADATA_KEY])
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{path}: its metadata entry {CONFIG_METADATA_KEY!r} is not JSON "
                                  f"({error})") from error
    return checkpoint


def checkpoint_file(source: str | os.PathLike) -> str:
    """The local file behind a checkpoint source: a path as it is; a URL, zoo name or open-mmlab:// name is
    downloaded into torch's hub cache on first use (with a progress bar) and found there afterwards.

    Raises CheckpointError naming the URL and the cache path when a download fails or arrives corrupt; nothing
    is left in the cache then.
    """
    from . import zoo  # here, not at the top: `python -m annkernels.models.zoo` runs zoo as __main__

    source = os.fspath(source)
    if os.path.isfile(source):
        return source
    url = zoo.url_of(source)
    if url is None and source.startswith(("http://", "https://")):
        url = source
    if url is None and source.startswith(zoo.OPEN_MMLAB):
        raise CheckpointNotFoundError(f"unknown name {source}; the open-mmlab:// names are "
                                      f"{', '.join(zoo.OPEN_MMLAB + name for name in zoo.BACKBONES)}")
    if url is None:
        raise CheckpointNotFoundError(f"checkpoint not found: {source} is no file, http(s) URL or zoo name "
                                      "(python -m annkernels.models.zoo lists the names)")
    return _download(url)


def _download(url: str) -> str:
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    if not filename:
        raise CheckpointError(f"cannot download {url}: the URL names no file")
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    if os.path.isfile(cached):
        return cached
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    match = _HASH_IN_NAME.search(filename)
    instead = f"Without network access, download the file elsewhere and pass its local path, or put it at {cached}."
    try:
        # Writes a temporary file next to `cached` and renames it only when complete (and the hash matches).
        torch.hub.download_url_to_file(url, cached, hash_prefix=match.group(1) if match else None, progress=True)
    except Exception as error:
        raise CheckpointError(f"cannot download {url} into {cached} ({type(error).__name__}: {error}). "
                              f"{instead}") from error
    try:  # a connection closed early still ends the download "successfully": read the file once to know
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the caller's own read warns about placeholders
            read_checkpoint(cached)
    except CheckpointError as error:
        os.remove(cached)
        raise CheckpointError(f"download of {url} is not a readable checkpoint (cut off?), removed {cached} "
                              f"({error}). {instead}") from error
    return cached


def extract_state_dict(checkpoint: object, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint (``state_dict``, ``model`` or the object itself), wrapper prefixes
    (``module.``, ``_orig_mod.``) removed."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors or a dict with 'state_dict'/'model', "
                              f"got {type(checkpoint).__name__}")
    for container in ("state_dict", "model"):
        if isinstance(checkpoint.get(container), Mapping):
            checkpoint = checkpoint[container]
            break
    non_tensors = [key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor)]
    if non_tensors or not checkpoint:
        raise CheckpointError(f"{source}: no state_dict found (top-level keys {_listing(list(checkpoint))}; "
                              f"expected tensors, or a 'state_dict' / 'model' entry)")
    state_dict = dict(checkpoint)
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def load_checkpoint(model: nn.Module, source, strict: bool = True, num_classes_mismatch: str = "error") -> LoadResult:
    """Load a whole-model checkpoint (ours or mmseg's) into ``model``.

    Args:
        model: an ANNSegmentor (possibly wrapped by DDP or torch.compile).
        source: a file path, http(s) URL, zoo name (e.g. ``ann_r50-d8_512x1024_40k_cityscapes``), a loaded
            checkpoint dict or a state_dict.
        strict: raise on missing or unexpected keys; otherwise load what matches and warn.
        num_classes_mismatch: "error" raises when the conv_seg shapes differ (another class count);
            "reinit" keeps the model's class count and re-initialises both conv_seg layers, with a warning.

    Returns:
        LoadResult. Raises CheckpointError (listing the offending keys) before touching the model when the
        checkpoint does not fit.
    """
    if num_classes_mismatch not in NUM_CLASSES_MISMATCH_MODES:
        raise ValueError(f"num_classes_mismatch must be one of {NUM_CLASSES_MISMATCH_MODES}, "
                         f"got {num_classes_mismatch!r}")
    model = unwrap_model(model)
    source, state_dict = _load_source(source)
    expected = model.state_dict()
    _fill_aliases(state_dict, expected, source)

    mismatched = [key for key in state_dict if key in expected and state_dict[key].shape != expected[key].shape]
    reinitialized: list[str] = []
    if mismatched:
        classifier_only = all(key.endswith(CLASSIFIER_SUFFIXES) for key in mismatched)
        if not (classifier_only and num_classes_mismatch == "reinit"):
            hint = (" The checkpoint was trained for another class count: pass num_classes_mismatch='reinit' to "
                    "fine-tune from it." if classifier_only else "")
            raise CheckpointError(f"{source} does not fit the model: shape mismatch for "
                                  f"{_shape_listing(mismatched, state_dict, expected)}.{hint}")
        reinitialized = sorted({key.rsplit(".", 1)[0] for key in mismatched})
        for key in mismatched:
            del state_dict[key]

    # Absent num_batches_tracked (pre-1.0 checkpoints) is filled in by BatchNorm itself.
    missing = [key for key in expected if key not in state_dict and key not in mismatched
               and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        message = f"{source}: {len(missing)} missing keys {_listing(missing)}, " \
                  f"{len(unexpected)} unexpected keys {_listing(unexpected)}"
        if "stem.0.weight" in unexpected:
            message += ". This looks like a backbone-only (ImageNet) checkpoint: use load_pretrained_backbone"
        if strict:
            raise CheckpointError(message)
        warnings.warn(f"non-strict load, {message}", stacklevel=2)

    model.load_state_dict({key: value for key, value in state_dict.items() if key in expected}, strict=False)
    for name in reinitialized:
        init_classifier(model.get_submodule(name))
    if reinitialized:
        warnings.warn(f"{source}: class count differs from the model's; re-initialised {', '.join(reinitialized)}",
                      stacklevel=2)
    return LoadResult(missing, unexpected, reinitialized)


def load_pretrained_backbone(model: nn.Module, source) -> LoadResult:
    """Load ImageNet ResNet-V1c weights (mmseg's ``open-mmlab://resnet{18,50,101}_v1c``) into model.backbone.

    ``source`` is any of load_checkpoint's, typically an ``open-mmlab://`` name.

    Keys may be bare (``stem.0.weight``) or carry ``backbone.`` (a whole segmentor checkpoint, whose heads are
    then ignored). The ImageNet classifier ``fc.*`` is expected and ignored. Every backbone tensor must be
    present with the right shape, else CheckpointError.
    """
    backbone = unwrap_model(model).backbone
    source, state_dict = _load_source(source)
    if any(key.startswith("backbone.") for key in state_dict):
        state_dict = {key[len("backbone."):]: value for key, value in state_dict.items()
                      if key.startswith("backbone.")}
    ignored = [key for key in state_dict if key.startswith("fc.")]
    state_dict = {key: value for key, value in state_dict.items() if not key.startswith("fc.")}
    expected = backbone.state_dict()
    mismatched = [key for key in state_dict if key in expected and state_dict[key].shape != expected[key].shape]
    missing = [key for key in expected if key not in state_dict and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state_dict if key not in expected]
    if mismatched or missing or unexpected:
        raise CheckpointError(f"{source} does not fit the backbone ({type(backbone).__name__}): "
                              f"{len(missing)} missing keys {_listing(missing)}, {len(unexpected)} unexpected keys "
                              f"{_listing(unexpected)}, shape mismatch for "
                              f"{_shape_listing(mismatched, state_dict, expected) if mismatched else 'none'}")
    backbone.load_state_dict(state_dict, strict=False)
    return LoadResult([], ignored, [])


def unwrap_model(model: nn.Module) -> nn.Module:
    """The segmentor inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _load_source(source) -> tuple[str, dict[str, torch.Tensor]]:
    if isinstance(source, (str, os.PathLike)):
        name = f"checkpoint {os.fspath(source)}"
        return name, extract_state_dict(read_checkpoint(checkpoint_file(source)), name)
    return "checkpoint", extract_state_dict(source)


def _fill_aliases(state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """Model keys naming the same tensor (APNB's key_project is its query_project): supply absent names from
    a present one, and refuse a checkpoint that stores different values under them."""
    groups: dict[tuple, list[str]] = {}
    for key, tensor in expected.items():
        if tensor.numel() > 0 and not tensor.is_meta:
            groups.setdefault((tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)), []).append(key)
    for keys in groups.values():
        present = [key for key in keys if key in state_dict]
        if len(keys) < 2 or not present:
            continue
        first = state_dict[present[0]]
        for key in present[1:]:
            if state_dict[key].shape != first.shape or not torch.equal(state_dict[key], first):
                raise CheckpointError(f"{source}: {present[0]} and {key} are one shared tensor in the model "
                                      "but differ in the checkpoint")
        for key in keys:
            state_dict.setdefault(key, first)


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED_KEYS])
    return f"[{shown}{f', ... ({len(keys) - _LISTED_KEYS} more)' if len(keys) > _LISTED_KEYS else ''}]"


def _shape_listing(keys: list[str], state_dict: Mapping, expected: Mapping) -> str:
    return _listing([f"{key} (checkpoint {tuple(state_dict[key].shape)}, model {tuple(expected[key].shape)})"
                     for key in keys])


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    unpickler = [line.strip() for line in lines if "WeightsUnpickler error" in line]
    return (unpickler or lines or [""])[0][:500]


# Writing checkpoints, and finding the newest readable one of a training run's work dir.


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``: a reader never sees a
    half-written file, even if this process is killed mid-write or the disk fills up."""
    path = os.fspath(path)
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.",
                                         suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions of a new file
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def save_training_checkpoint(state: dict, work_dir: str | os.PathLike, iteration: int) -> str:
    """Writes ``iter_{iteration}.pth``, then points ``latest.pth`` at the same bytes (hard link, or a copy), both
    atomically; returns the first path."""
    work_dir = os.fspath(work_dir)
    path = os.path.join(work_dir, f"iter_{iteration}.pth")
    atomic_save(state, path)
    handle, temporary = tempfile.mkstemp(dir=work_dir, prefix=".latest.pth.", suffix=".tmp")
    os.close(handle)
    os.unlink(temporary)
    try:
        try:
            os.link(path, temporary)
        except OSError:
            shutil.copyfile(path, temporary)
        os.replace(temporary, os.path.join(work_dir, "latest.pth"))
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return path


TRAINING_KEYS = ("model", "optimizer", "lr_scheduler", "iteration")


def read_training_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by save_training_checkpoint; CheckpointError (one line, naming the file) when it cannot
    be read or lacks what resuming needs."""
    checkpoint = read_checkpoint(path)
    missing = [key for key in TRAINING_KEYS if not isinstance(checkpoint, Mapping) or key not in checkpoint]
    if missing:
        raise CheckpointError(f"{os.fspath(path)} is no training checkpoint (no {', '.join(missing)})")
    return checkpoint


def training_checkpoints(work_dir: str | os.PathLike) -> list[str]:
    """``latest.pth``, then ``iter_N.pth`` from the highest N down: the order in which to try resuming."""
    work_dir = os.fspath(work_dir)
    numbered = []
    for name in os.listdir(work_dir) if os.path.isdir(work_dir) else []:
        match = re.fullmatch(r"iter_(\d+)\.pth", name)
        if match:
            numbered.append((int(match.group(1)), os.path.join(work_dir, name)))
    latest = os.path.join(work_dir, "latest.pth")
    return ([latest] if os.path.isfile(latest) else []) + [path for _, path in sorted(numbered, reverse=True)]


def newest_training_checkpoint(work_dir: str | os.PathLike, skipped=None) -> tuple[str, dict] | None:
    """(path, checkpoint) of the newest readable training checkpoint in ``work_dir``, or None. Each unreadable
    one is passed to ``skipped(path, error)`` (once per file: ``latest.pth`` is usually a hard link)."""
    failed: list[str] = []
    for path in training_checkpoints(work_dir):
        if any(os.path.samefile(path, other) for other in failed):
            continue
        try:
            return path, read_training_checkpoint(path)
        except CheckpointError as error:
            failed.append(path)
            if skipped is not None:
                skipped(path, error)
    return None
