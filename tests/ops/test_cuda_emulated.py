"""The CUDA kernels of csrc/, executed on the CPU by the SIMT emulator (tests/simt), against the float64
references with the tolerance rule: every thread of every block runs the kernel code as written, with
its shared memory, barriers, shuffles and mma fragment layouts, and its host function's checks and
launch set-up. No GPU exists in CI, so this is where the CUDA sources are executed there; the `gpu`
tests (and compute-sanitizer, bench/run_gpu.sh) remain the word on real hardware. bfloat16 runs here
too: the emulator converts with round-to-nearest-even and multiplies in float64."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_attention import _plain_pytorch as attention_baseline
from test_bias_act import _plain_pytorch as bias_act_baseline
from test_decode_attention import _caches
from test_decode_attention import _plain_pytorch as decode_baseline
from test_layer_norm import _inputs as layer_norm_inputs
from test_layer_norm import _plain_pytorch as layer_norm_baseline
from utils import assert_equal_with_nan, assert_within_tolerance, expected_after_append

from fusedgpt.ops import (attention_reference, bias_act_reference, decode_attention_reference,
                          layer_norm_reference)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "simt"))
import simt_emulator  # noqa: E402

HALF_TYPES = [torch.float16, torch.bfloat16]
ALL_TYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def emulated():
    return simt_emulator.ops()  # compiled once per checkout and torch version (cached under build/simt)


# ---- the emulator itself ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_emulated_mma_is_a_matrix_product(emulated, dtype):
    a, b = torch.randn(16, 16).to(dtype), torch.randn(8, 16).to(dtype)
    accumulator = torch.tensor([[1.0, 2.0] * 4] * 8 + [[3.0, 4.0] * 4] * 8, dtype=torch.float64)
    expected = a.double() @ b.double().T + accumulator
    torch.testing.assert_close(emulated.selftest_mma(a, b).double(), expected, rtol=0, atol=1e-5)


def test_emulated_shuffles_and_shared_memory(emulated):
    x = torch.randn(96)
    for offset in (1, 6, 17):
        lanes = torch.arange(96)
        neighbour = x[(lanes // 32) * 32 + ((lanes % 32) ^ offset)]
        torch.testing.assert_close(emulated.selftest_shuffle(x, offset), x.sum() + 1000 * neighbour)



@pytest.mark.parametrize("transpose", [False, True])
def test_emulated_ldmatrix_gives_the_ptx_fragments(emulated, transpose):
    """Registers against the PTX ISA's ldmatrix layout, computed here from a matrix of distinct values
    whose rows the lanes address in a random order (so each lane's address, not its index, decides)."""
    rows = torch.randperm(2 ** 15)[:256].to(torch.int16).reshape(32, 8)
    order = torch.randperm(32).to(torch.int32)
    out = emulated.selftest_ldmatrix(rows, order, transpose).long() & 0xFFFFFFFF
    matrices = rows.long()[order.long()].reshape(4, 8, 8) & 0xFFFF  # matrix i: the rows lanes 8i.. give
    for lane in range(32):
        outer, inner = lane // 4, 2 * (lane % 4)
        for i in range(4):
            m = matrices[i].T if transpose else matrices[i]
            expected = int(m[outer, inner]) | int(m[outer, inner + 1]) << 16
            assert int(out[lane, i]) == expected, (lane, i)


def test_emulated_cp_async_lands_only_at_its_wait(emulated):
    threads, shared_bytes = 64, 64 * 32 + 48
    source = torch.randint(0, 255, (threads * 32,), dtype=torch.uint8)
    fill = torch.full((shared_bytes - source.numel(),), 0xFF, dtype=torch.uint8)
    landed = emulated.selftest_cp_async(source, 0, shared_bytes, False)
    assert torch.equal(landed, torch.cat([source, fill]))  # and the rest of the buffer starts as 0xff
    stale = emulated.selftest_cp_async(source, 1, shared_bytes, False)  # a barrier is not a wait
    assert torch.equal(stale, torch.full_like(stale, 0xFF))
    chunks = source.reshape(threads, 2, 16)
    first_only = emulated.selftest_cp_async(source, 2, shared_bytes, False)[: source.numel()].reshape(threads, 2, 16)
    assert torch.equal(first_only[:, 0], chunks[:, 0]) and bool((first_only[:, 1] == 0xFF).all())
    zero_filled = emulated.selftest_cp_async(source, 3, shared_bytes, False)[: source.numel()].reshape(threads, 2, 16)
    assert torch.equal(zero_filled[:, 0], chunks[:, 0]) and not zero_filled[:, 1].any()
    with pytest.raises(RuntimeError, match="exited with cp.async copies"):
        emulated.selftest_cp_async(source, 4, shared_bytes, False)


def test_emulated_dynamic_shared_memory_above_48_kb_needs_the_attribute(emulated):
    source = torch.randint(0, 255, (64 * 32,), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="cudaFuncSetAttribute"):
        emulated.selftest_cp_async(source, 0, 64 * 1024, False)
    out = emulated.selftest_cp_async(source, 0, 64 * 1024, True)
    assert torch.equal(out[: source.numel()], source) and bool((out[source.numel():] == 0xFF).all())
    with pytest.raises(RuntimeError, match="dynamic shared memory"):
        emulated.selftest_cp_async(source, 0, 228 * 1024, False)


def test_emulated_ex2_flushes_subnormals(emulated):
    x = torch.cat([torch.randn(200) * 20, torch.tensor([0.0, -0.0, 1.0, -126.0, -126.5, -149.0, -200.0, 127.9,
                                                        float("-inf"), float("inf"), 1e-40, float("nan")])])
    out = emulated.selftest_ex2(x)
    expected = torch.exp2(x.double())
    expected[expected.abs() < 2.0 ** -126] = 0.0  # results below the normal range flush to zero
    torch.testing.assert_close(out.double(), expected, rtol=2 ** -22, atol=0, equal_nan=True)
    assert out[-2] == 1.0  # a subnormal input counts as zero


def test_emulated_device_answers_occupancy_queries(emulated):
    """4 multiprocessors (FUSEDGPT_SIMT_MULTIPROCESSORS), each holding sm_90's 2048 threads, 32 blocks
    and 228 KB of shared memory (1 KB reserved per block): what the CUDA decode sizes its splits by."""
    assert emulated.selftest_occupancy(128, 0) == [4, 16]
    assert emulated.selftest_occupancy(1024, 0) == [4, 2]
    assert emulated.selftest_occupancy(32, 0) == [4, 32]
    assert emulated.selftest_occupancy(128, 100 * 1024) == [4, 2]

@pytest.mark.parametrize("which,match", [
    (0, "deadlock"), (1, "a lane exited while .* wait in __shfl_xor_sync"),
    (2, r"divergent warp collective: this lane is in __shfl_xor_sync\([12]\) while others are in"), (4, None)])
def test_emulator_reports_broken_kernels(emulated, which, match):
    if match is None:
        emulated.selftest_broken(which)  # lanes that exit before no collective are fine
    else:
        with pytest.raises(RuntimeError, match=match):
            emulated.selftest_broken(which)


# ---- prefill attention (csrc/attention) --------------------------------------------------------------

def _attention(emulated, q, k, v, *, causal=True, window=None, scale=None, kv_start=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    inputs = [t.clone() for t in (q, k, v)]
    out = emulated.attention(q, k, v, causal, window, scale, kv_start)
    reference = attention_reference(q.double(), k.double(), v.double(), causal=causal, window=window, scale=scale,
                                    kv_start=kv_start)
    baseline = attention_baseline(q, k, v, causal, window, scale, kv_start)
    assert out.is_contiguous() and out.shape == q.shape
    assert_within_tolerance(out, reference, baseline, f"emulated attention window={window} kv_start={kv_start}")
    assert all(torch.equal(a, b) for a, b in zip(inputs, (q, k, v))), "inputs were modified"
    return out


def _qkv(batch, q_len, kv_len, heads, dim, dtype):
    make = lambda s: torch.randn(batch, s, heads, dim, dtype=dtype)  # noqa: E731
    return make(q_len), make(kv_len), make(kv_len)


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_attention_causal_head_dims_and_shorter_queries(emulated, dtype):
    for case in [(1, 1, 1, 2, 64), (2, 7, 7, 3, 64), (1, 7, 40, 2, 80), (1, 57, 57, 2, 96), (1, 33, 70, 1, 128),
                 (1, 130, 130, 25, 64), (2, 65, 200, 2, 128)]:
        _attention(emulated, *_qkv(*case, dtype))


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_attention_full_scale_and_windows(emulated, dtype):
    _attention(emulated, *_qkv(2, 19, 45, 3, 64, dtype), causal=False)
    _attention(emulated, *_qkv(1, 100, 100, 2, 64, dtype), scale=1.0)  # GPT-Neo: unscaled, large logits
    for batch, q_len, kv_len, heads, dim, window in [(1, 50, 50, 2, 64, 1), (1, 50, 50, 2, 64, 7),
                                                     (1, 20, 60, 1, 64, 16), (1, 30, 30, 1, 80, 100),
                                                     (1, 300, 300, 1, 64, 256), (1, 130, 400, 1, 128, 64)]:
        _attention(emulated, *_qkv(batch, q_len, kv_len, heads, dim, dtype), window=window, scale=1.0)


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_attention_left_padding_with_all_padding_rows(emulated, dtype):
    q, k, v = _qkv(3, 70, 70, 2, 64, dtype)
    kv_start = torch.tensor([0, 20, 70], dtype=torch.int32)
    out = _attention(emulated, q, k, v, kv_start=kv_start)
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.equal(out[1, :20], torch.zeros_like(out[1, :20]))
    _attention(emulated, q, k, v, kv_start=kv_start, window=5)
    _attention(emulated, *_qkv(3, 5, 70, 2, 64, dtype), kv_start=kv_start)



@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_attention_negative_and_zero_scales(emulated, dtype):
    """The kernel folds the scale into the exponent from the row max of raw scores, which needs a positive
    factor: a negative scale runs on negated Q, and 0 on the smallest normal float (uniform weights)."""
    q, k, v = _qkv(2, 70, 90, 2, 64, dtype)
    _attention(emulated, q, k, v, scale=-0.3)
    _attention(emulated, q, k, v, scale=-1.0, window=20, kv_start=torch.tensor([0, 33], dtype=torch.int32))
    out = _attention(emulated, q, k, v, scale=0.0)
    visible = (torch.arange(90) <= torch.arange(70)[:, None] + 20).double()  # queries at positions 20 .. 89
    uniform = torch.einsum("ij,bjhd->bihd", visible / visible.sum(-1, keepdim=True), v.double())  # (B, 70, H, D)
    torch.testing.assert_close(out.double(), uniform, rtol=0, atol=2e-2)
    _attention(emulated, *_qkv(1, 40, 40, 1, 128, dtype), scale=-0.05)  # Q re-read from shared memory
    _attention(emulated, *_qkv(1, 40, 50, 1, 80, dtype), scale=-0.1)  # padded-slot copies


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_attention_several_query_blocks_and_key_tiles(emulated, dtype):
    """More than one 128-row query block (run last-first when causal) and many key tiles, at the head dims
    whose tiles differ (64 keys with Q in registers, 64 keys with Q from shared memory, 32 keys)."""
    for case in [(1, 257, 300, 1, 64), (1, 200, 261, 1, 80), (1, 129, 129, 1, 96), (1, 140, 333, 1, 128)]:
        _attention(emulated, *_qkv(*case, dtype))
    _attention(emulated, *_qkv(1, 150, 150, 1, 96, dtype), causal=False)


def test_attention_strided_views(emulated):
    qkv = torch.randn(2, 37, 3, 3, 64, dtype=torch.float16)  # fused projection output [B, S, 3, H, D]
    _attention(emulated, *qkv.unbind(2))
    q, k, v = (torch.randn(2, 3, 37, 64, dtype=torch.float16).transpose(1, 2) for _ in range(3))  # [B, H, S, D]
    _attention(emulated, q, k, v, window=9)


# ---- decode attention with the fused append (csrc/decode_attention) ----------------------------------

def _decode(emulated, dtype, batch, tokens, max_len, heads, dim, lengths, *, append=True, window=None, scale=None,
            kv_start=None, layout="bshd", splits=(0, 1, 3)):
    q = torch.randn(batch, tokens, heads, dim, dtype=dtype)
    k_cache, v_cache = _caches(batch, max_len, heads, dim, dtype, "cpu", lengths, layout)
    k, v = (torch.randn(batch, tokens, heads, dim, dtype=dtype) for _ in range(2)) if append else (None, None)
    cache_lens = torch.tensor(lengths, dtype=torch.int32)
    kv_start = None if kv_start is None else torch.tensor(kv_start, dtype=torch.int32)
    reference = decode_attention_reference(
        q.double(), k_cache.double(), v_cache.double(), cache_lens, k=None if k is None else k.double(),
        v=None if v is None else v.double(), window=window, scale=scale, kv_start=kv_start)
    scale = dim ** -0.5 if scale is None else scale
    baseline = decode_baseline(q, k_cache, v_cache, lengths, k, v, window, scale, kv_start)
    expected_k = expected_after_append(k_cache, k, cache_lens) if append else k_cache.clone()
    expected_v = expected_after_append(v_cache, v, cache_lens) if append else v_cache.clone()
    for num_splits in splits:  # appending twice writes the same values to the same slots
        out = emulated.decode_attention(q, k_cache, v_cache, cache_lens, k, v, window, scale, kv_start, num_splits)
        assert out.is_contiguous() and out.shape == q.shape
        assert_within_tolerance(out, reference, baseline, f"emulated decode lengths={lengths} splits={num_splits}")
        assert_equal_with_nan(k_cache, expected_k)
        assert_equal_with_nan(v_cache, expected_v)


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("tokens", [1, 4])
def test_decode_across_cache_lengths(emulated, dtype, tokens):
    for length in [0, 1, 255, 256, 257, 1000, 1024 - tokens]:
        _decode(emulated, dtype, 1, tokens, 1024, 2, 64, [length])
    _decode(emulated, dtype, 5, tokens, 1024, 2, 80, [0, 1, 255, 257, 1024 - tokens], splits=(4,))


@pytest.mark.parametrize("dtype", ALL_TYPES)
def test_decode_window_padding_scale_and_splits(emulated, dtype):
    _decode(emulated, dtype, 2, 1, 1200, 2, 64, [1000, 300], window=256, scale=1.0)
    _decode(emulated, dtype, 1, 4, 600, 2, 128, [511], window=256, splits=(3,))
    _decode(emulated, dtype, 3, 2, 128, 2, 64, [40, 60, 10], kv_start=[0, 30, 11])
    _decode(emulated, dtype, 2, 3, 300, 1, 96, [200, 7], splits=(7, 64))
    _decode(emulated, dtype, 2, 16, 300, 1, 64, [280, 0], splits=(2,))


def test_decode_without_append_and_with_strided_caches(emulated):
    _decode(emulated, torch.float16, 2, 3, 200, 3, 64, [150, 3], append=False)
    _decode(emulated, torch.float16, 2, 2, 200, 3, 64, [150, 60], layout="bhsd", splits=(2,))


def test_decode_absurd_lengths_never_write_out_of_bounds(emulated):
    """Lengths read by the kernel itself (as on a device, unchecked by the host): clamped for reading,
    nothing appended when the block does not fit, including new tokens that would overhang S_max."""
    q = torch.randn(5, 4, 2, 64)
    k_cache, v_cache = torch.randn(5, 32, 2, 64), torch.randn(5, 32, 2, 64)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    cache_lens = torch.tensor([-1, -2**31, 2**31 - 2, 10**9, 30], dtype=torch.int32)
    out = emulated.decode_attention(q, k_cache, v_cache, cache_lens, q.clone(), q.clone(), None, 0.125, None, 2)
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)
    reference = decode_attention_reference(q.double(), k_cache.double(), v_cache.double(), cache_lens,
                                           k=q.double(), v=q.double(), scale=0.125)
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=1e-5)


