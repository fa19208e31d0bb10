"""Triton kernels for the ANN ops: ``pyramid_pool``, ``short_attention`` and their shared ``common`` parts.

The modules import triton at import time, so ``annkernels.ops`` loads them only once the backend
check in ``annkernels._backend`` found triton. Set ``TRITON_INTERPRET=1`` *before* importing them to
run the kernels on CPU tensors (the flag is read when the kernels are defined).
"""
