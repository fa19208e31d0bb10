from annkernels.nn.blocks import AFNB, APNB, ConvModule, NonLocal2d, PyramidAttention

__all__ = ["AFNB", "APNB", "ConvModule", "NonLocal2d", "PyramidAttention"]
