"""fusedgpt.ops.kv_append: exact writes at the right slots and nothing else touched (NaN-poisoned
caches), strided caches, skipped out-of-range sequences, bad input, opcheck, torch.compile and
CUDA-graph capture with changing positions."""

import pytest
import torch
from utils import (ALL_BACKENDS, DEVICES, DTYPES, assert_equal_with_nan, expected_after_append,
                   skip_unsupported)

from fusedgpt.ops import kv_append, kv_append_reference
from fusedgpt.ops.kv_append import kv_append_torch


def _poisoned_cache(batch, max_len, heads, dim, dtype, device, layout="bshd"):
    """A NaN-filled cache [B, S_max, H, D]; layout "bhsd" is a [B, H, S, D] buffer viewed transposed."""
    if layout == "bhsd":
        return torch.full((batch, heads, max_len, dim), float("nan"), dtype=dtype, device=device).transpose(1, 2)
    return torch.full((batch, max_len, heads, dim), float("nan"), dtype=dtype, device=device)


def _append_unchecked(backend, *args):
    """The backend's op itself, without the public function's host check of CPU positions."""
    ops = {"torch": kv_append_torch, "triton": torch.ops.fusedgpt.kv_append_triton,
           "cuda": getattr(torch.ops.fusedgpt, "kv_append", None)}
    ops[backend](*args)


def _run(backend, device, dtype, batch, max_len, heads, dim, tokens, starts, layout="bshd", new_view=False,
         unchecked=False):
    k_cache = _poisoned_cache(batch, max_len, heads, dim, dtype, device, layout)
    v_cache = _poisoned_cache(batch, max_len, heads, dim, dtype, device, layout)
    if new_view:  # k, v as views into a fused [B, T, 3, H, D] projection output
        qkv = torch.randn(batch, tokens, 3, heads, dim, dtype=dtype, device=device)
        k, v = qkv[:, :, 1], qkv[:, :, 2]
    else:
        k = torch.randn(batch, tokens, heads, dim, dtype=dtype, device=device)
        v = torch.randn(batch, tokens, heads, dim, dtype=dtype, device=device)
    positions = torch.tensor(starts, dtype=torch.int32, device=device)
    expected_k, expected_v = expected_after_append(k_cache, k, positions), expected_after_append(v_cache, v, positions)
    if unchecked:
        _append_unchecked(backend, k_cache, v_cache, k, v, positions)
    else:
        kv_append(k_cache, v_cache, k, v, positions, backend=backend)
    assert_equal_with_nan(k_cache, expected_k)
    assert_equal_with_nan(v_cache, expected_v)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7])
def test_writes_exactly_the_new_slots(backend, device, dtype, tokens):
    skip_unsupported(backend, device, dtype)
    max_len = 40
    for batch, heads, dim in [(1, 1, 64), (3, 25, 80), (2, 12, 64), (2, 4, 128)]:
        starts = [(7 * b + 3) % (max_len - tokens + 1) for b in range(batch)]
        starts[-1] = max_len - tokens  # the last slots of the cache
        _run(backend, device, dtype, batch, max_len, heads, dim, tokens, starts)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_strided_caches_and_inputs(backend, device):
    skip_unsupported(backend, device, torch.float16)
    _run(backend, device, torch.float16, 3, 33, 5, 64, 4, [0, 10, 29], layout="bhsd", new_view=True)
    _run(backend, device, torch.float32, 2, 17, 3, 40, 2, [15, 0], layout="bhsd")  # D not a multiple of 8


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_out_of_range_device_positions_skip_the_whole_sequence(backend, device):
    """Sequences 1 and 2 would not fit: nothing of theirs is written; sequence 0 and 3 are. (CPU positions
    are checked on the host first, so on the CPU the backend's op is called directly.)"""
    skip_unsupported(backend, device, torch.float32)
    _run(backend, device, torch.float32, 4, 16, 2, 64, 4, [12, 13, -1, 0], unchecked=device == "cpu")
    if device == "cuda":
        _run(backend, device, torch.float32, 4, 16, 2, 64, 4, [12, 13, -1, 0], unchecked=True)


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_out_of_range_is_reported_when_known_on_the_host(backend, device):
    skip_unsupported(backend, device, torch.float32)
    k_cache = torch.randn(2, 16, 2, 64, device=device)
    v_cache = torch.randn(2, 16, 2, 64, device=device)
    k, v = torch.randn(2, 4, 2, 64, device=device), torch.randn(2, 4, 2, 64, device=device)
    before = k_cache.clone()
    with pytest.raises(ValueError, match=r"positions\[1\] = 13 out of range.*0 <= positions\[b\] <= 12"):
        kv_append(k_cache, v_cache, k, v, torch.tensor([0, 13], dtype=torch.int32), backend=backend)
    with pytest.raises(ValueError, match=r"positions\[0\] = -2 out of range"):
        kv_append(k_cache, v_cache, k, v, torch.tensor([-2, 0], dtype=torch.int32, device=device), check=True,
                  backend=backend)
    assert torch.equal(k_cache, before), "a rejected call wrote into the cache"


