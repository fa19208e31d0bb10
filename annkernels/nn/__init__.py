from annkernels.nn.blocks import AFNB, APNB, ConvModule, NonLocal2d, NormLayer, PyramidAttention

__all__ = ["AFNB", "APNB", "ConvModule", "NonLocal2d", "NormLayer", "PyramidAttention"]
