"""annkernels: fast kernels and blocks for Asymmetric Non-local Neural Networks (ANN, ICCV 2019)."""

from annkernels._backend import BACKENDS, GPU_VERIFIED, available_backends, get_backend, set_backend, use_backend
from annkernels.nn import AFNB, APNB, NonLocal2d
from annkernels.ops import pyramid_pool, pyramid_pool_pair, short_attention

__version__ = "0.1.0"

__all__ = [
    "AFNB",
    "APNB",
    "BACKENDS",
    "GPU_VERIFIED",
    "NonLocal2d",
    "available_backends",
    "get_backend",
    "pyramid_pool",
    "pyramid_pool_pair",
    "set_backend",
    "short_attention",
    "use_backend",
]
