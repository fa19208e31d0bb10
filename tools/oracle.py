"""The accuracy rule every kernel is held to, shared by the tests (tests/conftest.py) and the GPU machine's
large-shape check (tools/gpu/large_shapes.py).

As flash-attention's tests: against a float64 oracle, a kernel's largest absolute error may be at most
``factor`` (2) times the largest error of the reference computed in the kernel's own dtype, plus one ulp of
the output's scale (for outputs the low-precision reference happens to get exactly right).
"""

from __future__ import annotations

import torch


def max_error(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    return (actual.detach().double().cpu() - oracle.detach().double().cpu()).abs().max().item()


def error_and_limit(actual: torch.Tensor, low_precision_reference: torch.Tensor, oracle: torch.Tensor,
                    factor: float = 2.0) -> tuple:
    """(the kernel's max error against ``oracle``, the most the rule allows)."""
    ulp = torch.finfo(actual.dtype).eps * oracle.detach().double().abs().max().item()
    return max_error(actual, oracle), factor * max_error(low_precision_reference, oracle) + ulp


def assert_within_reference_error(actual, low_precision_reference, oracle, name, factor=2.0):
    """Raises AssertionError naming ``name`` when ``actual`` breaks the rule."""
    error, limit = error_and_limit(actual, low_precision_reference, oracle, factor)
    assert error <= limit, (f"{name}: max error {error:.3g} exceeds {factor} x the reference's error in "
                            f"{actual.dtype} plus one ulp ({limit:.3g})")