@pytest.mark.parametrize("call,error,match", [
    (lambda c, n, p: kv_append(c[0], c, n, n, p), ValueError, "k_cache must have rank 4"),
    (lambda c, n, p: kv_append(c, c.half(), n, n, p), TypeError, "v_cache must have the dtype of k_cache"),
    (lambda c, n, p: kv_append(c, c[:, :5], n, n, p), ValueError, "v_cache must have the shape of k_cache"),
    (lambda c, n, p: kv_append(c, c, n[:, :, :1], n[:, :, :1], p), ValueError, "k must have shape"),
    (lambda c, n, p: kv_append(c, c, n, n[:, :1], p), ValueError, "v must have the shape of k"),
    (lambda c, n, p: kv_append(c[:, :2], c[:, :2], n, n, p), ValueError, "the cache is too small"),
    (lambda c, n, p: kv_append(c, c, n, n, p.long()), TypeError, "positions must be int32"),
    (lambda c, n, p: kv_append(c, c, n, n, p[:1]), ValueError, r"positions must have shape \[2\]"),
    (lambda c, n, p: kv_append(c, c, n, n, p[None]), ValueError, "positions must have rank 1"),
    (lambda c, n, p: kv_append(c, c, n.transpose(2, 3), n.transpose(2, 3), p), ValueError,
     "k must have a contiguous last dimension"),
    (lambda c, n, p: kv_append(c.int(), c.int(), n.int(), n.int(), p), TypeError, "k_cache must be one of"),
    (lambda c, n, p: kv_append(c, c.clone(), n, n, p, backend="cuda"), ValueError, "needs CUDA tensors"),
])
def test_bad_input_is_named(call, error, match):
    cache, new = torch.randn(2, 8, 4, 16), torch.randn(2, 3, 4, 16)
    with pytest.raises(error, match=match):
        call(cache, new, torch.zeros(2, dtype=torch.int32))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_triton_op(device):
    skip_unsupported("triton", device, torch.float32)
    k_cache, v_cache = torch.randn(2, 8, 3, 32, device=device), torch.randn(2, 8, 3, 32, device=device)
    k, v = torch.randn(2, 2, 3, 32, device=device), torch.randn(2, 2, 3, 32, device=device)
    positions = torch.tensor([1, 6], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.fusedgpt.kv_append_triton.default, (k_cache, v_cache, k, v, positions))


@pytest.mark.gpu
def test_opcheck_cuda_op():
    k_cache, v_cache = torch.randn(2, 8, 3, 32, device="cuda"), torch.randn(2, 8, 3, 32, device="cuda")
    k, v = torch.randn(2, 2, 3, 32, device="cuda"), torch.randn(2, 2, 3, 32, device="cuda")
    positions = torch.tensor([1, 6], dtype=torch.int32, device="cuda")
    torch.library.opcheck(torch.ops.fusedgpt.kv_append.default, (k_cache, v_cache, k, v, positions))


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    skip_unsupported(backend, device, torch.float32)
    k_cache, v_cache = torch.zeros(2, 8, 3, 32, device=device), torch.zeros(2, 8, 3, 32, device=device)
    k, v = torch.randn(2, 1, 3, 32, device=device), torch.randn(2, 1, 3, 32, device=device)
    positions = torch.tensor([1, 6], dtype=torch.int32, device=device)

    def step(k, v, positions):
        kv_append(k_cache, v_cache, k * 2, v, positions, backend=backend)
        return k_cache.sum()

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    compiled(k, v, positions)
    torch.testing.assert_close(k_cache[0, 1], 2 * k[0, 0])
    torch.testing.assert_close(v_cache[1, 6], v[1, 0])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replay_with_new_positions(backend):
    """Captured once, replayed with positions changed in place: the same writes as eager calls."""
    batch, max_len, heads, dim, tokens = 3, 64, 4, 64, 2
    k_cache = torch.full((batch, max_len, heads, dim), float("nan"), dtype=torch.float16, device="cuda")
    v_cache = torch.full_like(k_cache, float("nan"))
    k = torch.randn(batch, tokens, heads, dim, dtype=torch.float16, device="cuda")
    v = torch.randn_like(k)
    positions = torch.zeros(batch, dtype=torch.int32, device="cuda")
    kv_append(k_cache, v_cache, k, v, positions, backend=backend)  # warm-up (compiles the kernel)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kv_append(k_cache, v_cache, k, v, positions, backend=backend)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for starts in ([5, 0, 62], [10, 40, 63], [20, 30, 7]):  # 63 does not fit: skipped
        new_k, new_v = torch.randn_like(k), torch.randn_like(v)
        k.copy_(new_k)
        v.copy_(new_v)
        positions.copy_(torch.tensor(starts, dtype=torch.int32))
        graph.replay()
        expected_k = expected_after_append(expected_k, new_k, torch.tensor(starts))
        expected_v = expected_after_append(expected_v, new_v, torch.tensor(starts))
    torch.cuda.synchronize()
    assert_equal_with_nan(k_cache, expected_k)
    assert_equal_with_nan(v_cache, expected_v)


def test_reference_matches_the_slot_by_slot_definition():
    cache = torch.randn(3, 10, 2, 8, dtype=torch.float64)
    new = torch.randn(3, 3, 2, 8, dtype=torch.float64)
    positions = torch.tensor([0, 8, 7], dtype=torch.int32)  # 8 + 3 > 10: skipped
    expected = expected_after_append(cache, new, positions)
    other = cache.clone()
    kv_append_reference(cache, other, new, new, positions)
    assert torch.equal(cache, expected) and torch.equal(other, expected)
