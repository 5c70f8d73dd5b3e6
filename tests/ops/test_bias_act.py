"""fusedgpt.ops.bias_act against the float64 reference, on every backend, forward and backward (against
float64 autograd of the reference); bad input; opcheck; torch.compile; the drop-in fusedgpt.nn.LinearAct."""

import pytest
import torch
from utils import ALL_BACKENDS, DEVICES, DTYPES, assert_within_tolerance, poison_allocator, skip_unsupported

import fusedgpt
from fusedgpt.ops import bias_act, bias_act_backend, bias_act_reference

ACTIVATIONS = ["gelu_tanh", "gelu", "relu"]
CPU_SHAPES = [(1, 3072), (7, 1600), (2, 3, 1001), (3, 1), (16, 512)]
GPU_SHAPES = [(1, 3072), (16, 3072), (257, 8192), (5, 6400), (3, 7, 1001), (16384, 3072)]


def _plain_pytorch(x, bias, activation):
    v = x + bias if bias is not None else x
    if activation == "relu":
        return torch.relu(v)
    return torch.nn.functional.gelu(v, approximate="tanh" if activation == "gelu_tanh" else "none")


def _check(backend, x, bias, activation):
    poison_allocator(x.device.type)
    y = bias_act(x, bias, activation, backend=backend)
    reference = bias_act_reference(x.double(), None if bias is None else bias.double(), activation)
    assert_within_tolerance(y, reference, _plain_pytorch(x, bias, activation), activation)
    assert y.is_contiguous()


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_reference(backend, device, dtype, activation):
    skip_unsupported(backend, device, dtype)
    for shape in CPU_SHAPES if device == "cpu" else GPU_SHAPES:
        # Wide range: the tanh form must saturate (no inf/inf) and stay accurate near zero.
        x = torch.randn(shape, dtype=dtype, device=device) * 4
        bias = torch.randn(shape[-1], dtype=dtype, device=device)
        _check(backend, x, bias, activation)
    _check(backend, torch.randn(4, 96, dtype=dtype, device=device), None, activation)



def _gradients(function, x, bias, grad):
    """(dx, dbias) of function(x, bias) under the output gradient `grad`, on fresh leaves."""
    x = x.detach().requires_grad_(True)
    bias = bias.detach().requires_grad_(True) if bias is not None else None
    function(x, bias).backward(grad)
    return x.grad, bias.grad if bias is not None else None


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_backward_matches_float64_autograd(backend, device, dtype, activation):
    """dx and dbias of every backend (the kernels' Triton backward, torch's autograd) against float64
    autograd of the reference, by the tolerance rule; the call really trains on that backend."""
    skip_unsupported(backend, device, dtype)
    shapes = [(5, 96), (2, 3, 257), (1, 1), (130, 64)] if device == "cpu" else [(16, 3072), (257, 8192), (3, 7, 1001)]
    for shape in shapes:
        x = torch.randn(shape, dtype=dtype, device=device) * 3
        bias = torch.randn(shape[-1], dtype=dtype, device=device)
        grad = torch.randn(shape, dtype=dtype, device=device)
        for b in (bias, None):
            choice = bias_act_backend(x.detach().requires_grad_(True), b, activation, backend=backend)
            assert choice.backend == backend, choice
            poison_allocator(device)
            dx, dbias = _gradients(lambda x, b: bias_act(x, b, activation, backend=backend), x, b, grad)
            expected = _gradients(lambda x, b: bias_act_reference(x, b, activation), x.double(),
                                  None if b is None else b.double(), grad.double())
            baseline = _gradients(lambda x, b: _plain_pytorch(x, b, activation), x, b, grad)
            assert_within_tolerance(dx, expected[0], baseline[0], f"{activation} dx {shape}")
            if b is not None:
                assert_within_tolerance(dbias, expected[1], baseline[1], f"{activation} dbias {shape}")


@pytest.mark.parametrize("backend,device", [b for b in ALL_BACKENDS if b.values[0] != "torch"])
def test_backward_of_expanded_gradients_and_no_double_backward(backend, device):
    """The gradient of a sum is an expanded tensor (stride 0): the backward reads it as laid out. A
    second derivative through the kernels' backward is refused with a clear error, never silently 0."""
    skip_unsupported(backend, device, torch.float32)
    x = torch.randn(4, 33, device=device, requires_grad=True)
    bias = torch.randn(33, device=device, requires_grad=True)
    bias_act(x, bias, "gelu_tanh", backend=backend).sum().backward()
    expected = _gradients(lambda x, b: bias_act_reference(x, b, "gelu_tanh").sum(), x.double(), bias.double(),
                          torch.tensor(1.0, dtype=torch.float64, device=device))
    torch.testing.assert_close(x.grad.double(), expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias.grad.double(), expected[1], rtol=1e-5, atol=1e-5)
    y = bias_act(x, bias, "gelu", backend=backend)
    (dx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="bias_act_backward_triton"):
        dx.sum().backward()

