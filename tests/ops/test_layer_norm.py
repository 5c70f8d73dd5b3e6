"""fusedgpt.ops.layer_norm against the float64 reference, on every backend, forward and backward (against
float64 autograd of the reference); bad input; opcheck; torch.compile; the drop-in fusedgpt.nn.LayerNorm."""

import pytest
import torch
from utils import ALL_BACKENDS, DEVICES, DTYPES, assert_within_tolerance, poison_allocator, skip_unsupported

import fusedgpt
from fusedgpt.ops import layer_norm, layer_norm_backend, layer_norm_reference

CPU_SHAPES = [(1, 768), (7, 1600), (3, 5120), (2, 3, 1001), (4, 1), (2, 16384)]
GPU_SHAPES = [(1, 768), (16, 768), (257, 1024), (5, 1600), (3, 2048), (2, 2560), (4, 4096), (3, 5120),
              (2, 7168), (2, 9216), (2, 12288), (2, 16384), (3, 7, 1001), (16384, 768)]


def _plain_pytorch(x, weight, bias, eps, residual):
    """What an unfused block computes in x's dtype: the tolerance rule's baseline."""
    s = x + residual if residual is not None else x
    y = torch.nn.functional.layer_norm(s, (x.shape[-1],), weight, bias, eps)
    return (y, s) if residual is not None else y


def _inputs(shape, dtype, device, affine=True, with_residual=True):
    x = torch.randn(shape, dtype=dtype, device=device) * 2 + 0.5
    residual = torch.randn(shape, dtype=dtype, device=device) if with_residual else None
    weight = torch.randn(shape[-1], dtype=dtype, device=device) if affine else None
    bias = torch.randn(shape[-1], dtype=dtype, device=device) if affine else None
    return x, weight, bias, residual


def _check(backend, x, weight, bias, residual, eps=1e-5):
    poison_allocator(x.device.type)
    out = layer_norm(x, weight, bias, eps, residual, backend=backend)
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    reference = layer_norm_reference(as64(x), as64(weight), as64(bias), eps,
                                      None if residual is None else as64(residual))
    baseline = _plain_pytorch(x, weight, bias, eps, residual)
    if residual is None:
        assert_within_tolerance(out, reference, baseline, "y")
    else:
        y, s = out
        # s is x + residual rounded to x's dtype: exactly what the unfused block stores.
        torch.testing.assert_close(s, baseline[1], rtol=0, atol=0)
        # Normalising the stored s in float64 is the reference for y.
        reference_y = layer_norm_reference(s.double(), as64(weight), as64(bias), eps)
        assert_within_tolerance(y, reference_y, baseline[0], "y")
        assert y.is_contiguous() and s.is_contiguous()


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_matches_reference(backend, device, dtype, with_residual):
    skip_unsupported(backend, device, dtype)
    for shape in CPU_SHAPES if device == "cpu" else GPU_SHAPES:
        _check(backend, *_inputs(shape, dtype, device, with_residual=with_residual))



def _gradients(function, inputs, grads):
    """Gradients of function(x, weight, bias, residual) (y, or (y, s)) under `grads`, on fresh leaves:
    [dx, dweight, dbias, dresidual], None where an input is None."""
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    out = function(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grads[:len(outs)])
    return [leaf.grad if leaf is not None else None for leaf in leaves]


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_backward_matches_float64_autograd(backend, device, dtype, with_residual):
    """dx, dweight, dbias (and dresidual, with the gradient of the returned sum flowing in too) of every
    backend against float64 autograd of the reference, by the tolerance rule; the call trains on that
    backend."""
    skip_unsupported(backend, device, dtype)
    shapes = [(5, 96), (2, 3, 257), (3, 1), (130, 64)] if device == "cpu" else [(16, 768), (257, 1024), (3, 7, 1001)]
    for shape in shapes:
        for affine in (True, False):
            x, weight, bias, residual = _inputs(shape, dtype, device, affine=affine, with_residual=with_residual)
            grads = [torch.randn(shape, dtype=dtype, device=device) for _ in range(2)]
            choice = layer_norm_backend(x.detach().requires_grad_(True), weight, bias, 1e-5, residual, backend=backend)
            assert choice.backend == backend, choice
            poison_allocator(device)
            actual = _gradients(lambda x, w, b, r: layer_norm(x, w, b, 1e-5, r, backend=backend),
                                (x, weight, bias, residual), grads)
            as64 = lambda t: None if t is None else t.double()  # noqa: E731
            expected = _gradients(lambda x, w, b, r: layer_norm_reference(x, w, b, 1e-5, r),
                                  [as64(t) for t in (x, weight, bias, residual)], [g.double() for g in grads])
            baseline = _gradients(lambda x, w, b, r: _plain_pytorch(x, w, b, 1e-5, r), (x, weight, bias, residual),
                                  grads)
            for name, a, e, base in zip(("dx", "dweight", "dbias", "dresidual"), actual, expected, baseline):
                if e is not None:
                    assert_within_tolerance(a, e, base, f"{name} {shape} affine={affine}")


