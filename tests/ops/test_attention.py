"""fusedgpt.ops.attention (prefill) against the float64 reference: causal, Sq < Sk, sliding windows,
left padding with all-padding rows, strided views, odd head counts and head dims; bad input; opcheck;
torch.compile. The Triton kernel runs under the interpreter on the CPU (small shapes)."""

import pytest
import torch
from utils import (ALL_BACKENDS, DEVICES, DTYPES, assert_within_tolerance, largest_tensor_created, poison_allocator,
                   skip_unsupported)

from fusedgpt.ops import attention, attention_backend, attention_reference
from fusedgpt.ops.attention import visible_keys

# (B, Sq, Sk, H, D)
CPU_CASES = [(1, 1, 1, 2, 64), (2, 7, 7, 3, 64), (1, 7, 40, 2, 80), (1, 57, 57, 2, 96), (1, 33, 70, 1, 128)]
GPU_CASES = [(1, 1, 1, 12, 64), (2, 7, 7, 12, 64), (2, 128, 128, 25, 64), (1, 257, 257, 32, 80),
             (2, 257, 300, 16, 96), (1, 1000, 1000, 16, 128), (3, 7, 1030, 12, 64), (1, 2048, 2048, 12, 64)]


def _plain_pytorch(q, k, v, causal, window, scale, kv_start):
    """Plain PyTorch in q's dtype (SDPA's math with the same mask): the tolerance rule's baseline."""
    mask = visible_keys(q.shape[1], k.shape[1], causal=causal, window=window, kv_start=kv_start, device=q.device)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return torch.nan_to_num(out.transpose(1, 2), nan=0.0)  # SDPA gives NaN where nothing is visible


def _check(backend, q, k, v, *, causal=True, window=None, scale=None, kv_start=None):
    poison_allocator(q.device.type)
    out = attention(q, k, v, causal=causal, window=window, scale=scale, kv_start=kv_start, backend=backend)
    reference = attention_reference(q.double(), k.double(), v.double(), causal=causal, window=window, scale=scale,
                                    kv_start=kv_start)
    effective_scale = q.shape[-1] ** -0.5 if scale is None else scale
    baseline = _plain_pytorch(q, k, v, causal, window, effective_scale, kv_start)
    assert out.is_contiguous() and out.shape == q.shape
    assert_within_tolerance(out, reference, baseline, f"attention window={window} kv_start={kv_start}")
    return out


def _skip_cuda_float32(backend, dtype):
    if backend == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernel takes float16/bfloat16 (float32 is refused: see test_cuda_backend_refusals)")


