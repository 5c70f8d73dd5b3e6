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


SEED_VARIABLE = "FUSEDGPT_TEST_SEED"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs in every run. A failing test's report shows its seed; FUSEDGPT_TEST_SEED=<seed>
    replays those inputs."""
    seed = int(os.environ.get(SEED_VARIABLE) or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    request.node.fusedgpt_seed = seed
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "fusedgpt_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"rerun with {SEED_VARIABLE}={seed} to replay this test's inputs"))


@pytest.fixture(autouse=True)
def _poisoned_empty(monkeypatch):
    """torch.empty and friends return NaN-filled tensors (int: -1234567) on every device, so an output element
    a kernel or launcher forgets to write fails the comparison on the CPU too (CUDA runs also poison the
    caching allocator: tests/utils.py's poison_allocator). Contents of empty tensors are undefined anyway."""
    def poisoned(make):
        def wrapper(*args, **kwargs):
            tensor = make(*args, **kwargs)
            if isinstance(tensor, torch.Tensor) and tensor.numel() and not torch.compiler.is_compiling() \
                    and tensor.device.type == "cpu" and not tensor.is_meta and tensor.layout == torch.strided:
                with torch.no_grad():
                    tensor.fill_(float("nan") if tensor.is_floating_point() or tensor.is_complex()
                                 else (True if tensor.dtype == torch.bool else -1234567 if tensor.dtype not in
                                       (torch.uint8, torch.int8, torch.int16) else 77))
            return tensor
        return wrapper

    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, poisoned(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned(torch.Tensor.new_empty))
