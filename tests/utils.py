"""Helpers shared by the tests: the tolerance rule, backend/device parameters and output poisoning."""

from __future__ import annotations

import pytest
import torch

HAS_GPU = torch.cuda.is_available()

# Absolute slack added to the tolerance rule, per dtype.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# (backend, device) pairs: the kernels on the CPU under the Triton interpreter, every backend on a GPU.
CPU_BACKENDS = [pytest.param("torch", "cpu", id="torch-cpu"), pytest.param("triton", "cpu", id="triton-cpu")]
GPU_BACKENDS = [pytest.param(name, "cuda", id=f"{name}-gpu", marks=pytest.mark.gpu)
                for name in ("torch", "triton", "cuda")]
ALL_BACKENDS = CPU_BACKENDS + GPU_BACKENDS

# Devices for the Triton custom ops' opcheck (the interpreter on the CPU).
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="gpu", marks=pytest.mark.gpu)]

# float32 and float16 everywhere; bfloat16 on the GPU only (bf16 arithmetic is wrong in the interpreter).
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def skip_unsupported(backend: str, device: str, dtype: torch.dtype) -> None:
    from fusedgpt.ops._backend import triton_interpreter_enabled

    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("bf16 is tested on the GPU only")
    if device == "cpu" and backend == "triton" and not triton_interpreter_enabled():
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1 (set by conftest.py on machines without a GPU)")
    if backend == "cuda":
        import fusedgpt

        if not fusedgpt.extension_available():
            pytest.fail(f"the CUDA extension is not available: {fusedgpt.extension_unavailable_reason()}")


def assert_within_tolerance(actual: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor,
                            what: str = "output") -> None:
    """CONVENTIONS.md's rule: |actual - reference| (float64 reference) at most 2x |baseline - reference|
    (plain PyTorch in actual's dtype) plus a small atol. NaN anywhere fails."""
    assert actual.shape == reference.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(reference.shape)}"
    assert actual.dtype == baseline.dtype, f"{what}: dtype {actual.dtype} != {baseline.dtype}"
    error = (actual.double() - reference).abs().max().item() if actual.numel() else 0.0
    baseline_error = (baseline.double() - reference).abs().max().item() if actual.numel() else 0.0
    bound = 2 * baseline_error + ATOL[actual.dtype]
    assert error <= bound, f"{what}: max error {error:.3g} > bound {bound:.3g} (plain PyTorch: {baseline_error:.3g})"


def poison_allocator(device: str) -> None:
    """Leaves NaN-filled blocks in the CUDA caching allocator so that outputs a kernel allocates start
    as NaN: an element the kernel forgets to write then fails the comparison."""
    if device == "cuda":
        block = torch.full((32 << 20,), float("nan"), dtype=torch.float32, device=device)
        del block


def expected_after_append(cache, new, positions):
    """The cache after the append, built slot by slot on the host (independent of every backend)."""
    expected = cache.clone()
    tokens = new.shape[1]
    for b, start in enumerate(positions.tolist()):
        if 0 <= start <= cache.shape[1] - tokens:
            expected[b, start:start + tokens] = new[b]
    return expected


def assert_equal_with_nan(actual, expected):
    assert torch.equal(actual.isnan(), expected.isnan()), "written slots differ (NaN poison pattern)"
    assert torch.equal(torch.nan_to_num(actual), torch.nan_to_num(expected)), "written values differ"


def largest_tensor_created(function) -> int:
    """The most elements of any tensor an op creates while function() runs (recorded at the dispatcher,
    so forward and backward alike): how the tests show a kernel never holds an S x S or [tokens, vocab]
    intermediate."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return result

    with Largest():
        function()
    return Largest.numel
