"""Triton kernels for the ANN ops (pyramid pooling and short-key attention).

The kernel modules import triton at import time, so they are loaded lazily: import
``annkernels.triton.pyramid_pool`` / ``annkernels.triton.short_attention`` only after ``available()``
returned True. Set ``TRITON_INTERPRET=1`` *before* importing them to run the kernels on CPU tensors
(the flag is read when the kernels are defined).
"""

import functools
import importlib.util
import os


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when the ``triton`` package can be imported."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def first_config_when_interpreting(configs, named_args=None, **kwargs):
    """``early_config_prune`` for triton.autotune: in the interpreter every config gives the same
    result, so benchmarking more than one only costs time."""
    return configs[:1] if interpreting() else configs


def target_programs(device) -> int:
    """Programs that fill ``device``: one per SM on a GPU; in the interpreter a few, so that the
    split-and-reduce paths run in tests."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