# ---- layer_norm, bias_act, kv_append ------------------------------------------------------------------

def _layer_norm(emulated, x, weight, bias, residual, eps=1e-5):
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    baseline = layer_norm_baseline(x, weight, bias, eps, residual)
    if residual is None:
        y = emulated.layer_norm(x, weight, bias, eps)
        reference = layer_norm_reference(x.double(), as64(weight), as64(bias), eps)
        assert_within_tolerance(y, reference, baseline, "emulated layer_norm")
        return
    y, s = emulated.add_layer_norm(x, residual, weight, bias, eps)
    torch.testing.assert_close(s, baseline[1], rtol=0, atol=0)
    reference = layer_norm_reference(s.double(), as64(weight), as64(bias), eps)
    assert_within_tolerance(y, reference, baseline[0], "emulated add_layer_norm")


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_hidden_sizes(emulated, dtype, with_residual):
    for shape in [(1, 768), (3, 1600), (2, 5120), (2, 3, 1001), (4, 1), (2, 16384)]:
        _layer_norm(emulated, *layer_norm_inputs(shape, dtype, "cpu", with_residual=with_residual))



def _layer_norm_gradients(function, inputs, grads):
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in inputs]
    out = function(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, grads[:len(outs)])
    return [leaf.grad if leaf is not None else None for leaf in leaves]


