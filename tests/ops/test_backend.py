"""Backend choice (fusedgpt.ops._backend): explicit argument > FUSEDGPT_BACKEND > automatic, the
measured per-size order, and clear errors for choices that cannot run."""

import pytest
import torch

from fusedgpt.ops import _backend
from fusedgpt.ops._backend import choose_backend, measured_order

CPU = torch.device("cpu")


def test_explicit_argument_beats_the_environment(monkeypatch):
    monkeypatch.setenv("FUSEDGPT_BACKEND", "torch")
    assert choose_backend("layer_norm", CPU) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_backend("layer_norm", CPU, "triton") == "triton"
    monkeypatch.setenv("FUSEDGPT_BACKEND", "triton")
    assert choose_backend("layer_norm", CPU) == "triton"
    assert choose_backend("layer_norm", CPU, "torch") == "torch"


def test_automatic_choice_on_the_cpu(monkeypatch):
    monkeypatch.delenv("FUSEDGPT_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert choose_backend("bias_act", CPU) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_backend("bias_act", CPU) == "triton"
    # A case the kernels cannot serve goes to the reference, with no error.
    assert choose_backend("bias_act", CPU, unsupported={"triton": "float64"}) == "torch"


def test_bad_choices_are_named(monkeypatch):
    monkeypatch.setenv("FUSEDGPT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FUSEDGPT_BACKEND must be one of"):
        choose_backend("layer_norm", CPU)
    monkeypatch.delenv("FUSEDGPT_BACKEND")
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("layer_norm", CPU, "fastest")
    with pytest.raises(ValueError, match=r"fusedgpt.ops.kv_append: backend 'cuda' cannot run this call: .*CUDA tensors"):
        choose_backend("kv_append", CPU, "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="cannot run this call: float64 here"):
        choose_backend("kv_append", CPU, "triton", unsupported={"triton": "float64 here"})


def test_measured_order_by_size(monkeypatch):
    monkeypatch.setattr(_backend, "MEASURED_ORDER", {
        "layer_norm": {(9, 0): [(4096, ("cuda", "triton")), (None, ("triton", "cuda"))]},
        "bias_act": {(9, 0): [(1000, ("cuda", "triton"))]},
    })
    assert measured_order("layer_norm", (9, 0), 16) == ("cuda", "triton")
    assert measured_order("layer_norm", (9, 0), 4096) == ("cuda", "triton")
    assert measured_order("layer_norm", (9, 0), 4097) == ("triton", "cuda")
    assert measured_order("bias_act", (9, 0), 5000) == _backend.DEFAULT_ORDER  # past the measured sizes
    assert measured_order("layer_norm", (8, 0), 16) == _backend.DEFAULT_ORDER  # another architecture
    assert measured_order("attention", (9, 0), 16) == _backend.DEFAULT_ORDER  # another family


def test_cuda_backend_refuses_gpus_older_than_sm80(monkeypatch):
    """The kernels use sm_80 instructions: an older GPU gets the Triton kernels, or a clear error when
    the cuda backend is asked for by name."""
    monkeypatch.setattr(_backend, "extension_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    gpu = torch.device("cuda", 0)
    assert _backend._unavailable("cuda", gpu, {}) == "the cuda kernels need sm_80 or newer, cuda:0 is sm_75"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert _backend._unavailable("cuda", gpu, {}) is None
