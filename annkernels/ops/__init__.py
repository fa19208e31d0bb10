from annkernels.ops.pyramid_pool import pyramid_pool, pyramid_pool_pair
from annkernels.ops.short_attention import short_attention

__all__ = ["pyramid_pool", "pyramid_pool_pair", "short_attention"]