def _layer_norm_backward(emulated, x, weight, bias, residual, eps=1e-5):
    """The CUDA backward from the forward's s (x, or the x + residual the emulated forward returns)
    against float64 autograd of the reference by the tolerance rule: dx (= dresidual), dweight, dbias."""
    grads = [torch.randn_like(x) for _ in range(2)]
    s = x if residual is None else emulated.add_layer_norm(x, residual, weight, bias, eps)[1]
    grad_sum = grads[1] if residual is not None else None
    dx, dresidual, dweight, dbias = emulated.layer_norm_backward(grads[0], grad_sum, s, weight, eps,
                                                                 residual is not None)
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    expected = _layer_norm_gradients(lambda x, w, b, r: layer_norm_reference(x, w, b, eps, r),
                                     [as64(t) for t in (x, weight, bias, residual)], [g.double() for g in grads])
    baseline = _layer_norm_gradients(lambda x, w, b, r: layer_norm_baseline(x, w, b, eps, r),
                                     (x, weight, bias, residual), grads)
    assert dx.is_contiguous() and dx.dtype == x.dtype and dweight.dtype == torch.float32
    assert_within_tolerance(dx, expected[0], baseline[0], f"emulated layer_norm dx {tuple(x.shape)}")
    if residual is not None:
        assert torch.equal(dresidual, dx)
    else:
        assert dresidual.numel() == 0
    for got, e, base, name in ((dweight, expected[1], baseline[1], "dweight"), (dbias, expected[2], baseline[2], "dbias")):
        if e is not None:
            assert_within_tolerance(got.to(x.dtype), e, base, f"emulated layer_norm {name} {tuple(x.shape)}")


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_backward(emulated, dtype, with_residual):
    """More rows than one block of 64 (the weight / bias partials), the hidden sizes of every vectors-per-
    thread instantiation, the scalar path at 16 vectors per thread (its row read again in each pass)."""
    for shape in [(1, 768), (70, 1600), (2, 3, 1001), (4, 1), (2, 16384)]:
        _layer_norm_backward(emulated, *layer_norm_inputs(shape, dtype, "cpu", with_residual=with_residual))
    x, weight, bias, residual = layer_norm_inputs((3, 9001), dtype, "cpu", with_residual=with_residual)
    _layer_norm_backward(emulated, x, None, bias, residual)  # 9001 scalar columns: 16 per thread
    _layer_norm_backward(emulated, x, weight, None, residual)
    with pytest.raises(RuntimeError, match="grad must have the shape of s"):
        emulated.layer_norm_backward(x[:, :5], None, x, None, 1e-5, False)