def _qkv(batch, q_len, kv_len, heads, dim, dtype, device):
    make = lambda s: torch.randn(batch, s, heads, dim, dtype=dtype, device=device)  # noqa: E731
    return make(q_len), make(kv_len), make(kv_len)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_matches_reference(backend, device, dtype):
    skip_unsupported(backend, device, dtype)
    _skip_cuda_float32(backend, dtype)
    for case in CPU_CASES if device == "cpu" else GPU_CASES:
        _check(backend, *_qkv(*case, dtype, device))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_attention_and_custom_scale(backend, device, dtype):
    skip_unsupported(backend, device, dtype)
    _skip_cuda_float32(backend, dtype)
    _check(backend, *_qkv(2, 19, 45, 3, 64, dtype, device), causal=False)
    # GPT-Neo: unscaled scores, large logits; softmax statistics must stay in fp32.
    _check(backend, *_qkv(1, 40, 40, 2, 64, dtype, device), scale=1.0)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sliding_window(backend, device, dtype):
    skip_unsupported(backend, device, dtype)
    _skip_cuda_float32(backend, dtype)
    if device == "cpu":
        cases = [(1, 50, 50, 2, 64, 1), (1, 50, 50, 2, 64, 7), (1, 20, 60, 1, 64, 16), (1, 30, 30, 1, 64, 100),
                 (1, 300, 300, 1, 64, 256)]
    else:
        cases = [(1, 1000, 1000, 16, 64, 1), (2, 1000, 1000, 16, 128, 256), (1, 600, 2000, 16, 64, 256),
                 (1, 300, 300, 12, 64, 4096), (1, 4096, 4096, 16, 128, 256)]
    for batch, q_len, kv_len, heads, dim, window in cases:
        _check(backend, *_qkv(batch, q_len, kv_len, heads, dim, dtype, device), window=window, scale=1.0)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_left_padding_with_all_padding_rows(backend, device, dtype):
    """Sequence 1 is padded up to key 20, sequence 2 entirely: its rows (and the padded queries of
    sequence 1 that see nothing) must be zeros, never NaN."""
    skip_unsupported(backend, device, dtype)
    _skip_cuda_float32(backend, dtype)
    q, k, v = _qkv(3, 33, 33, 2, 64, dtype, device)
    kv_start = torch.tensor([0, 20, 33], dtype=torch.int32, device=device)
    out = _check(backend, q, k, v, kv_start=kv_start)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.equal(out[1, :20], torch.zeros_like(out[1, :20]))
    _check(backend, q, k, v, kv_start=kv_start, window=5)
    _check(backend, *_qkv(3, 5, 33, 2, 64, dtype, device), kv_start=kv_start)  # Sq < Sk with padding


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_random_bounds_across_tile_stages(backend, device):
    """Random lengths, windows and padding, so that a block's key tiles fall in every stage of the Triton
    kernel's loop (masked before the interior, unmasked inside it, masked after) and on its edges, at a
    power-of-two head dim (no load masked inside) and another."""
    skip_unsupported(backend, device, torch.float32)
    generator = torch.Generator().manual_seed(1)
    dims = (16, 24) if device == "cpu" else (64, 80)
    for trial in range(15):
        def draw(low, high):
            return int(torch.randint(low, high, (), generator=generator))
        kv_len = draw(1, 90 if device == "cpu" else 700)
        q_len = draw(1, kv_len + 1)
        window = [None, draw(1, 40), draw(1, kv_len + 2)][trial % 3]
        kv_start = torch.tensor([draw(0, kv_len), 0], dtype=torch.int32, device=device) if trial % 4 else None
        dtype = torch.float32 if backend != "cuda" else torch.float16
        _check(backend, *_qkv(2, q_len, kv_len, 1, dims[trial % 2], dtype, device), window=window, kv_start=kv_start)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_strided_views_need_no_copy(backend, device):
    skip_unsupported(backend, device, torch.float16)
    batch, seq, heads, dim = 2, 37, 3, 64
    qkv = torch.randn(batch, seq, 3, heads, dim, dtype=torch.float16, device=device)  # fused projection output
    q, k, v = qkv.unbind(2)
    _check(backend, q, k, v)
    # [B, H, S, D] tensors transposed to [B, S, H, D]
    q, k, v = (torch.randn(batch, heads, seq, dim, dtype=torch.float16, device=device).transpose(1, 2)
               for _ in range(3))
    _check(backend, q, k, v, window=9)


@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v: attention(q[0], k, v), ValueError, "q must have rank 4"),
    (lambda q, k, v: attention(q, k.half(), v), TypeError, "k must have the dtype of q"),
    (lambda q, k, v: attention(q, k, v[:, :3]), ValueError, "v must have the shape of k"),
    (lambda q, k, v: attention(q, k[..., :8], v[..., :8]), ValueError, r"k must have shape \[B, Sk, H, D\]"),
    (lambda q, k, v: attention(k, q, q), ValueError, r"Sq <= Sk"),
    (lambda q, k, v: attention(q, k, v, window=0), ValueError, "window must be a positive int"),
    (lambda q, k, v: attention(q, k, v, window=4, causal=False), ValueError, "window needs causal=True"),
    (lambda q, k, v: attention(q, k, v, kv_start=torch.zeros(2)), TypeError, "kv_start must be int32"),
    (lambda q, k, v: attention(q, k, v, kv_start=torch.zeros(3, dtype=torch.int32)), ValueError,
     r"kv_start must have shape \[2\]"),
    (lambda q, k, v: attention(q.int(), k.int(), v.int()), TypeError, "q must be one of"),
    (lambda q, k, v: attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)), ValueError,
     "q must have a contiguous last dimension"),
    (lambda q, k, v: attention(q, k, v, backend="cuda"), ValueError, "backend .cuda. cannot run this call"),
])
def test_bad_input_is_named(call, error, match):
    q, k, v = torch.randn(2, 4, 3, 16), torch.randn(2, 6, 3, 16), torch.randn(2, 6, 3, 16)
    with pytest.raises(error, match=match):
        call(q, k, v)