@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_extreme_values_and_strided_rows(backend, device):
    skip_unsupported(backend, device, torch.float32)
    x = torch.tensor([[-100.0, -20.0, -1e-4, 0.0, 1e-4, 20.0, 100.0, 3.0]], device=device)
    for activation in ACTIVATIONS:
        _check(backend, x, None, activation)
    wide = torch.randn(6, 1030, dtype=torch.float16, device=device)
    _check(backend, wide[:, 3:1027], torch.randn(1024, dtype=torch.float16, device=device), "gelu_tanh")


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_nan_propagates_and_empty_inputs_return_empty(backend, device):
    """NaN stays NaN through every activation (relu included, as torch.relu), and empty inputs, an empty
    last dimension among them, give empty outputs."""
    skip_unsupported(backend, device, torch.float32)
    x = torch.tensor([[float("nan"), -1.5, 2.0, 0.25]], device=device)
    for activation in ACTIVATIONS:
        y = bias_act(x, None, activation, backend=backend)
        assert torch.isnan(y[0, 0]) and not torch.isnan(y[0, 1:]).any(), (activation, y)
        y = bias_act(x[:, 1:], torch.tensor([float("nan"), 0.0, 0.0], device=device), activation, backend=backend)
        assert torch.isnan(y[0, 0]) and not torch.isnan(y[0, 1:]).any(), (activation, y)
    for shape in [(0, 8), (4, 0), (2, 0, 3)]:
        x = torch.empty(shape, device=device)
        y = bias_act(x, torch.empty(shape[-1], device=device), "gelu_tanh", backend=backend)
        assert y.shape == x.shape


@pytest.mark.parametrize("call,error,match", [
    (lambda: bias_act(torch.randn(2, 4), None, "swish"), ValueError, "activation must be one of"),
    (lambda: bias_act(torch.randn(2, 4), torch.randn(3), "relu"), ValueError, r"bias must have shape \[4\]"),
    (lambda: bias_act(torch.randn(2, 4), torch.randn(4, dtype=torch.float16), "relu"), TypeError,
     "bias must have the dtype of x"),
    (lambda: bias_act(torch.zeros(2, 4, dtype=torch.int64), None, "relu"), TypeError, "x must be one of"),
    (lambda: bias_act(torch.randn(8, 4).t(), None, "relu"), ValueError, "contiguous last dimension"),
    (lambda: bias_act("x", None, "relu"), TypeError, "x must be a torch.Tensor"),
    (lambda: bias_act(torch.randn(2, 4), None, "relu", backend="cuda"), ValueError, "needs CUDA tensors"),
])
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_triton_op(device):
    skip_unsupported("triton", device, torch.float32)
    x, bias = torch.randn(3, 96, device=device), torch.randn(96, device=device)
    for activation in ACTIVATIONS:
        torch.library.opcheck(torch.ops.fusedgpt.bias_act_triton.default, (x, bias, activation))
    torch.library.opcheck(torch.ops.fusedgpt.bias_act_triton.default, (x, None, "gelu"))
    # with gradients: the registered backward, and the backward op itself
    x_grad, bias_grad = x.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.fusedgpt.bias_act_triton.default, (x_grad, bias_grad, "gelu_tanh"))
    torch.library.opcheck(torch.ops.fusedgpt.bias_act_backward_triton.default, (torch.randn_like(x), x, bias, "relu"))


@pytest.mark.gpu
def test_opcheck_cuda_op():
    x, bias = torch.randn(3, 96, device="cuda", dtype=torch.float16), torch.randn(96, device="cuda", dtype=torch.float16)
    for activation in ACTIVATIONS:
        torch.library.opcheck(torch.ops.fusedgpt.bias_act.default, (x, bias, activation))
    torch.library.opcheck(torch.ops.fusedgpt.bias_act.default,
                          (x.clone().requires_grad_(True), bias.clone().requires_grad_(True), "gelu_tanh"))
    torch.library.opcheck(torch.ops.fusedgpt.bias_act_backward.default, (torch.randn_like(x), x, bias, "gelu"))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    skip_unsupported(backend, device, torch.float32)
    x, bias = torch.randn(4, 256, device=device), torch.randn(256, device=device)

    def mlp_half(x):
        return bias_act(x * 0.5, bias, "gelu_tanh", backend=backend) + 1

    compiled = torch.compile(mlp_half, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    torch.testing.assert_close(compiled(x), mlp_half(x), rtol=0, atol=0)
    # Forward and backward in one traced graph: the registered backward is what AOTAutograd traces.
    leaf = x.clone().requires_grad_(True)
    compiled(leaf).sum().backward()
    eager = x.clone().requires_grad_(True)
    mlp_half(eager).sum().backward()
    torch.testing.assert_close(leaf.grad, eager.grad, rtol=1e-6, atol=1e-6)


def test_linear_act_is_a_drop_in_linear():
    reference = torch.nn.Linear(64, 256)
    fused = fusedgpt.nn.LinearAct(64, 256, activation="gelu_tanh")
    assert list(fused.state_dict()) == list(reference.state_dict())
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.nn.functional.gelu(reference(x), approximate="tanh"))
    relu = fusedgpt.nn.LinearAct(64, 32, bias=False, activation="relu")
    with torch.no_grad():
        torch.testing.assert_close(relu(x), torch.relu(x @ relu.weight.t()))
    with pytest.raises(ValueError, match="activation must be one of"):
        fusedgpt.nn.LinearAct(4, 4, activation="tanh")



@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_act_trains_like_linear_then_activation(backend, monkeypatch):
    """The drop-in module's parameters get torch.nn's gradients (the op's backward on each backend)."""
    skip_unsupported(backend, "cpu", torch.float32)
    monkeypatch.setenv("FUSEDGPT_BACKEND", backend)
    reference = torch.nn.Linear(48, 96)
    fused = fusedgpt.nn.LinearAct(48, 96, activation="gelu_tanh")
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(5, 48)
    fused(x).square().sum().backward()
    torch.nn.functional.gelu(reference(x), approximate="tanh").square().sum().backward()
    for name, parameter in fused.named_parameters():
        torch.testing.assert_close(parameter.grad, dict(reference.named_parameters())[name].grad, rtol=1e-4,
                                   atol=1e-5)

def test_linear_act_under_autocast_casts_its_bias():
    fused = fusedgpt.nn.LinearAct(64, 32, activation="relu")
    x = torch.randn(3, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x)
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        expected = torch.relu(x @ fused.weight.t() + fused.bias)
    torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.05)
