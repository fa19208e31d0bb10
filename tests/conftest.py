import contextlib
import os
import random

import numpy as np
import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter. Triton reads this when a kernel is decorated,
# so it must be set before annkernels.triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Correctness tests take the first fitting autotune config instead of timing them all (a JIT compile
# each); the switch is read by annkernels/triton/common.py.
os.environ.setdefault("ANNKERNELS_TRITON_AUTOTUNE", "0")

import annkernels  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_cases(include_reference: bool = False):
    """(device, backend) pairs for every concrete backend usable here; CUDA ones marked `cuda`."""
    cases = []
    for device in DEVICES:
        for backend in annkernels.available_backends(device):
            if backend == "reference" and not include_reference:
                continue
            marks = [pytest.mark.cuda] if device == "cuda" else []
            cases.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return cases


def interpreted(backend: str) -> bool:
    """True when ``backend``'s kernels run in the Triton interpreter (slow: small shapes only)."""
    return backend == "triton" and annkernels._backend.TRITON_INTERPRET


@contextlib.contextmanager
def poisoned_outputs():
    """Every torch.empty inside (kernels' outputs included) comes back filled with NaN, so an element a
    kernel forgets to write shows up as a mismatch."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def assert_close(actual, expected, atol, rtol, name):
    """allclose with a report of the worst elements."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: {int(torch.isnan(actual).sum())} NaN elements (unwritten?)"
    error = (actual - expected).abs()
    excess = error - (atol + rtol * expected.abs())
    if (excess > 0).any():
        worst = torch.topk(excess.flatten(), min(5, excess.numel())).indices
        lines = [f"  at {np.unravel_index(int(i), tuple(actual.shape))}: got {actual.flatten()[i]:.6g}, "
                 f"expected {expected.flatten()[i]:.6g}" for i in worst]
        raise AssertionError(f"{name}: {int((excess > 0).sum())} of {excess.numel()} elements off "
                             f"(max abs error {error.max():.3g}, atol {atol}, rtol {rtol})\n" + "\n".join(lines))


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (minutes each on 2 cores)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def assert_within_reference_error(actual, low_precision_reference, oracle, name, factor=2.0):
    """Low-precision rule (as flash-attention tests): the kernel's max error against the float64 oracle is at
    most `factor` times the error of the reference computed in the same low precision (plus one ulp of the
    output's scale, for outputs where the reference happens to be exact)."""
    oracle = oracle.detach().double().cpu()
    kernel_error = (actual.detach().double().cpu() - oracle).abs().max().item()
    reference_error = (low_precision_reference.detach().double().cpu() - oracle).abs().max().item()
    ulp = torch.finfo(actual.dtype).eps * oracle.abs().max().item()
    assert kernel_error <= factor * reference_error + ulp, (
        f"{name}: max error {kernel_error:.3g} exceeds {factor} x the reference's {reference_error:.3g} "
        f"(+ {ulp:.3g}) in {actual.dtype}")
