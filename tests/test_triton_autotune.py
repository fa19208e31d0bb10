"""Triton autotuning and CUDA-graph capture: a first call with a new shape must not time configs inside
capture. Runs without a GPU: the capture query and the timing switch are replaced, and the kernels'
real config-prune hook (which Triton calls once per new autotune key, before any timing) is called."""

import pytest
import torch

import annkernels

pytestmark = pytest.mark.skipif("triton" not in annkernels.available_backends("cpu"),
                                reason="needs the Triton interpreter")


@pytest.fixture
def timing_on_a_gpu(monkeypatch):
    from annkernels.triton import common

    monkeypatch.setattr(common, "timing_configs", lambda: True)
    return common


def _prune(dtype, block_s):
    from annkernels.triton import short_attention

    kernel = short_attention._short_attention_forward_kernel
    return kernel.early_config_prune(kernel.configs, {"q_ptr": torch.empty(0, dtype=dtype)}, BLOCK_S=block_s)


def test_first_call_of_a_new_shape_inside_capture_raises(timing_on_a_gpu, monkeypatch):
    monkeypatch.setattr(timing_on_a_gpu, "_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="_short_attention_forward_kernel meets a new shape inside CUDA-graph "
                                           "capture.*warm-up"):
        _prune(torch.bfloat16, 128)


def test_outside_capture_every_fitting_config_is_timed(timing_on_a_gpu, monkeypatch):
    monkeypatch.setattr(timing_on_a_gpu, "_stream_capturing", lambda: False)
    assert len(_prune(torch.bfloat16, 128)) > 1


def test_a_single_candidate_needs_no_timing_and_may_run_inside_capture(timing_on_a_gpu, monkeypatch):
    # S = 1024 leaves one forward config: nothing to time.
    monkeypatch.setattr(timing_on_a_gpu, "_stream_capturing", lambda: True)
    assert len(_prune(torch.float32, 1024)) == 1


def test_untimed_autotune_never_refuses(monkeypatch):
    from annkernels.triton import common

    monkeypatch.setattr(common, "_stream_capturing", lambda: True)
    assert not common.timing_configs()  # the conftest's switch, or the interpreter
    assert len(_prune(torch.bfloat16, 128)) == 1