@pytest.mark.gpu
def test_cuda_backend_refusals():
    """Cases the CUDA kernel cannot serve raise a clear error when asked for, and auto routes them."""
    q = torch.randn(1, 4, 2, 64, device="cuda")
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        attention(q, q, q, backend="cuda")
    q = torch.randn(1, 4, 2, 32, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="head dims"):
        attention(q, q, q, backend="cuda")
    torch.testing.assert_close(attention(q, q, q), attention_reference(q, q, q), rtol=2e-3, atol=2e-3)
    odd = torch.randn(1, 4, 2, 66, device="cuda", dtype=torch.float16)[..., :64]  # strides not multiples of 8
    with pytest.raises(ValueError, match="16-byte aligned"):
        attention(odd, odd, odd, backend="cuda")


@pytest.mark.gpu
def test_opcheck_cuda_op():
    q, k, v = _qkv(2, 5, 70, 2, 64, torch.float16, "cuda")
    kv_start = torch.tensor([0, 3], dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.fusedgpt.attention.default, (q, k, v, True, 16, 0.125, kv_start))
    torch.library.opcheck(torch.ops.fusedgpt.attention.default, (q, k, v, False, None, 0.125, None))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_triton_op(device):
    skip_unsupported("triton", device, torch.float32)
    q, k, v = _qkv(2, 5, 9, 2, 32, torch.float32, device)
    kv_start = torch.tensor([0, 3], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.fusedgpt.attention_triton.default, (q, k, v, True, 4, 0.5, kv_start))
    torch.library.opcheck(torch.ops.fusedgpt.attention_triton.default, (q, k, v, False, None, 0.25, None))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    dtype = torch.float16 if backend == "cuda" else torch.float32
    skip_unsupported(backend, device, dtype)
    q, k, v = _qkv(1, 9, 9, 2, 64, dtype, device)

    def layer(q, k, v):
        return attention(q * 2, k, v, window=4, backend=backend).sum(-1)

    compiled = torch.compile(layer, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    torch.testing.assert_close(compiled(q, k, v), layer(q, k, v))


def test_head_dims_above_the_kernel_limit_use_the_reference():
    q = torch.randn(1, 3, 1, 300)
    torch.testing.assert_close(attention(q, q, q), attention_reference(q, q, q))


# ---- training: the backward (FlashAttention-2's, on the Triton kernels) -----------------------------

def _plain_gradients(q, k, v, causal, window, scale, kv_start, grad):
    """Baseline gradients: SDPA in q's dtype with the same mask (a row that sees nothing is given key 0
    and its output zeroed, so it contributes no gradient and no NaN)."""
    mask = visible_keys(q.shape[1], k.shape[1], causal=causal, window=window, kv_start=kv_start, device=q.device)
    empty = ~mask.any(dim=-1, keepdim=True)
    first_key = torch.arange(k.shape[1], device=q.device) == 0
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in leaves), attn_mask=mask | (empty & first_key), scale=scale)
    out = torch.where(empty, 0.0, out).transpose(1, 2)
    out.backward(grad)
    return [leaf.grad for leaf in leaves]


def _check_gradients(backend, q, k, v, *, causal=True, window=None, scale=None, kv_start=None):
    grad = torch.randn_like(q)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    choice = attention_backend(*leaves, causal=causal, window=window, scale=scale, kv_start=kv_start, backend=backend)
    assert choice.backend == backend, choice
    poison_allocator(q.device.type)
    attention(*leaves, causal=causal, window=window, scale=scale, kv_start=kv_start, backend=backend).backward(grad)
    as64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    attention_reference(*as64, causal=causal, window=window, scale=scale, kv_start=kv_start).backward(grad.double())
    effective_scale = q.shape[-1] ** -0.5 if scale is None else scale
    baseline = _plain_gradients(q, k, v, causal, window, effective_scale, kv_start, grad)
    for name, leaf, expected, base in zip(("dq", "dk", "dv"), leaves, as64, baseline):
        assert leaf.grad.shape == leaf.shape
        assert_within_tolerance(leaf.grad, expected.grad, base, f"{name} causal={causal} window={window} "
                                                               f"kv_start={kv_start}")


TRAINING_BACKENDS = [b for b in ALL_BACKENDS if b.values[0] == "triton"]