@pytest.mark.parametrize("backend,device", [b for b in ALL_BACKENDS if b.values[0] != "torch"])
def test_backward_of_expanded_gradients_and_no_double_backward(backend, device):
    skip_unsupported(backend, device, torch.float32)
    x, weight, bias, residual = _inputs((4, 40), torch.float32, device)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias, residual)]
    y, s = layer_norm(leaves[0], leaves[1], leaves[2], 1e-5, leaves[3], backend=backend)
    (y.sum() + 2 * s.sum()).backward()  # expanded (stride 0) gradients
    expected = _gradients(lambda x, w, b, r: (lambda y, s: y.sum() + 2 * s.sum())(*layer_norm_reference(x, w, b, 1e-5, r)),
                          [t.double() for t in (x, weight, bias, residual)], [torch.tensor(1.0, dtype=torch.float64)])
    for leaf, e in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad.double(), e, rtol=1e-4, atol=1e-5)
    y = layer_norm(leaves[0], leaves[1], None, 1e-5, backend=backend)
    (dx,) = torch.autograd.grad((y * y).sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="layer_norm_backward_triton"):
        dx.sum().backward()

@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_without_weight_or_bias_and_strided_rows(backend, device):
    dtype = torch.float16
    skip_unsupported(backend, device, dtype)
    x, weight, bias, residual = _inputs((5, 1600), dtype, device)
    _check(backend, x, None, None, residual)
    _check(backend, x, weight, None, None)
    _check(backend, x, None, bias, None)
    # Rows of a wider buffer (a view with row stride 1700, misaligned for 16-byte access), and an
    # offset view for the residual: the kernels read strided rows without a copy.
    wide = torch.randn(5, 1700, dtype=dtype, device=device)
    _check(backend, wide[:, 3:1603], weight, bias, torch.randn(5, 1700, dtype=dtype, device=device)[:, :1600])
    # A [B, H, S]-like tensor transposed in its leading dims (last dim still contiguous).
    _check(backend, torch.randn(4, 3, 768, dtype=dtype, device=device).transpose(0, 1), weight[:768].contiguous(),
           None, None)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_large_mean_small_variance(backend, device):
    """Two-pass statistics: a large common offset must not destroy the variance."""
    skip_unsupported(backend, device, torch.float32)
    x = 1000.0 + 0.01 * torch.randn(3, 2048, device=device)
    _check(backend, x, None, None, None)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_empty_input(backend, device):
    skip_unsupported(backend, device, torch.float32)
    x = torch.randn(0, 768, device=device)
    assert layer_norm(x, backend=backend).shape == (0, 768)


def test_float64_runs_on_the_reference_and_kernels_refuse_it():
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(layer_norm(x), torch.nn.functional.layer_norm(x, (64,)))
    with pytest.raises(ValueError, match="float64"):
        layer_norm(x, backend="triton")


def test_autograd_calls_train_on_the_default_backend():
    x = torch.randn(3, 64, requires_grad=True)
    weight = torch.randn(64, requires_grad=True)
    layer_norm(x, weight, None, 1e-5).sum().backward()
    assert x.grad is not None and weight.grad is not None


