from annkernels.ops.pyramid_pool import pyramid_pool
from annkernels.ops.short_attention import short_attention

__all__ = ["pyramid_pool", "short_attention"]
