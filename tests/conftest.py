"""Shared test settings: the gpu marker skips where CUDA is absent; GPU tiers (support/gpu_tiers.py);
hypothesis stays quick."""

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from support import gpu_tiers

# The source folder kernels/ (installed as fusediff.kernels) must not be importable as a top-level
# "kernels": transformers and diffusers probe for the Hugging Face package of that name and would
# import ours a second time, re-registering its custom ops with module state of their own. `python -m
# pytest` puts the working directory (the repository root) on sys.path; tests import the installed package.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
sys.modules.pop("kernels", None)

settings.register_profile("fusediff", max_examples=40, deadline=None, derandomize=False)
settings.load_profile("fusediff")


def pytest_addoption(parser):
    gpu_tiers.add_options(parser)


def pytest_configure(config):
    gpu_tiers.configure(config)


def pytest_collection_modifyitems(config, items):
    gpu_tiers.select(config, items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
