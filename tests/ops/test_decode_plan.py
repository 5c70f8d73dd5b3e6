"""decode_attention_plan / DecodeAttentionPlan.run (the checks, decision and index work of a decode step
made once and run by every layer) and the torch path's two visibilities: the sync-free one (lengths
known only on the device) and the one of lengths read on the host (equal lengths: the new tokens
written first, the cache read in place). Every case against the float64 reference, with the slots
past each sequence's length NaN- or inf-poisoned (never to be read) and the caches compared slot by slot."""

import importlib

import pytest
import torch
from utils import assert_equal_with_nan, expected_after_append

from fusedgpt.ops import DecodeAttentionPlan, decode_attention, decode_attention_plan, decode_attention_reference

module = importlib.import_module("fusedgpt.ops.decode_attention")


def _poisoned_caches(batch, max_len, heads, dim, lengths, *, strided=False, dtype=torch.float64):
    caches = []
    for poison in (float("nan"), float("inf")):
        shape = (batch, heads, max_len, dim) if strided else (batch, max_len, heads, dim)
        cache = torch.randn(shape, dtype=dtype)
        cache = cache.transpose(1, 2) if strided else cache  # (B, S_max, H, D) either way
        for b, length in enumerate(lengths):
            cache[b, max(length, 0):] = poison
        caches.append(cache)
    return caches


def _expected(q, k_cache, v_cache, cache_lens, k, v, window, scale, kv_start):
    k_after, v_after = k_cache.clone(), v_cache.clone()
    out = decode_attention_reference(q, k_after, v_after, cache_lens, k=k, v=v, window=window, scale=scale,
                                     kv_start=kv_start)
    return out, k_after, v_after


