"""Unusual input never gives a silent wrong answer, on every backend:
- the small tensors (weight, bias, positions, cache_lens, kv_start) are read as they are laid out:
  expanded (stride 0) and strided views give exactly what their contiguous copies give;
- writes into caches that share memory (expanded caches, k/v that are views of the cache, one tensor as
  both caches) are refused before any kernel runs; caches that only interleave (K and V halves of one
  buffer) are accepted;
- NaN in the inputs propagates through attention (zeros come from "no visible key" only);
- bfloat16 CPU tensors under the Triton interpreter, which gets bf16 wrong, are routed to the reference
  (an explicit backend="triton" is a clear error)."""

from __future__ import annotations

import pytest
import torch
from utils import ALL_BACKENDS, assert_equal_with_nan, skip_unsupported

from fusedgpt.ops import attention, bias_act, decode_attention, kv_append, layer_norm
from fusedgpt.ops._backend import choose_backend, triton_interpreter_enabled
from fusedgpt.ops._checks import kernel_limits, overlaps_itself

DTYPE = torch.float32


def _layouts(values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same logical vector as a strided view (stride 2) and, for a constant one, an expanded view."""
    padded = torch.full((2 * values.shape[0],), float("nan") if values.is_floating_point() else -7,
                        dtype=values.dtype, device=values.device)
    padded[::2] = values
    return {"stride2": padded[::2]}


def _expanded(value, length: int, dtype, device) -> torch.Tensor:
    return torch.tensor([value], dtype=dtype, device=device).expand(length)


# ---- small tensors read as they are laid out ------------------------------------------------------

@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_strided_and_expanded_weight_and_bias(backend, device, residual):
    skip_unsupported(backend, device, DTYPE)
    columns = 300
    x = torch.randn(5, columns, device=device)
    r = torch.randn(5, columns, device=device) if residual else None
    weight, bias = torch.randn(columns, device=device), torch.randn(columns, device=device)
    cases = [(_layouts(weight)["stride2"], _layouts(bias)["stride2"]),
             (_expanded(1.5, columns, DTYPE, device), _expanded(-0.25, columns, DTYPE, device))]
    for w, b in cases:
        expected = layer_norm(x, w.contiguous(), b.contiguous(), 1e-5, residual=r, backend=backend)
        actual = layer_norm(x, w, b, 1e-5, residual=r, backend=backend)
        for got, want in zip(actual if residual else (actual,), expected if residual else (expected,)):
            assert torch.equal(got, want), (w.stride(), (got - want).abs().max())


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_bias_act_strided_and_expanded_bias(backend, device):
    skip_unsupported(backend, device, DTYPE)
    x = torch.randn(7, 257, device=device)
    for bias in (_layouts(torch.randn(257, device=device))["stride2"], _expanded(0.75, 257, DTYPE, device)):
        assert torch.equal(bias_act(x, bias, "gelu_tanh", backend=backend),
                           bias_act(x, bias.contiguous(), "gelu_tanh", backend=backend)), bias.stride()


def _caches(batch, max_len, heads, dim, device):
    return [torch.full((batch, max_len, heads, dim), float("nan"), device=device) for _ in range(2)]


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
@pytest.mark.parametrize("where", ["device", "cpu"])
def test_kv_append_expanded_and_strided_positions(backend, device, where):
    skip_unsupported(backend, device, DTYPE)
    batch, max_len, heads, dim, tokens = 3, 12, 2, 8, 2
    k, v = (torch.randn(batch, tokens, heads, dim, device=device) for _ in range(2))
    place = device if where == "device" else "cpu"
    for positions in (_expanded(6, batch, torch.int32, place),
                      _layouts(torch.tensor([1, 9, 4], dtype=torch.int32, device=place))["stride2"]):
        k_cache, v_cache = _caches(batch, max_len, heads, dim, device)
        kv_append(k_cache, v_cache, k, v, positions, backend=backend)
        logical = positions.contiguous()
        assert_equal_with_nan(k_cache, _after(_caches(batch, max_len, heads, dim, device)[0], k, logical))
        assert_equal_with_nan(v_cache, _after(_caches(batch, max_len, heads, dim, device)[1], v, logical))


def _after(cache, new, positions):
    for b, start in enumerate(positions.tolist()):
        cache[b, start:start + new.shape[1]] = new[b]
    return cache


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_decode_attention_expanded_cache_lens_and_strided_kv_start(backend, device):
    skip_unsupported(backend, device, DTYPE)
    batch, max_len, heads, dim = 3, 20, 2, 16
    q, k, v = (torch.randn(batch, 1, heads, dim, device=device) for _ in range(3))
    cached = torch.randn(2, batch, max_len, heads, dim, device=device)
    cache_lens = _expanded(6, batch, torch.int32, device)
    kv_start = _layouts(torch.tensor([0, 2, 5], dtype=torch.int32, device=device))["stride2"]
    results = []
    for lens, start in ((cache_lens, kv_start), (cache_lens.contiguous(), kv_start.contiguous())):
        k_cache, v_cache = cached[0].clone(), cached[1].clone()
        out = decode_attention(q, k_cache, v_cache, lens, k=k, v=v, kv_start=start, backend=backend)
        results.append((out, k_cache, v_cache))
    (out, k_cache, v_cache), (want, k_want, v_want) = results
    assert torch.equal(out, want) and torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)
    assert torch.equal(k_cache[:, 6], k[:, 0]) and torch.equal(k_cache[:, 7:], cached[0][:, 7:])  # slot 6 only


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_attention_expanded_and_strided_kv_start(backend, device):
    skip_unsupported(backend, device, DTYPE)
    q, k, v = (torch.randn(3, 10, 2, 16, device=device) for _ in range(3))
    for kv_start in (_expanded(4, 3, torch.int32, device),
                     _layouts(torch.tensor([0, 3, 9], dtype=torch.int32, device=device))["stride2"]):
        assert torch.equal(attention(q, k, v, kv_start=kv_start, backend=backend),
                           attention(q, k, v, kv_start=kv_start.contiguous(), backend=backend)), kv_start.stride()


# ---- in-place writes into memory that is shared ---------------------------------------------------

def test_overlaps_itself():
    assert not overlaps_itself(torch.empty(2, 5, 3, 4))
    assert not overlaps_itself(torch.empty(2, 3, 5, 4).transpose(1, 2))  # [B, H, S, D] seen as [B, S, H, D]
    assert not overlaps_itself(torch.empty(2, 5, 2, 3, 4)[:, :, 0])  # the K half of an interleaved buffer
    assert not overlaps_itself(torch.empty(1, 5, 3, 4).expand(1, 5, 3, 4))
    assert overlaps_itself(torch.empty(1, 5, 3, 4).expand(2, 5, 3, 4))
    assert overlaps_itself(torch.empty(100).as_strided((4, 4), (2, 1)))


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_shared_memory_writes_are_refused(backend, device):
    skip_unsupported(backend, device, DTYPE)
    batch, max_len, heads, dim = 2, 8, 2, 4
    k_cache, v_cache = (torch.randn(batch, max_len, heads, dim, device=device) for _ in range(2))
    k, v = (torch.randn(batch, 1, heads, dim, device=device) for _ in range(2))
    positions = torch.tensor([1, 2], dtype=torch.int32, device=device)
    before = k_cache.clone(), v_cache.clone()
    with pytest.raises(ValueError, match=r"kv_append: k shares memory with k_cache .*k\.clone\(\)"):
        kv_append(k_cache, v_cache, k_cache[:, 2:3], v, positions, backend=backend)
    with pytest.raises(ValueError, match="kv_append: v shares memory with v_cache"):
        kv_append(k_cache, v_cache, k, v_cache[:, :1], positions, backend=backend)
    with pytest.raises(ValueError, match="kv_append: v shares memory with k_cache"):
        kv_append(k_cache, v_cache, k, k_cache[:, 5:6], positions, backend=backend)
    with pytest.raises(ValueError, match="k_cache and v_cache are the same memory"):
        kv_append(k_cache, k_cache, k, v, positions, backend=backend)
    expanded = torch.randn(1, max_len, heads, dim, device=device).expand(batch, -1, -1, -1)
    with pytest.raises(ValueError, match=r"kv_append: k_cache has elements that share memory .*strides \(0, "):
        kv_append(expanded, v_cache, k, v, positions, backend=backend)
    q = torch.randn(batch, 1, heads, dim, device=device)
    lens = torch.tensor([3, 4], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="decode_attention: k shares memory with k_cache"):
        decode_attention(q, k_cache, v_cache, lens, k=k_cache[:, 3:4], v=v, backend=backend)
    with pytest.raises(ValueError, match="decode_attention: v_cache has elements that share memory"):
        decode_attention(q, k_cache, expanded, lens, k=k, v=v, backend=backend)
    with pytest.raises(ValueError, match="decode_attention: q shares memory with v_cache"):
        decode_attention(v_cache[:, :1], k_cache, v_cache, lens, k=k, v=v, backend=backend)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])  # nothing was written
    # Reading an expanded cache without appending is fine (nothing is written)
    decode_attention(q, expanded, expanded, lens, backend=backend)


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_interleaved_caches_of_one_buffer_are_accepted(backend, device):
    skip_unsupported(backend, device, DTYPE)
    batch, max_len, heads, dim = 2, 8, 2, 4
    buffer = torch.zeros(batch, max_len, 2, heads, dim, device=device)  # [B, S, K/V, H, D]
    k, v = (torch.randn(batch, 3, heads, dim, device=device) for _ in range(2))
    kv_append(buffer[:, :, 0], buffer[:, :, 1], k, v, torch.tensor([0, 4], dtype=torch.int32, device=device),
              backend=backend)
    assert torch.equal(buffer[0, :3, 0], k[0]) and torch.equal(buffer[1, 4:7, 1], v[1])
    assert not buffer[0, 3:].any() and not buffer[1, :4].any()


# ---- NaN propagates ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_attention_nan_propagates_and_only_empty_rows_are_zero(backend, device):
    skip_unsupported(backend, device, DTYPE)
    q, k, v = (torch.randn(2, 6, 2, 16, device=device) for _ in range(3))
    q[0, 3, 1, 5] = float("nan")
    kv_start = torch.tensor([0, 6], dtype=torch.int32, device=device)  # sequence 1: every key is padding
    out = attention(q, k, v, kv_start=kv_start, backend=backend)
    assert out[0, 3, 1].isnan().all(), "NaN in q became a number"
    nan_free = out[0].clone()
    nan_free[3, 1] = 0
    assert not nan_free.isnan().any()
    assert torch.equal(out[1], torch.zeros_like(out[1])), "rows with no visible key must be zeros"
    for scale in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be finite"):
            attention(q, k, v, scale=scale, backend=backend)
    k[0, 1, 0, 0] = float("nan")  # key 1 is visible from query 1 on
    out = attention(q, k, v, backend=backend)
    assert not out[0, 0, 0].isnan().any() and out[0, 1:, 0].isnan().all()


@pytest.mark.parametrize("backend, device", ALL_BACKENDS)
def test_decode_attention_nan_in_the_cache_propagates(backend, device):
    skip_unsupported(backend, device, DTYPE)
    q = torch.randn(2, 1, 2, 16, device=device)
    k_cache, v_cache = (torch.randn(2, 10, 2, 16, device=device) for _ in range(2))
    v_cache[0, 2, 1, 3] = float("nan")  # visible (length 5)
    v_cache[1, 8, 1, 3] = float("nan")  # past sequence 1's length: never read
    lens = torch.tensor([5, 5], dtype=torch.int32, device=device)
    out = decode_attention(q, k_cache, v_cache, lens, backend=backend)
    assert out[0, 0, 1, 3].isnan() and not out[1].isnan().any()


# ---- bfloat16 under the Triton interpreter ----------------------------------------------------------

def test_bfloat16_under_the_interpreter_is_routed_to_the_reference():
    if not triton_interpreter_enabled():
        pytest.skip("only under TRITON_INTERPRET=1")
    q, k, v = (torch.randn(1, 20, 2, 64, dtype=torch.bfloat16) for _ in range(3))
    assert choose_backend("attention", q.device, unsupported=kernel_limits(q)) == "torch"
    out = attention(q, k, v)
    want = attention(q.float(), k.float(), v.float())
    assert (out.float() - want).abs().max() < 0.05
    with pytest.raises(ValueError, match="backend 'triton' cannot run this call: Triton's interpreter"):
        attention(q, k, v, backend="triton")
    for op in (lambda: layer_norm(q, None, None, 1e-5, backend="triton"),
               lambda: bias_act(q, None, "relu", backend="triton")):
        with pytest.raises(ValueError, match="gets bfloat16 wrong"):
            op()
    assert torch.equal(layer_norm(q, None, None, 1e-5), layer_norm(q, None, None, 1e-5, backend="torch"))


# ---- the "torch" backend reads nothing back to the host ---------------------------------------------

def test_torch_backend_runs_on_fake_tensors():
    """Under FakeTensorMode a tensor has no values, so any host read (.item(), .tolist(), a Python branch
    on a tensor) raises: the torch backend's attention, decode attention (with the append), layer norm and
    bias + activation trace without one, so a decode step on them can be compiled or captured."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fusedgpt.ops.attention import _attention_torch
    from fusedgpt.ops.bias_act import _bias_act_torch
    from fusedgpt.ops.decode_attention import _decode_attention_torch
    from fusedgpt.ops.layer_norm import _layer_norm_torch

    with FakeTensorMode():
        q = torch.randn(2, 1, 4, 16)
        k_cache, v_cache = torch.randn(2, 32, 4, 16), torch.randn(2, 32, 4, 16)
        lens, kv_start = torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
        assert _decode_attention_torch(q, k_cache, v_cache, lens, q.clone(), q.clone(), 8, 0.25, kv_start).shape == q.shape
        prompt = torch.randn(2, 8, 4, 16)
        assert _attention_torch(prompt, prompt, prompt, True, 4, 0.25, kv_start).shape == prompt.shape
        x = torch.randn(3, 64)
        assert _layer_norm_torch(x, torch.ones(64), None, 1e-5, x.clone())[1].shape == x.shape
        assert _bias_act_torch(x, torch.zeros(64), "gelu_tanh").shape == x.shape
