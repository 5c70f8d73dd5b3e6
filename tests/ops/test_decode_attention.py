"""fusedgpt.ops.decode_attention against the float64 reference: cache lengths at tile edges, several
new tokens, windows over long caches, padding, strided caches, forced key splits; the fused append
writes exactly the new slots (caches NaN-poisoned past each sequence's length, which must never be
read); bad input; opcheck; torch.compile; CUDA-graph capture replayed with new lengths (GPU)."""

import pytest
import torch
from utils import (ALL_BACKENDS, DEVICES, DTYPES, assert_equal_with_nan, assert_within_tolerance,
                   expected_after_append, poison_allocator, skip_unsupported)

from fusedgpt.ops import decode_attention, decode_attention_reference
from fusedgpt.ops.attention import attention_reference, visible_keys


def _caches(batch, max_len, heads, dim, dtype, device, lengths, layout="bshd"):
    """Random caches whose slots at and past each sequence's length are NaN (never to be read)."""
    shape = (batch, heads, max_len, dim) if layout == "bhsd" else (batch, max_len, heads, dim)
    caches = []
    for _ in range(2):
        cache = torch.randn(shape, dtype=dtype, device=device)
        cache = cache.transpose(1, 2) if layout == "bhsd" else cache  # (B, S_max, H, D) either way
        for b, length in enumerate(lengths):
            cache[b, max(length, 0):] = float("nan")
        caches.append(cache)
    return caches


def _plain_pytorch(q, k_cache, v_cache, lengths, k, v, window, scale, kv_start):
    """Plain PyTorch in q's dtype, sequence by sequence: the tolerance rule's baseline."""
    outs = []
    for b, length in enumerate(lengths):
        keys, values = k_cache[b:b + 1, :length], v_cache[b:b + 1, :length]
        if k is not None:
            keys, values = torch.cat([keys, k[b:b + 1]], 1), torch.cat([values, v[b:b + 1]], 1)
        start = None if kv_start is None else kv_start[b:b + 1]
        mask = visible_keys(q.shape[1], keys.shape[1], causal=True, window=window, kv_start=start, device=q.device)
        out = torch.nn.functional.scaled_dot_product_attention(
            q[b:b + 1].transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask, scale=scale)
        outs.append(torch.nan_to_num(out.transpose(1, 2), nan=0.0))
    return torch.cat(outs)


def _run(backend, device, dtype, batch, tokens, max_len, heads, dim, lengths, *, append=True, window=None,
         scale=None, kv_start=None, layout="bshd", num_splits=None):
    q = torch.randn(batch, tokens, heads, dim, dtype=dtype, device=device)
    k_cache, v_cache = _caches(batch, max_len, heads, dim, dtype, device, lengths, layout)
    k = torch.randn(batch, tokens, heads, dim, dtype=dtype, device=device) if append else None
    v = torch.randn(batch, tokens, heads, dim, dtype=dtype, device=device) if append else None
    cache_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    kv_start = None if kv_start is None else torch.tensor(kv_start, dtype=torch.int32, device=device)
    reference = decode_attention_reference(
        q.double(), k_cache.double(), v_cache.double(), cache_lens, k=None if k is None else k.double(),
        v=None if v is None else v.double(), window=window, scale=scale, kv_start=kv_start)
    effective_scale = dim ** -0.5 if scale is None else scale
    baseline = _plain_pytorch(q, k_cache, v_cache, lengths, k, v, window, effective_scale, kv_start)
    expected_k = expected_after_append(k_cache, k, cache_lens) if append else k_cache.clone()
    expected_v = expected_after_append(v_cache, v, cache_lens) if append else v_cache.clone()
    poison_allocator(device)
    out = decode_attention(q, k_cache, v_cache, cache_lens, k=k, v=v, window=window, scale=scale,
                           kv_start=kv_start, backend=backend, num_splits=num_splits)
    assert out.is_contiguous() and out.shape == q.shape
    assert_within_tolerance(out, reference, baseline, f"decode lengths={lengths} window={window}")
    assert_equal_with_nan(k_cache, expected_k)
    assert_equal_with_nan(v_cache, expected_v)