@pytest.mark.parametrize("call,error,match", [
    (lambda: layer_norm([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (lambda: layer_norm(torch.zeros(2, 4, dtype=torch.int32)), TypeError, "x must be one of"),
    (lambda: layer_norm(torch.randn(2, 16385)), ValueError, r"hidden size\) must be in \[1, 16384\]"),
    (lambda: layer_norm(torch.randn(8, 4).t()), ValueError, "x must have a contiguous last dimension"),
    (lambda: layer_norm(torch.randn(2, 4), torch.randn(5)), ValueError, r"weight must have shape \[4\]"),
    (lambda: layer_norm(torch.randn(2, 4), None, torch.randn(4, dtype=torch.float16)), TypeError,
     "bias must have the dtype of x"),
    (lambda: layer_norm(torch.randn(2, 4), residual=torch.randn(3, 4)), ValueError,
     "residual must have the shape of x"),
    (lambda: layer_norm(torch.randn(2, 4), eps=-1.0), ValueError, "eps must be a non-negative"),
    (lambda: layer_norm(torch.randn(2, 4), eps=float("nan")), ValueError, "eps must be a non-negative finite number, "
                                                                         "got nan"),
    (lambda: layer_norm(torch.randn(2, 4), eps=float("inf")), ValueError, "eps must be a non-negative finite"),
    (lambda: layer_norm(torch.randn(2, 4), eps=True), ValueError, "eps must be a non-negative finite number, got True"),
    (lambda: layer_norm(torch.randn(2, 4), backend="fast"), ValueError, "backend must be one of"),
    (lambda: layer_norm(torch.randn(2, 4), backend="cuda"), ValueError, "cuda backend needs CUDA tensors"),
])
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_triton_ops(device):
    skip_unsupported("triton", device, torch.float32)
    x, weight, bias, residual = _inputs((3, 96), torch.float32, device)
    torch.library.opcheck(torch.ops.fusedgpt.layer_norm_triton.default, (x, weight, bias, 1e-5))
    torch.library.opcheck(torch.ops.fusedgpt.add_layer_norm_triton.default, (x, residual, None, bias, 1e-5))
    # with gradients: the registered backward, and the backward op itself
    grad = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    torch.library.opcheck(torch.ops.fusedgpt.layer_norm_triton.default, (grad(x), grad(weight), grad(bias), 1e-5))
    torch.library.opcheck(torch.ops.fusedgpt.add_layer_norm_triton.default,
                          (grad(x), grad(residual), grad(weight), None, 1e-5))
    torch.library.opcheck(torch.ops.fusedgpt.layer_norm_backward_triton.default,
                          (torch.randn_like(x), torch.randn_like(x), x, weight, 1e-5, True))


@pytest.mark.gpu
def test_opcheck_cuda_ops():
    x, weight, bias, residual = _inputs((3, 96), torch.float16, "cuda")
    torch.library.opcheck(torch.ops.fusedgpt.layer_norm.default, (x, weight, bias, 1e-5))
    torch.library.opcheck(torch.ops.fusedgpt.add_layer_norm.default, (x, residual, weight, None, 1e-5))
    grad = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    torch.library.opcheck(torch.ops.fusedgpt.add_layer_norm.default,
                          (grad(x), grad(residual), grad(weight), grad(bias), 1e-5))
    torch.library.opcheck(torch.ops.fusedgpt.layer_norm_backward.default,
                          (torch.randn_like(x), torch.randn_like(x), x, weight, 1e-5, True))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    skip_unsupported(backend, device, torch.float32)
    x, weight, bias, residual = _inputs((4, 128), torch.float32, device)

    def block(x, residual):
        y, s = layer_norm(x, weight, bias, 1e-5, residual, backend=backend)
        return y * 2, s

    # The CPU has no fast inductor path worth the compile time here: aot_eager still traces the whole
    # graph through the fake implementations; the GPU uses inductor.
    compiled = torch.compile(block, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    expected = block(x, residual)
    actual = compiled(x, residual)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    # Forward and backward in one traced graph: the registered backward is what AOTAutograd traces.
    leaves = [t.clone().requires_grad_(True) for t in (x, residual)]
    y, s = compiled(*leaves)
    (y.sum() + s.square().sum()).backward()
    eager = [t.clone().requires_grad_(True) for t in (x, residual)]
    y, s = block(*eager)
    (y.sum() + s.square().sum()).backward()
    for a, e in zip(leaves, eager):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-5)


def test_drop_in_module_matches_torch_layer_norm():
    reference = torch.nn.LayerNorm(1600)
    with torch.no_grad():
        reference.weight.normal_()
        reference.bias.normal_()
    fused = fusedgpt.nn.LayerNorm(1600)
    assert list(fused.state_dict()) == list(reference.state_dict()) == ["weight", "bias"]
    fused.load_state_dict(reference.state_dict())
    x, residual = torch.randn(2, 5, 1600), torch.randn(2, 5, 1600)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(x))
        y, s = fused(x, residual)
        torch.testing.assert_close(s, x + residual)
        torch.testing.assert_close(y, reference(x + residual))
    no_bias = fusedgpt.nn.LayerNorm(64, bias=False)
    assert list(no_bias.state_dict()) == ["weight"]
    with pytest.raises(ValueError, match="normalized_shape must be one dim"):
        fusedgpt.nn.LayerNorm((4, 64))



@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_drop_in_module_trains_like_torch_layer_norm(backend, monkeypatch):
    """The drop-in module's parameters and input get torch.nn.LayerNorm's gradients, with the residual."""
    skip_unsupported(backend, "cpu", torch.float32)
    monkeypatch.setenv("FUSEDGPT_BACKEND", backend)
    reference = torch.nn.LayerNorm(96)
    with torch.no_grad():
        reference.weight.normal_()
        reference.bias.normal_()
    fused = fusedgpt.nn.LayerNorm(96)
    fused.load_state_dict(reference.state_dict())
    x, residual = torch.randn(7, 96, requires_grad=True), torch.randn(7, 96, requires_grad=True)
    y, s = fused(x, residual)
    (y.square().sum() + s.sum()).backward()
    x2, residual2 = x.detach().requires_grad_(True), residual.detach().requires_grad_(True)
    total = x2 + residual2
    (reference(total).square().sum() + total.sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(residual.grad, residual2.grad, rtol=1e-4, atol=1e-5)
    for name, parameter in fused.named_parameters():
        torch.testing.assert_close(parameter.grad, dict(reference.named_parameters())[name].grad, rtol=1e-4,
                                   atol=1e-4)

def test_drop_in_module_under_autocast_casts_its_parameters():
    fused = fusedgpt.nn.LayerNorm(64)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), torch.nn.functional.layer_norm(x.float(), (64,)), rtol=0.02, atol=0.02)
