"""fusedgpt.ops.linear_cross_entropy (the head and its loss without the [tokens, vocab] logits): loss and
gradients against float64 autograd of the reference on every backend, ignored and out-of-range labels,
the memory it never takes, bad input, opcheck."""

import pytest
import torch
from utils import CPU_BACKENDS, DEVICES, GPU_BACKENDS, assert_within_tolerance, largest_tensor_created, skip_unsupported

from fusedgpt.ops import linear_cross_entropy, linear_cross_entropy_backend, linear_cross_entropy_reference

BACKENDS = [b for b in CPU_BACKENDS + GPU_BACKENDS if b.values[0] != "cuda"]
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)]


def _inputs(rows, width, vocab, dtype, device, with_bias=True, ignored=0.2):
    hidden = torch.randn(rows, width, dtype=dtype, device=device)
    weight = (torch.randn(vocab, width, device=device) * width ** -0.5).to(dtype)
    bias = torch.randn(vocab, dtype=dtype, device=device) if with_bias else None
    labels = torch.randint(0, vocab, (rows,), device=device)
    labels[torch.rand(rows, device=device) < ignored] = -100
    labels[0] = vocab - 1  # at least one row counts (and the last class is used)
    return hidden, weight, bias, labels


def _gradients(function, hidden, weight, bias, labels):
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    loss = function(leaves[0], leaves[1], labels, leaves[2])
    loss.backward()
    return loss.detach(), [leaf.grad if leaf is not None else None for leaf in leaves]


def _plain_pytorch(hidden, weight, labels, bias):
    return torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, bias), labels)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_and_gradients_match_float64_autograd(backend, device, dtype):
    skip_unsupported(backend, device, dtype)
    shapes = [(37, 48, 301), (5, 16, 1000), (1, 8, 7), (3, 16, 9000)] if device == "cpu" else [(4096, 768, 50257), (777, 1024, 50272)]
    for rows, width, vocab in shapes:
        for with_bias in (True, False):
            inputs = _inputs(rows, width, vocab, dtype, device, with_bias)
            hidden, weight, bias, labels = inputs
            assert linear_cross_entropy_backend(hidden.requires_grad_(True), weight, labels, bias,
                                                backend=backend).backend == backend
            loss, grads = _gradients(lambda h, w, y, b: linear_cross_entropy(h, w, y, b, backend=backend), *inputs)
            expected_loss, expected = _gradients(linear_cross_entropy_reference,
                                                 *(t.double() if t is not None and t.is_floating_point() else t
                                                   for t in inputs))
            baseline_loss, baseline = _gradients(_plain_pytorch, *inputs)
            assert loss.dtype == torch.float32 and loss.shape == ()
            assert_within_tolerance(loss.to(dtype), expected_loss, baseline_loss.to(dtype), f"loss {rows}x{vocab}")
            for name, g, e, base in zip(("dhidden", "dweight", "dbias"), grads, expected, baseline):
                if e is not None:
                    assert g.dtype == dtype
                    assert_within_tolerance(g, e, base, f"{name} {rows}x{width}x{vocab} bias={with_bias}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ignored_and_out_of_range_labels(backend, device):
    skip_unsupported(backend, device, torch.float32)
    hidden, weight, bias, labels = _inputs(9, 16, 50, torch.float32, device)
    everything_ignored = torch.full_like(labels, -100)
    assert linear_cross_entropy(hidden, weight, everything_ignored, bias, backend=backend).isnan()  # as torch's
    custom = labels.clamp(min=0).where(labels % 3 != 0, 7)
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, custom, bias, ignore_index=7, backend=backend),
                               linear_cross_entropy_reference(hidden, weight, custom, bias, ignore_index=7))
    wrong = labels.clone()
    wrong[2] = 50
    assert linear_cross_entropy(hidden, weight, wrong, bias, backend=backend).isnan()  # never silently wrong
    wrong[2] = -3
    assert linear_cross_entropy(hidden, weight, wrong, bias, backend=backend).isnan()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_never_holds_the_logits(backend, device):
    """Every tensor created during forward and backward (recorded at the dispatcher) is a small fraction
    of the [tokens, vocab] logits an unfused head holds (twice: logits and their gradient)."""
    skip_unsupported(backend, device, torch.float32)
    rows, width, vocab = 256, 16, 2000
    hidden, weight, bias, labels = _inputs(rows, width, vocab, torch.float32, device)
    hidden.requires_grad_(True), weight.requires_grad_(True)
    largest = largest_tensor_created(
        lambda: linear_cross_entropy(hidden, weight, labels, bias, backend=backend).backward())
    assert hidden.grad is not None and weight.grad is not None
    assert largest <= max(vocab * width, rows * width) < rows * vocab // 4


@pytest.mark.parametrize("call,error,match", [
    (lambda h, w, y: linear_cross_entropy(h[0], w, y), ValueError, "hidden must have rank 2"),
    (lambda h, w, y: linear_cross_entropy(h, w[:, :3], y), ValueError, r"weight must have shape \[V, 8\]"),
    (lambda h, w, y: linear_cross_entropy(h, w.half(), y), TypeError, "weight must have hidden's dtype"),
    (lambda h, w, y: linear_cross_entropy(h, w, y.int()), ValueError, "labels must be int64"),
    (lambda h, w, y: linear_cross_entropy(h, w, y[:2]), ValueError, r"labels must be int64 \[4\]"),
    (lambda h, w, y: linear_cross_entropy(h, w, y, torch.randn(3)), ValueError, r"bias must have shape \[10\]"),
    (lambda h, w, y: linear_cross_entropy(h, w, y, backend="cuda"), ValueError, "backend 'cuda' cannot run"),
])
def test_bad_input_is_named(call, error, match):
    hidden, weight, _, labels = _inputs(4, 8, 10, torch.float32, "cpu")
    with pytest.raises(error, match=match):
        call(hidden, weight, labels)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    skip_unsupported("triton", device, torch.float32)
    hidden, weight, bias, labels = _inputs(6, 16, 40, torch.float32, device)
    for op in (torch.ops.fusedgpt.linear_cross_entropy_triton, torch.ops.fusedgpt.linear_cross_entropy_torch):
        torch.library.opcheck(op.default, (hidden, weight, bias, labels, -100, False))
        torch.library.opcheck(op.default, (hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True),
                                           None, labels, -100, True))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_traces_forward_and_backward(backend, device):
    skip_unsupported(backend, device, torch.float32)
    hidden, weight, bias, labels = _inputs(12, 16, 50, torch.float32, device)

    def head_loss(h, w):
        return linear_cross_entropy(h * 2, w, labels, bias, backend=backend)

    compiled = torch.compile(head_loss, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    compiled(*leaves).backward()
    eager = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    head_loss(*eager).backward()
    for a, e in zip(leaves, eager):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-6)
