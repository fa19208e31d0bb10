"""Backend selection: the one place that decides which implementation runs an op.

Backends:
  "auto"       C++ kernels for CPU tensors; for CUDA tensors a GPU kernel verified on a GPU; else "composite".
  "cpu"        C++/OpenMP kernels (annkernels._C), CPU tensors only.
  "cuda"       hand-written CUDA kernels (annkernels._C built with CUDA), CUDA tensors only.
  "triton"     Triton kernels, CUDA tensors (or any tensor under TRITON_INTERPRET=1).
  "composite"  GEMMs and a softmax from PyTorch's own kernels (annkernels/ops/composite.py), any device.
  "reference"  pure PyTorch, computed the way mmsegmentation computes it.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings

import torch

BACKENDS = ("auto", "cpu", "cuda", "triton", "composite", "reference")

# GPU backends that have passed tests/ on real hardware, with where and when. "auto" hands a CUDA
# tensor only to a backend listed here, else to "composite"; an unverified kernel must be asked for by name.
GPU_VERIFIED: dict[str, str] = {}

try:
    importlib.import_module("annkernels._C")  # loading the library registers the C++ kernels
    NATIVE_IMPORT_ERROR: str | None = None
except ImportError as error:  # the package stays usable through the reference path
    NATIVE_IMPORT_ERROR = str(error)


def _has_native_kernel(dispatch_key: str) -> bool:
    if NATIVE_IMPORT_ERROR is not None:
        return False
    return all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"annkernels::_{op}", dispatch_key)
        for op in ("pyramid_pool_forward", "pyramid_pool_backward", "short_attention_forward",
                   "short_attention_backward")
    )


# Computed once at import so that resolution under torch.compile is plain Python on constants.
NATIVE_CPU = _has_native_kernel("CPU")
NATIVE_CUDA = _has_native_kernel("CUDA")
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


TRITON_INSTALLED = _triton_importable()

_state = threading.local()
_GLOBAL_DEFAULT = [os.environ.get("ANNKERNELS_BACKEND", "auto")]
_warned: set[str] = set()


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown annkernels backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


_check_name(_GLOBAL_DEFAULT[0])


def get_backend() -> str:
    """The backend used when an op or block is given ``backend=None``."""
    return getattr(_state, "override", None) or _GLOBAL_DEFAULT[0]


def set_backend(name: str) -> None:
    """Set the process-wide default backend (also settable with ANNKERNELS_BACKEND)."""
    _GLOBAL_DEFAULT[0] = _check_name(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Use ``name`` as the default backend inside the ``with`` block (this thread only)."""
    _check_name(name)
    previous = getattr(_state, "override", None)
    _state.override = name
    try:
        yield
    finally:
        _state.override = previous


def _why_unusable(name: str, device: torch.device) -> str | None:
    """None if ``name`` can run on ``device``, else a sentence saying what is missing."""
    if name in ("composite", "reference"):
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got tensors on {device}"
        if not NATIVE_CPU:
            return f"backend 'cpu' needs the compiled extension annkernels._C ({NATIVE_IMPORT_ERROR}); " \
                   "reinstall with `pip install -e . --no-build-isolation`"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got tensors on {device}"
        if not NATIVE_CUDA:
            return "backend 'cuda' is not built: annkernels._C was compiled without CUDA kernels; rebuild with " \
                   "a CUDA build of torch and a CUDA toolkit (see README, 'GPU install')"
        return None
    if name == "triton":
        if not TRITON_INSTALLED:
            return "backend 'triton' needs the triton package (pip install triton)"
        if device.type != "cuda" and not TRITON_INTERPRET:
            return f"backend 'triton' runs on CUDA tensors (or with TRITON_INTERPRET=1), got tensors on {device}"
        return None
    raise AssertionError(name)


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Concrete backends that can run on ``device`` in this installation.

    Note: ``backend="auto"`` gives CUDA tensors to "composite" (cuBLAS GEMMs and PyTorch's softmax, correct
    wherever PyTorch is) until a kernel of ours is listed in GPU_VERIFIED, i.e. has passed the tests on a
    GPU. The hand-written "cuda" and "triton" kernels run only when asked for by name.
    """
    device = torch.device(device)
    return [name for name in BACKENDS[1:] if _why_unusable(name, device) is None]


def _warn_once(key: str, message: str) -> None:
    # Dynamo cannot trace warnings.warn; a compiled caller gets the same fallback without the warning.
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


def resolve(backend: str | None, device: torch.device) -> str:
    """Turn a requested backend (None meaning the current default) into a concrete one, or raise."""
    name = _check_name(backend if backend is not None else get_backend())
    if torch.onnx.is_in_onnx_export():
        # ONNX has no node for our custom ops; the reference path exports (pyramid pooling as a MatMul).
        return "reference"
    if name != "auto":
        reason = _why_unusable(name, device)
        if reason is not None:
            raise RuntimeError(f"annkernels: {reason}")
        return name
    if device.type == "cpu":
        if NATIVE_CPU:
            return "cpu"
        _warn_once("auto-cpu", "annkernels: the C++ extension is not available "
                   f"({NATIVE_IMPORT_ERROR}); falling back to the composite PyTorch path")
        return "composite"
    if device.type == "cuda":
        for gpu_backend in ("cuda", "triton"):
            if gpu_backend in GPU_VERIFIED and _why_unusable(gpu_backend, device) is None:
                return gpu_backend
    # Unverified GPU kernels, and devices we have no kernel for (meta among them): PyTorch's own ops.
    return "composite"
