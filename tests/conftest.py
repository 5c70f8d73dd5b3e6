"""Test set-up. Without a GPU the Triton kernels run on the CPU under TRITON_INTERPRET=1, which must be
set before any kernel is imported (triton.jit reads it when a kernel is defined). Tests marked `gpu`
skip cleanly without one; `pytest -m gpu` runs them on a GPU machine."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs in every run, reproducible from the printed seed when a test fails."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    yield seed