def test_layer_norm_optional_affine_strided_rows_and_large_mean(emulated):
    x, weight, bias, residual = layer_norm_inputs((5, 1600), torch.float16, "cpu")
    _layer_norm(emulated, x, None, None, residual)
    _layer_norm(emulated, x, weight, None, None)
    wide = torch.randn(5, 1700, dtype=torch.float16)  # row stride 1700: not 16-byte aligned
    _layer_norm(emulated, wide[:, 3:1603], weight, bias, torch.randn(5, 1700, dtype=torch.float16)[:, :1600])
    _layer_norm(emulated, 1000.0 + 0.01 * torch.randn(3, 2048), None, None, None)


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu", "relu"])
def test_bias_act(emulated, dtype, activation):
    for rows, columns in [(1, 1), (7, 3072), (3, 1000), (2, 8192), (3, 7)]:
        x, bias = torch.randn(rows, columns, dtype=dtype) * 3, torch.randn(columns, dtype=dtype)
        for b in (bias, None):
            y = emulated.bias_act(x, b, activation)
            reference = bias_act_reference(x.double(), None if b is None else b.double(), activation)
            assert_within_tolerance(y, reference, bias_act_baseline(x, b, activation), f"emulated {activation}")
    wide = torch.randn(4, 3000, dtype=dtype)[:, 5:2053]  # strided, misaligned rows
    y = emulated.bias_act(wide, None, activation)
    assert_within_tolerance(y, bias_act_reference(wide.double(), None, activation),
                            bias_act_baseline(wide, None, activation), "emulated strided rows")



