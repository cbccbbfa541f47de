"""Scheduler tests run the fused op's C++ CPU path, the code a scheduler calls on every step."""

import pytest

from fusediff.kernels import use_backend


@pytest.fixture(autouse=True)
def fused_backend():
    with use_backend("fused"):
        yield