def test_sync_free_path_matches_the_reference_on_random_cases():
    """The path that reads nothing on the host (what a CUDA tensor on the torch backend, a captured or a
    traced step gets; on the CPU the public op reads its lengths, so it is called directly here): random
    batches, lengths from negative to past S_max, windows, padding, several new tokens, with and without
    the append, strided caches."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(150):
        def draw(low, high):
            return int(torch.randint(low, high, (), generator=generator))
        batch, max_len = draw(1, 4), draw(1, 24)
        tokens, heads, dim = draw(1, min(max_len, 5) + 1), draw(1, 3), 8
        lengths = [draw(-2, max_len + 3) for _ in range(batch)]
        appending = trial % 3 != 0
        window = [None, 1, 3, 7][trial % 4]
        kv_start = torch.tensor([draw(0, max_len + 3) for _ in range(batch)], dtype=torch.int32) if trial % 2 else None
        k_cache, v_cache = _poisoned_caches(batch, max_len, heads, dim, lengths, strided=trial % 5 == 0)
        q = torch.randn(batch, tokens, heads, dim, dtype=torch.float64)
        k = torch.randn_like(q) if appending else None
        v = torch.randn_like(q) if appending else None
        cache_lens = torch.tensor(lengths, dtype=torch.int32)
        expected, k_after, v_after = _expected(q, k_cache, v_cache, cache_lens, k, v, window, 0.3, kv_start)
        out = module._decode_attention_torch(q, k_cache, v_cache, cache_lens, k, v, window, 0.3, kv_start)
        what = f"trial {trial}: lengths {lengths}, T {tokens}, window {window}, kv_start {kv_start}"
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12, msg=what)
        assert_equal_with_nan(k_cache, k_after)
        assert_equal_with_nan(v_cache, v_after)


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("tokens,window,starts", [
    (1, None, None), (1, None, [0, 0]), (1, 5, None), (3, None, None), (2, 4, [0, 3]),
    (1, None, [30, 2]),  # padding past the first sequence's length: its query sees nothing (zeros)
    (2, None, [21, 0]),  # ... sees only the second new token
])
def test_host_lengths_of_one_length_write_first_and_read_in_place(strided, tokens, window, starts):
    """CPU lengths are read on the host (to check them); when every sequence has the same length the
    new tokens go straight into the cache and the keys are its first L + T slots: the same outputs and
    caches as the reference, padding (kv_start) and windows applied, slots past L + T never read."""
    length, max_len = 20, 32
    k_cache, v_cache = _poisoned_caches(2, max_len, 2, 8, [length, length], strided=strided)
    q = torch.randn(2, tokens, 2, 8, dtype=torch.float64)
    k, v = torch.randn_like(q), torch.randn_like(q)
    cache_lens = torch.tensor([length, length], dtype=torch.int32)
    kv_start = None if starts is None else torch.tensor(starts, dtype=torch.int32)
    plan = decode_attention_plan(q, k_cache, v_cache, cache_lens, k=k, v=v, window=window, kv_start=kv_start)
    assert plan.backend == "torch" and plan.visibility.length == length and plan.visibility.rows is None
    expected, k_after, v_after = _expected(q, k_cache, v_cache, cache_lens, k, v, window, None, kv_start)
    assert_equal_with_nan(k_after, expected_after_append(k_cache, k, cache_lens))  # slot by slot
    out = plan.run(q, k_cache, v_cache, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert_equal_with_nan(k_cache, k_after)
    assert_equal_with_nan(v_cache, v_after)


def test_host_lengths_that_differ_bound_the_slots_read():
    """Different CPU lengths: the sync-free visibility over only the first max(lengths) slots (the rest
    are unfilled in every sequence), the same result as the reference."""
    k_cache, v_cache = _poisoned_caches(3, 64, 2, 8, [5, 17, 0])
    q = torch.randn(3, 2, 2, 8, dtype=torch.float64)
    k, v = torch.randn_like(q), torch.randn_like(q)
    cache_lens = torch.tensor([5, 17, 0], dtype=torch.int32)
    kv_start = torch.tensor([1, 0, 0], dtype=torch.int32)
    plan = decode_attention_plan(q, k_cache, v_cache, cache_lens, k=k, v=v, window=6, kv_start=kv_start)
    assert plan.visibility.length is None and plan.visibility.slots == 17
    expected, k_after, v_after = _expected(q, k_cache, v_cache, cache_lens, k, v, 6, None, kv_start)
    torch.testing.assert_close(plan.run(q, k_cache, v_cache, k, v), expected, rtol=1e-12, atol=1e-12)
    assert_equal_with_nan(k_cache, k_after)
    assert_equal_with_nan(v_cache, v_after)


@pytest.mark.parametrize("window", [None, 3])
def test_one_plan_serves_every_layer_of_a_step(window):
    """A plan made from layer 0's call runs layers 1 and 2 (their own caches, projections and scales) as
    decode_attention runs each on its own; the lengths are not advanced in between, as in a model."""
    batch, max_len, heads, dim = 2, 16, 2, 8
    cache_lens = torch.tensor([9, 9], dtype=torch.int32)
    kv_start = torch.tensor([0, 2], dtype=torch.int32)
    layers = []
    for _ in range(3):
        caches = _poisoned_caches(batch, max_len, heads, dim, [9, 9], dtype=torch.float32)
        qkv = torch.randn(batch, 1, 3, heads, dim)  # q, k, v as strided views of one projection
        layers.append((caches, qkv.unbind(2)))
    plan = None
    for layer, ((k_cache, v_cache), (q, k, v)) in enumerate(layers):
        scale = 1.0 / (layer + 1)
        expected_k, expected_v = k_cache.clone(), v_cache.clone()
        expected = decode_attention(q, expected_k, expected_v, cache_lens, k=k, v=v, window=window, scale=scale,
                                    kv_start=kv_start)
        if plan is None:
            plan = decode_attention_plan(q, k_cache, v_cache, cache_lens, k=k, v=v, window=window,
                                         kv_start=kv_start)
            assert isinstance(plan, DecodeAttentionPlan)
        torch.testing.assert_close(plan.run(q, k_cache, v_cache, k, v, scale=scale), expected, rtol=0, atol=0)
        assert_equal_with_nan(k_cache, expected_k)
        assert_equal_with_nan(v_cache, expected_v)


def test_a_run_with_another_layout_or_overlapping_tensors_is_refused():
    k_cache, v_cache = _poisoned_caches(1, 16, 2, 8, [4], dtype=torch.float32)
    qkv = torch.randn(1, 1, 3, 2, 8)
    q, k, v = qkv.unbind(2)
    cache_lens = torch.tensor([4], dtype=torch.int32)
    plan = decode_attention_plan(q, k_cache, v_cache, cache_lens, k=k, v=v)
    with pytest.raises(ValueError, match="q does not have the planned layout"):
        plan.run(torch.randn(1, 1, 2, 8), k_cache, v_cache, k, v)  # other strides
    with pytest.raises(ValueError, match="k_cache does not have the planned layout"):
        plan.run(q, k_cache.double(), v_cache, k, v)
    with pytest.raises(ValueError, match="v_cache does not have the planned layout"):
        plan.run(q, k_cache, v_cache[:, :8], k, v)
    with pytest.raises(ValueError, match="k does not have the planned layout"):
        plan.run(q, k_cache, v_cache, None, v)
    with pytest.raises(TypeError, match="scale must be a number"):
        plan.run(q, k_cache, v_cache, k, v, scale="0.5")
    # a v of the planned layout that is a view of v_cache's memory
    rows = torch.randn(1, 17, 2, 8)
    v_cache_view, v_inside = rows[:, :16], rows[:, 15:16]
    single = torch.randn(1, 17, 2, 8)[:, 16:17]  # the same layout, its own memory
    plan = decode_attention_plan(single, k_cache.clone(), v_cache_view, cache_lens, k=single.clone(), v=single.clone())
    with pytest.raises(ValueError, match="v shares memory with v_cache"):
        plan.run(single, k_cache.clone(), v_cache_view, single.clone(), v_inside)
    # the plan's own checks are decode_attention's
    with pytest.raises(ValueError, match=r"cache_lens\[0\] = 16 out of range"):
        decode_attention_plan(q, k_cache, v_cache, torch.tensor([16], dtype=torch.int32), k=k, v=v)


def test_the_plan_follows_the_decision():
    """Autograd gets the reference, an explicit backend is honoured (and checked), as in decode_attention."""
    k_cache, v_cache = _poisoned_caches(1, 16, 2, 8, [4], dtype=torch.float32)
    q, k, v = torch.randn(3, 1, 1, 2, 8).unbind(0)
    cache_lens = torch.tensor([4], dtype=torch.int32)
    assert decode_attention_plan(q, k_cache, v_cache, cache_lens, k=k, v=v, backend="torch").backend == "torch"
    with torch.enable_grad():
        q_grad = q.clone().requires_grad_()
        plan = decode_attention_plan(q_grad, k_cache, v_cache, cache_lens, k=k, v=v)
        assert plan.backend == "reference" and plan.visibility is None
        out = plan.run(q_grad, k_cache.clone(), v_cache.clone(), k, v)
        out.sum().backward()
        assert q_grad.grad is not None and torch.isfinite(q_grad.grad).all()
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this call"):
        decode_attention_plan(q, k_cache, v_cache, cache_lens, k=k, v=v, backend="cuda")
