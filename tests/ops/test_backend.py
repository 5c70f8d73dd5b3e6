"""Backend choice (fusedgpt.ops._backend): explicit argument > FUSEDGPT_BACKEND > automatic, the
measured per-size order, clear errors for choices that cannot run, and each op's one decision
(<family>_backend), which the op follows."""

import importlib

import pytest
import torch

import fusedgpt.ops
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


# ---- each op's one decision (fusedgpt.ops.<family>_backend) and what the op runs ----------------------

def _head_tensors(batch, seq, dim, dtype, grad=False):
    return torch.randn(batch, seq, 2, dim, dtype=dtype).requires_grad_(grad)


def _attention_call(dim, dtype, grad):
    return (_head_tensors(1, 5, dim, dtype, grad), _head_tensors(1, 7, dim, dtype), _head_tensors(1, 7, dim, dtype)), {}


def _decode_attention_call(dim, dtype, grad):
    q = _head_tensors(2, 1, dim, dtype, grad)
    caches = _head_tensors(2, 8, dim, dtype), _head_tensors(2, 8, dim, dtype)
    return (q, *caches, torch.tensor([3, 5], dtype=torch.int32)), dict(k=_head_tensors(2, 1, dim, dtype),
                                                                       v=_head_tensors(2, 1, dim, dtype))


def _kv_append_call(dim, dtype, grad):
    return (_head_tensors(2, 8, dim, dtype), _head_tensors(2, 8, dim, dtype), _head_tensors(2, 1, dim, dtype, grad),
            _head_tensors(2, 1, dim, dtype), torch.tensor([3, 5], dtype=torch.int32)), {}


def _layer_norm_call(dim, dtype, grad):
    x = torch.randn(3, dim, dtype=dtype).requires_grad_(grad)
    return (x, torch.randn(dim, dtype=dtype), torch.randn(dim, dtype=dtype), 1e-5, torch.randn(3, dim, dtype=dtype)), {}


def _bias_act_call(dim, dtype, grad):
    return (torch.randn(3, dim, dtype=dtype).requires_grad_(grad), torch.randn(dim, dtype=dtype), "gelu_tanh"), {}


# family -> (argument builder, {module-level name of a path: the backend it is})
PATHS = {
    "attention": (_attention_call, {"attention_reference": "reference", "_attention_torch": "torch",
                                    "_attention_triton": "triton", "_attention_triton_trained": "triton"}),
    "decode_attention": (_decode_attention_call, {"decode_attention_reference": "reference",
                                                  "_decode_attention_torch": "torch",
                                                  "_decode_attention_triton": "triton"}),
    "kv_append": (_kv_append_call, {"kv_append_torch": "torch", "_kv_append_triton": "triton"}),
    "layer_norm": (_layer_norm_call, {"_layer_norm_torch": "torch", "_add_layer_norm_triton": "triton"}),  # all train
    "bias_act": (_bias_act_call, {"_bias_act_torch": "torch", "_bias_act_triton": "triton"}),  # all train
}

# (interpreter on, head dim / columns, dtype, needs grad, backend asked for)
CALLS = {
    "the Triton interpreter": (True, 16, torch.float32, False, None),
    "no interpreter": (False, 16, torch.float32, False, None),
    "float64": (True, 16, torch.float64, False, None),
    "bfloat16 under the interpreter": (True, 16, torch.bfloat16, False, None),
    "head dim above the Triton limit": (True, 272, torch.float32, False, None),
    "autograd": (True, 16, torch.float32, True, None),
    "autograd without the interpreter": (False, 16, torch.float32, True, None),
    "torch by name": (True, 16, torch.float32, False, "torch"),
}


@pytest.mark.parametrize("family", sorted(PATHS))
def test_each_op_runs_what_its_decision_says(monkeypatch, family):
    """The public op follows its family's decision: every path is replaced by a recorder, and for each
    kind of call the path that ran is the backend the decision named (and the decisions differ)."""
    module = importlib.import_module(f"fusedgpt.ops.{family}")
    build, paths = PATHS[family]
    ran = []
    for name, path_backend in paths.items():
        monkeypatch.setattr(module, name, lambda *args, _backend=path_backend, **kwargs: ran.append(_backend))
    monkeypatch.delenv("FUSEDGPT_BACKEND", raising=False)
    decided = set()
    for label, (interpreter, dim, dtype, grad, backend) in CALLS.items():
        monkeypatch.setenv("TRITON_INTERPRET", "1" if interpreter else "0")
        args, kwargs = build(dim, dtype, grad)
        choice = getattr(fusedgpt.ops, f"{family}_backend")(*args, **kwargs, backend=backend)
        ran.clear()
        getattr(fusedgpt.ops, family)(*args, **kwargs, backend=backend)
        assert ran == [choice.backend], f"{family}, {label}: the decision says {choice.backend}, the op ran {ran}"
        assert choice.backend == "torch" or choice.backend not in choice.unsupported
        decided.add(choice.backend)
    assert decided == set(paths.values()), f"{family}: the calls reached only {sorted(decided)}"


def test_decisions_name_why_the_other_backends_cannot(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 3, 2, 272)
    choice = fusedgpt.ops.attention_backend(q, q, q)
    assert choice.backend == "torch" and choice.host_read is None
    assert choice.unsupported["triton"] == "head dim 272 is above the kernels' limit of 256"
    assert "cuda" in choice.unsupported
    args, kwargs = _decode_attention_call(16, torch.float32, True)
    choice = fusedgpt.ops.decode_attention_backend(*args, **kwargs)
    assert choice.backend == "reference" and not choice.capturable
    assert choice.host_read == "it needs autograd: decode_attention_reference reads cache_lens on the host"
    args, _ = _kv_append_call(16, torch.float32, False)
    assert fusedgpt.ops.kv_append_backend(*args).host_read == "positions (on the CPU) are checked on the host"
    with pytest.raises(ValueError, match="backend must be one of"):  # checked even where autograd decides
        fusedgpt.ops.decode_attention_backend(*_decode_attention_call(16, torch.float32, True)[0], backend="fastest")
    with pytest.raises(ValueError, match="fusedgpt.ops.kv_append: k_cache must have rank 4"):  # the op's checks
        fusedgpt.ops.kv_append_backend(args[0][0], *args[1:])