@pytest.mark.parametrize("backend,device", TRAINING_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_float64_autograd(backend, device, dtype):
    """dq, dk, dv against float64 autograd of the reference by the tolerance rule: causal, Sq < Sk, full
    attention with a custom scale, GPT-Neo's unscaled window (and window 1), left padding with a sequence
    that is all padding, odd head dims; several query and key blocks."""
    skip_unsupported(backend, device, dtype)
    small = device == "cpu"
    make = lambda *case: _qkv(*case, dtype, device)  # noqa: E731
    _check_gradients(backend, *make(2, 37, 37, 2, 16) if small else make(2, 300, 300, 12, 64))
    _check_gradients(backend, *make(1, 20, 45, 2, 32) if small else make(2, 200, 1030, 16, 128))
    _check_gradients(backend, *make(2, 19, 33, 1, 16), causal=False, scale=0.3)
    _check_gradients(backend, *make(1, 40, 40, 2, 16) if small else make(1, 1000, 1000, 8, 128), window=7 if small else 256,
                     scale=1.0)
    _check_gradients(backend, *make(1, 18, 18, 1, 16), window=1)
    kv_start = torch.tensor([0, 20, 35], dtype=torch.int32, device=device)
    _check_gradients(backend, *make(3, 35, 35, 1, 16), kv_start=kv_start)
    _check_gradients(backend, *make(3, 35, 35, 1, 16), kv_start=kv_start, window=9)
    _check_gradients(backend, *make(1, 17, 23, 1, 80) if small else make(2, 257, 300, 4, 80))


@pytest.mark.parametrize("backend,device", TRAINING_BACKENDS)
def test_backward_allocates_nothing_of_size_s_squared(backend, device):
    """Every tensor the forward and backward create (recorded at the dispatcher) is O(S * D): none holds
    B * H * Sq * Sk elements, as the reference's score matrix does."""
    skip_unsupported(backend, device, torch.float32)
    batch, seq, heads, dim = 1, 96, 2, 16
    q, k, v = (t.requires_grad_(True) for t in _qkv(batch, seq, seq, heads, dim, torch.float32, device))
    largest = largest_tensor_created(lambda: attention(q, k, v, backend=backend).sum().backward())
    assert q.grad is not None and 0 < largest < batch * heads * seq * seq
    assert largest <= 4 * batch * seq * heads * dim  # O(S * D) (delta's fp32 product is the largest)


@pytest.mark.parametrize("backend,device", TRAINING_BACKENDS)
def test_backward_of_expanded_gradients_and_no_double_backward(backend, device):
    skip_unsupported(backend, device, torch.float32)
    q, k, v = (t.requires_grad_(True) for t in _qkv(1, 20, 20, 2, 16, torch.float32, device))
    attention(q, k, v, window=5, backend=backend).sum().backward()  # an expanded (stride 0) gradient
    as64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    attention_reference(*as64, window=5).sum().backward()
    for leaf, expected in zip((q, k, v), as64):
        torch.testing.assert_close(leaf.grad.double(), expected.grad, rtol=1e-4, atol=1e-5)
    (dq,) = torch.autograd.grad(attention(q, k, v, backend=backend).square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="attention_backward_triton"):
        dq.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_training_ops(device):
    skip_unsupported("triton", device, torch.float32)
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 5, 9, 2, 32, torch.float32, device))
    kv_start = torch.tensor([0, 3], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.fusedgpt.attention_triton_train.default, (q, k, v, True, 4, 0.5, kv_start))
    out, lse = torch.ops.fusedgpt.attention_triton_train(q.detach(), k.detach(), v.detach(), True, None, 0.5, None)
    torch.library.opcheck(torch.ops.fusedgpt.attention_backward_triton.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, True, None, 0.5, None))


@pytest.mark.parametrize("backend,device", TRAINING_BACKENDS)
def test_torch_compile_traces_forward_and_backward(backend, device):
    skip_unsupported(backend, device, torch.float32)
    q, k, v = _qkv(1, 9, 9, 2, 16, torch.float32, device)

    def layer(q, k, v):
        return attention(q * 2, k, v, window=4, backend=backend).sum(-1)

    compiled = torch.compile(layer, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    compiled(*leaves).square().sum().backward()
    eager = [t.clone().requires_grad_(True) for t in (q, k, v)]
    layer(*eager).square().sum().backward()
    for a, e in zip(leaves, eager):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-5)
