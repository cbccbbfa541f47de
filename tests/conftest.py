"""Shared test settings: the gpu marker skips where CUDA is absent; hypothesis stays quick."""

import pytest
import torch
from hypothesis import settings

settings.register_profile("fusediff", max_examples=40, deadline=None, derandomize=False)
settings.load_profile("fusediff")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
