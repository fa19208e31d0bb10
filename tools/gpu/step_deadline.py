"""pytest plugin (`-p tools.gpu.step_deadline`): stop starting tests once a timed step's time is spent.

tools/gpu/run_gpu.py gives each pytest step a hard time limit. A run killed at that limit loses its JUnit
file and its durations, so the step also passes a softer deadline, the Unix time in
ANNKERNELS_STEP_DEADLINE: tests that have not started by then are skipped with NOT_RUN as the reason,
and the run ends normally, listing them.
"""

from __future__ import annotations

import os
import time

import pytest

DEADLINE_ENV = "ANNKERNELS_STEP_DEADLINE"
NOT_RUN = "not run: the step's time limit was reached"


def pytest_runtest_setup(item):
    deadline = os.environ.get(DEADLINE_ENV)
    if deadline and time.time() > float(deadline):
        pytest.skip(NOT_RUN)