def _bias_act_gradients(function, x, bias, grad):
    x = x.detach().requires_grad_(True)
    bias = bias.detach().requires_grad_(True) if bias is not None else None
    function(x, bias).backward(grad)
    return x.grad, bias.grad if bias is not None else None


@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("activation", ["gelu_tanh", "gelu", "relu"])
def test_bias_act_backward(emulated, dtype, activation):
    """The CUDA backward (dx and dbias from per-block partials) against float64 autograd of the
    reference by the tolerance rule: more rows than one block of 32, odd and vector widths, strided rows
    (the scalar path), no bias."""
    for rows, columns in [(1, 1), (70, 3072), (33, 1000), (3, 7), (5, 8200)]:
        x, bias = torch.randn(rows, columns, dtype=dtype) * 3, torch.randn(columns, dtype=dtype)
        grad = torch.randn(rows, columns, dtype=dtype)
        for b in (bias, None):
            dx, dbias = emulated.bias_act_backward(grad, x, b, activation)
            expected = _bias_act_gradients(lambda x, b: bias_act_reference(x, b, activation), x.double(),
                                           None if b is None else b.double(), grad.double())
            baseline = _bias_act_gradients(lambda x, b: bias_act_baseline(x, b, activation), x, b, grad)
            assert dx.is_contiguous() and dx.dtype == dtype
            assert_within_tolerance(dx, expected[0], baseline[0], f"emulated {activation} dx {rows}x{columns}")
            if b is None:
                assert dbias.numel() == 0
            else:
                assert_within_tolerance(dbias, expected[1], baseline[1], f"emulated {activation} dbias")
    wide = torch.randn(40, 3000, dtype=dtype)[:, 5:2053]  # strided, misaligned rows
    grad = torch.randn(40, 2048, dtype=dtype)
    dx, _ = emulated.bias_act_backward(grad, wide, None, activation)
    expected = _bias_act_gradients(lambda x, b: bias_act_reference(x, b, activation), wide.double(), None,
                                   grad.double())
    baseline = _bias_act_gradients(lambda x, b: bias_act_baseline(x, b, activation), wide, None, grad)
    assert_within_tolerance(dx, expected[0], baseline[0], "emulated strided rows dx")
    with pytest.raises(RuntimeError, match="grad must have the shape of x"):
        emulated.bias_act_backward(grad[:, :5], wide, None, activation)