CPU_LENGTHS = [[0], [1], [255], [256], [257], [1000], [1024 - 4]]


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 4])
def test_matches_reference_across_cache_lengths(backend, device, dtype, tokens):
    skip_unsupported(backend, device, dtype)
    heads, dim = (2, 64) if device == "cpu" else (12, 64)
    for lengths in CPU_LENGTHS:
        _run(backend, device, dtype, 1, tokens, 1024, heads, dim, [min(n, 1024 - tokens) for n in lengths])
    _run(backend, device, dtype, 5, tokens, 1024, heads, 80, [0, 1, 255, 257, 1024 - tokens])


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_window_padding_scale_and_splits(backend, device, dtype):
    skip_unsupported(backend, device, dtype)
    # GPT-Neo local layer: 256-token window over a longer cache, unscaled scores.
    _run(backend, device, dtype, 2, 1, 1200, 2, 64, [1000, 300], window=256, scale=1.0)
    _run(backend, device, dtype, 1, 4, 600, 2, 128, [511], window=256, num_splits=3)
    # Left padding, including a sequence whose new query sees only itself.
    _run(backend, device, dtype, 3, 2, 128, 2, 64, [40, 60, 10], kv_start=[0, 30, 11])
    # Forced splits: more splits than tiles, and uneven shares.
    _run(backend, device, dtype, 2, 3, 300, 1, 96, [200, 7], num_splits=7)
    _run(backend, device, dtype, 2, 1, 300, 1, 64, [299, 0], num_splits=1)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_without_append_and_with_strided_caches(backend, device):
    skip_unsupported(backend, device, torch.float16)
    _run(backend, device, torch.float16, 2, 3, 200, 3, 64, [150, 3], append=False)
    _run(backend, device, torch.float16, 2, 2, 200, 3, 64, [150, 60], layout="bhsd", num_splits=2)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_new_tokens_that_do_not_fit_are_attended_but_not_written(backend, device):
    """A sequence whose new tokens overhang S_max still attends to them but writes nothing. Device lengths
    are not checked on the host (CPU ones are: next test), so on the CPU the kernel's custom op, or the
    reference itself for the torch backend, is called directly; both are compared with an independent
    float64 computation (the prefill reference over the cached keys followed by the new ones) and with the
    cache built slot by slot."""
    skip_unsupported(backend, device, torch.float32)
    lengths = [126, 10]  # 126 + 4 > 128: not written, still attended to
    if device == "cuda":
        _run(backend, device, torch.float32, 2, 4, 128, 2, 64, lengths)
        return
    q = torch.randn(2, 4, 2, 64)
    k_cache, v_cache = _caches(2, 128, 2, 64, torch.float32, "cpu", lengths)
    k, v = torch.randn(2, 4, 2, 64), torch.randn(2, 4, 2, 64)
    cache_lens = torch.tensor(lengths, dtype=torch.int32)
    expected_k = expected_after_append(k_cache, k, cache_lens)
    expected_v = expected_after_append(v_cache, v, cache_lens)
    keys = [torch.cat([k_cache[b:b + 1, :n], k[b:b + 1]], dim=1).double() for b, n in enumerate(lengths)]
    values = [torch.cat([v_cache[b:b + 1, :n], v[b:b + 1]], dim=1).double() for b, n in enumerate(lengths)]
    expected = torch.cat([attention_reference(q[b:b + 1].double(), keys[b], values[b], scale=0.125) for b in range(2)])
    if backend == "torch":
        out = decode_attention_reference(q, k_cache, v_cache, cache_lens, k=k, v=v, scale=0.125)
    else:
        out = torch.ops.fusedgpt.decode_attention_triton(q, k_cache, v_cache, cache_lens, k, v, None, 0.125, None,
                                                         None)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    assert_equal_with_nan(k_cache, expected_k)
    assert_equal_with_nan(v_cache, expected_v)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_absurd_device_lengths_never_write_out_of_bounds(backend, device):
    """cache_lens negative, near the int32 limits or far past S_max (corrupted lengths): clamped to
    [0, S_max] for reading as the reference does, so nothing is written (not even at slot 0 for a
    negative length), nothing is read past the cache, no loop runs over a billion keys, and the result
    matches the reference."""
    skip_unsupported(backend, device, torch.float32)
    if backend == "torch":
        pytest.skip("the reference reads lengths on the host and slices: it cannot go out of bounds")
    q = torch.randn(4, 4, 2, 64, device=device)
    k_cache, v_cache = torch.randn(4, 32, 2, 64, device=device), torch.randn(4, 32, 2, 64, device=device)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    cache_lens = torch.tensor([-1, -2**31, 2**31 - 2, 10**9], dtype=torch.int32, device=device)
    ops = {"triton": torch.ops.fusedgpt.decode_attention_triton, "cuda": getattr(torch.ops.fusedgpt, "decode_attention", None)}
    args = (q, k_cache, v_cache, cache_lens, q.clone(), q.clone(), None, 0.125, None)
    out = ops[backend](*args, None) if backend == "triton" else ops[backend](*args, 2)
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)
    reference = decode_attention_reference(q.double(), k_cache.double(), v_cache.double(), cache_lens,
                                           k=q.double(), v=q.double(), scale=0.125)
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_out_of_range_lengths_are_reported_when_known_on_the_host(backend, device):
    skip_unsupported(backend, device, torch.float32)
    q = torch.randn(2, 2, 2, 64, device=device)
    k_cache, v_cache = torch.randn(2, 16, 2, 64, device=device), torch.randn(2, 16, 2, 64, device=device)
    before = k_cache.clone()
    with pytest.raises(ValueError, match=r"cache_lens\[1\] = 15 out of range: appending 2 tokens"):
        decode_attention(q, k_cache, v_cache, torch.tensor([0, 15], dtype=torch.int32), k=q, v=q, backend=backend)
    with pytest.raises(ValueError, match=r"cache_lens\[0\] = -1 out of range"):
        decode_attention(q, k_cache, v_cache, torch.tensor([-1, 0], dtype=torch.int32, device=device), check=True,
                         backend=backend)
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("call,error,match", [
    (lambda q, c, n: decode_attention(q, c, c, n, k=q), ValueError, "give both k and v"),
    (lambda q, c, n: decode_attention(q[0], c, c, n), ValueError, "q must have rank 4"),
    (lambda q, c, n: decode_attention(q, c.half(), c, n), TypeError, "k_cache must have the dtype of q"),
    (lambda q, c, n: decode_attention(q, c, c[:, :3], n), ValueError, "v_cache must have the shape of k_cache"),
    (lambda q, c, n: decode_attention(q, c[:, :, :1], c[:, :, :1], n), ValueError, r"k_cache must have shape"),
    (lambda q, c, n: decode_attention(q.repeat(1, 9, 1, 1), c, c, n), ValueError, "1 to 16 tokens"),
    (lambda q, c, n: decode_attention(q, c[:, :1], c[:, :1], n, k=q, v=q), ValueError, "the cache is too small"),
    (lambda q, c, n: decode_attention(q, c, c, n.long()), TypeError, "cache_lens must be int32"),
    (lambda q, c, n: decode_attention(q, c, c, n[:1]), ValueError, r"cache_lens must have shape \[2\]"),
    (lambda q, c, n: decode_attention(q, c, c, n, kv_start=n.float()), TypeError, "kv_start must be int32"),
    (lambda q, c, n: decode_attention(q, c, c, n, window=0), ValueError, "window must be a positive int"),
    (lambda q, c, n: decode_attention(q, c, c, n, k=q[:, :1], v=q[:, :1]), ValueError, "k must have the shape of q"),
    (lambda q, c, n: decode_attention(q, c, c, n, backend="cuda"), ValueError, "cannot run this call"),
    (lambda q, c, n: decode_attention(q, c, c, n, backend="triton", num_splits=0), ValueError, "num_splits"),
])
def test_bad_input_is_named(call, error, match):
    q, cache = torch.randn(2, 2, 3, 16), torch.randn(2, 8, 3, 16)
    with pytest.raises(error, match=match):
        call(q, cache, torch.tensor([1, 2], dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_triton_op(device):
    skip_unsupported("triton", device, torch.float32)
    q = torch.randn(2, 2, 2, 32, device=device)
    k_cache, v_cache = torch.randn(2, 40, 2, 32, device=device), torch.randn(2, 40, 2, 32, device=device)
    cache_lens = torch.tensor([5, 30], dtype=torch.int32, device=device)
    kv_start = torch.tensor([0, 3], dtype=torch.int32, device=device)
    op = torch.ops.fusedgpt.decode_attention_triton.default
    torch.library.opcheck(op, (q, k_cache, v_cache, cache_lens, q.clone(), q.clone(), 16, 0.5, kv_start, 2))
    torch.library.opcheck(op, (q, k_cache, v_cache, cache_lens, None, None, None, 0.25, None, None))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    """Traced whole: no host read on any backend (the torch path's visibility is computed on the device,
    and the host check of CPU lengths is skipped while tracing)."""
    skip_unsupported(backend, device, torch.float32)
    q = torch.randn(2, 1, 2, 32, device=device)
    k_cache, v_cache = torch.randn(2, 40, 2, 32, device=device), torch.randn(2, 40, 2, 32, device=device)
    cache_lens = torch.tensor([5, 30], dtype=torch.int32, device=device)

    def step(q, k, v):
        return decode_attention(q * 2, k_cache, v_cache, cache_lens, k=k, v=v, backend=backend) + 1

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    k, v = torch.randn_like(q), torch.randn_like(q)
    expected = step(q, k, v)
    torch.testing.assert_close(compiled(q, k, v), expected)


@pytest.mark.gpu
def test_opcheck_cuda_op():
    q = torch.randn(2, 2, 2, 64, device="cuda", dtype=torch.float16)
    k_cache, v_cache = (torch.randn(2, 40, 2, 64, device="cuda", dtype=torch.float16) for _ in range(2))
    cache_lens = torch.tensor([5, 30], dtype=torch.int32, device="cuda")
    op = torch.ops.fusedgpt.decode_attention.default
    torch.library.opcheck(op, (q, k_cache, v_cache, cache_lens, q.clone(), q.clone(), 16, 0.5, None, 2))
    torch.library.opcheck(op, (q, k_cache, v_cache, cache_lens, None, None, None, 0.25, cache_lens // 2, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replay_with_new_lengths(backend):
    """One captured decode step replayed over several steps with cache_lens advanced on the device gives
    the same outputs and caches as eager calls."""
    batch, max_len, heads, dim = 3, 512, 8, 64
    eager_caches = [torch.randn(batch, max_len, heads, dim, dtype=torch.float16, device="cuda") for _ in range(2)]
    graph_caches = [c.clone() for c in eager_caches]
    q, k, v = (torch.randn(batch, 1, heads, dim, dtype=torch.float16, device="cuda") for _ in range(3))
    lengths = torch.tensor([10, 200, 400], dtype=torch.int32, device="cuda")
    static_lengths = lengths.clone()
    decode_attention(q, *graph_caches, static_lengths, k=k, v=v, backend=backend)  # compile outside capture
    graph_caches = [c.copy_(e) for c, e in zip(graph_caches, eager_caches)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = decode_attention(q, *graph_caches, static_lengths, k=k, v=v, backend=backend)
    for _ in range(5):
        for tensor in (q, k, v):
            tensor.copy_(torch.randn_like(tensor))
        expected = decode_attention(q, *eager_caches, lengths, k=k, v=v, backend=backend)
        static_lengths.copy_(lengths)
        graph.replay()
        torch.testing.assert_close(static_out, expected, rtol=0, atol=0)
        lengths += 1
    for graph_cache, eager_cache in zip(graph_caches, eager_caches):
        torch.testing.assert_close(graph_cache, eager_cache, rtol=0, atol=0)