@pytest.mark.parametrize("dtype", ALL_TYPES)
@pytest.mark.parametrize("dim,layout", [(64, "bshd"), (64, "bhsd"), (5, "bshd")])
def test_kv_append_writes_exactly_the_new_slots(emulated, dtype, dim, layout):
    for tokens, positions in [(1, [0, 17, 39]), (7, [33, 0, 12])]:
        k_cache, v_cache = _caches(3, 40, 2, dim, dtype, "cpu", [40, 40, 40], layout)
        k_cache[:], v_cache[:] = float("nan"), float("nan")  # poison: only the new slots may change
        k, v = torch.randn(3, tokens, 2, dim, dtype=dtype), torch.randn(3, tokens, 2, dim, dtype=dtype)
        positions = torch.tensor(positions, dtype=torch.int32)
        expected_k, expected_v = expected_after_append(k_cache, k, positions), expected_after_append(v_cache, v, positions)
        emulated.kv_append(k_cache, v_cache, k, v, positions)
        assert_equal_with_nan(k_cache, expected_k)
        assert_equal_with_nan(v_cache, expected_v)
    with pytest.raises(RuntimeError, match=r"positions\[1\] = 34 is out of range"):
        emulated.kv_append(k_cache, v_cache, k, v, torch.tensor([0, 34, 0], dtype=torch.int32))


# ---- out-of-bounds accesses: everything above again, with the kernels built with AddressSanitizer ----

def test_address_sanitizer_sees_the_kernels_accesses():
    """The CPU stand-in for compute-sanitizer's memcheck: the emulated library rebuilt with
    AddressSanitizer, which must catch a planted one-past-the-end write, then every test in this file
    run under it: no kernel reads or writes outside its tensors or its shared memory."""
    env = simt_emulator.sanitizer_environment()
    repository = Path(__file__).resolve().parents[2]
    probe = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(simt_emulator.HERE)!r}); "
                               "import simt_emulator; simt_emulator.ops().selftest_broken(3)"],
        env=env, cwd=repository, capture_output=True, text=True, timeout=1200)
    assert probe.returncode != 0 and "AddressSanitizer: heap-buffer-overflow" in probe.stderr, probe.stderr[-3000:]
    # -s: a report is printed as the sanitizer stops the process, which pytest's capture would swallow
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", __file__,
                          "-k", "not address_sanitizer"], env=env, cwd=repository, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0 and " passed" in run.stdout, (run.stdout[-3000:], run.stderr[-3000:])
    assert "AddressSanitizer" not in run.stderr, run.stderr[-3000:]


# ---- small tensors given as expanded or strided views (the host code must honour their layout) -------

def test_strided_and_expanded_small_tensors(emulated):
    columns = 264
    x = torch.randn(3, columns, dtype=torch.float16)
    weight, bias = torch.randn(2 * columns, dtype=torch.float16)[::2], torch.tensor([0.5], dtype=torch.float16)
    bias = bias.expand(columns)
    assert torch.equal(emulated.layer_norm(x, weight, bias, 1e-5),
                       emulated.layer_norm(x, weight.contiguous(), bias.contiguous(), 1e-5))
    assert torch.equal(emulated.bias_act(x, weight, "gelu_tanh"), emulated.bias_act(x, weight.contiguous(), "gelu_tanh"))
    batch, max_len, heads, dim = 3, 16, 2, 64
    k, v = torch.randn(batch, 2, heads, dim, dtype=torch.float16), torch.randn(batch, 2, heads, dim, dtype=torch.float16)
    positions = torch.tensor([5], dtype=torch.int32).expand(batch)
    caches = [torch.zeros(batch, max_len, heads, dim, dtype=torch.float16) for _ in range(2)]
    emulated.kv_append(caches[0], caches[1], k, v, positions)
    assert torch.equal(caches[0][:, 5:7], k) and torch.equal(caches[1][:, 5:7], v) and not caches[0][:, :5].any()
    q = torch.randn(batch, 1, heads, dim, dtype=torch.float16)
    kv_start = torch.tensor([0, 9, 1, 9, 3, 9], dtype=torch.int32)[::2]
    lens = torch.tensor([7], dtype=torch.int32).expand(batch)
    out = emulated.decode_attention(q, caches[0], caches[1], lens, None, None, None, 0.125, kv_start, 2)
    want = emulated.decode_attention(q, caches[0], caches[1], lens.contiguous(), None, None, None, 0.125,
                                     kv_start.contiguous(), 2)
    assert torch.equal(out, want)
    q = torch.randn(batch, 8, heads, dim, dtype=torch.float16)
    assert torch.equal(emulated.attention(q, q, q, True, None, 0.125, kv_start),
                       emulated.attention(q, q, q, True, None, 0.125, kv_start.contiguous()))


def test_a_lock_left_by_an_interrupted_build_is_removed(tmp_path, capsys):
    """torch's extension builder would wait forever for it; a recent lock (a build running) is left alone."""
    import os
    import time

    lock = tmp_path / "lock"
    lock.write_text("")
    simt_emulator._remove_stale_lock(lock)
    assert lock.exists()
    old = time.time() - simt_emulator.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    simt_emulator._remove_stale_lock(lock)
    assert not lock.exists() and "left 16 minutes ago by an interrupted build" in capsys.readouterr().out
