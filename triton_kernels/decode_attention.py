"""Triton decode attention over a static KV cache, with the KV-cache append fused in, split along the
keys (flash-decoding) so that one long sequence still fills the GPU.

Keys of sequence b, in position order: the cache's first cache_lens[b] entries, then (when new k, v are
given) the T new tokens. Query t sits at position L - T + t, L = cache_lens[b] (+ T with new tokens),
and sees key j iff j <= its position, j > position - window (window) and j >= kv_start[b] (padding).

Pass 1, grid (splits, B * H): each program takes an equal share of the visible key range [lo, hi) of
its sequence (computed on the device from cache_lens, so the launch shape depends only on host values:
capturable in a CUDA graph and replayable with new lengths), runs the online softmax over it and
writes its partial (max, normaliser, unnormalised accumulator): a loop over the cached keys of its
share, then one tile of the new tokens that fall in it. New tokens are read from k, v themselves, never
from the cache slots that split 0 writes them to in the same launch, so there is no race. With one split
the split kernel writes the output itself and pass 2 is not launched. A sequence whose new tokens would not fit (cache_lens[b] + T > S_max) is attended to correctly
but not written. Pass 2, grid (B * H,): combines the splits."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fusedgpt.triton_kernels.attention import LOG2_E, _online_softmax_step, _tile_scores


@triton.jit
def _decode_attention_split_kernel(
    Q,  # [B, T, H, D]
    K_CACHE,  # [B, S_max, H, D]
    V_CACHE,  # [B, S_max, H, D]
    CACHE_LENS,  # [B] int32: tokens cached before this call
    K_NEW,  # [B, T, H, D] (unused unless HAS_NEW)
    V_NEW,  # [B, T, H, D] (unused unless HAS_NEW)
    KV_START,  # [B] int32 (unused unless HAS_KV_START)
    PART_ACC,  # [B * H, splits, T, BLOCK_D] fp32 (unused when DIRECT)
    PART_STATS,  # [B * H, splits, 2, T] fp32: running max (log2 units), normaliser (unused when DIRECT)
    OUT,  # [B, T, H, D], contiguous: written here when DIRECT
    stride_ob, stride_ot, stride_oh,
    stride_qb, stride_qt, stride_qh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_knb, stride_knt, stride_knh,
    stride_vnb, stride_vnt, stride_vnh,
    stride_cache_lens,  # cache_lens' stride (an expanded [B] has 0)
    stride_kv_start,  # kv_start's stride
    heads,
    tokens,
    max_len,
    window,
    scale_log2,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_NEW: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KV_START: tl.constexpr,
    IEEE: tl.constexpr,
    DIRECT: tl.constexpr,  # one split: write the output itself (no combine launch)
):
    split = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // heads).to(tl.int64)
    h = (batch_head % heads).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    t_mask = offs_t < tokens

    # Lengths outside [0, S_max] (corrupted) are clamped for reading, as the reference does (the keys are
    # then none or the whole cache, and no loop runs past S_max + T keys); nothing is appended for them.
    raw_len = tl.load(CACHE_LENS + b * stride_cache_lens)
    cache_len = tl.minimum(tl.maximum(raw_len, 0), max_len)
    cached = cache_len  # keys j < cached are read from the cache
    seq_len = cache_len
    if HAS_NEW:
        seq_len = cache_len + tokens
        if split == 0:  # the fused append, for sequences whose new tokens fit
            fits = (raw_len >= 0) & (raw_len <= max_len - tokens)  # no int32 overflow, whatever it holds
            rows = t_mask[:, None] & d_mask[None, :] & fits
            slot = (cache_len + offs_t).to(tl.int64)
            new_k = tl.load(K_NEW + b * stride_knb + h * stride_knh + offs_t[:, None] * stride_knt + offs_d[None, :],
                            mask=rows)
            new_v = tl.load(V_NEW + b * stride_vnb + h * stride_vnh + offs_t[:, None] * stride_vnt + offs_d[None, :],
                            mask=rows)
            tl.store(K_CACHE + b * stride_kcb + h * stride_kch + slot[:, None] * stride_kcs + offs_d[None, :], new_k,
                     mask=rows)
            tl.store(V_CACHE + b * stride_vcb + h * stride_vch + slot[:, None] * stride_vcs + offs_d[None, :], new_v,
                     mask=rows)
    query_pos = seq_len - tokens + offs_t

    # This split's share of the keys any query can see: [lo, hi), in tiles of BLOCK_N.
    lo = 0
    if HAS_KV_START:
        lo = tl.maximum(tl.load(KV_START + b * stride_kv_start), 0)
    if HAS_WINDOW:
        lo = tl.maximum(lo, seq_len - tokens - window + 1)
    hi = seq_len
    chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), num_splits), BLOCK_N) * BLOCK_N
    split_lo = lo + split * chunk
    split_hi = tl.minimum(hi, split_lo + chunk)

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_t[:, None] * stride_qt + offs_d[None, :],
                mask=t_mask[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    # The cached keys of this split: two loads per tile, which the compiler pipelines (the new tokens'
    # loads stay out of this loop: inside it, they doubled its shared-memory buffers).
    for n0 in range(split_lo, tl.minimum(split_hi, cached), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        from_cache = offs_n < cached
        k = tl.load(K_CACHE + b * stride_kcb + h * stride_kch + offs_n[None, :] * stride_kcs + offs_d[:, None],
                    mask=from_cache[None, :] & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        v = tl.load(V_CACHE + b * stride_vcb + h * stride_vch + offs_n[:, None] * stride_vcs + offs_d[None, :],
                    mask=from_cache[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        scores = _tile_scores(q, k, IEEE) * scale_log2
        visible = (offs_n[None, :] < split_hi) & (offs_n[None, :] <= query_pos[:, None])
        visible = visible & (offs_n[None, :] >= lo) & from_cache[None, :]
        if HAS_WINDOW:
            visible = visible & (offs_n[None, :] > query_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(scores, v, m_i, l_i, acc, IEEE)
    if HAS_NEW:  # the new tokens in this split's range (positions cached + i): one tile, from k, v themselves
        offs_i = tl.arange(0, BLOCK_T)
        new_pos = cached + offs_i
        from_new = (offs_i < tokens) & (new_pos >= split_lo) & (new_pos < split_hi)
        k = tl.load(K_NEW + b * stride_knb + h * stride_knh + offs_i[None, :] * stride_knt + offs_d[:, None],
                    mask=from_new[None, :] & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_T)
        v = tl.load(V_NEW + b * stride_vnb + h * stride_vnh + offs_i[:, None] * stride_vnt + offs_d[None, :],
                    mask=from_new[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_T, BLOCK_D)
        scores = _tile_scores(q, k, IEEE) * scale_log2
        visible = from_new[None, :] & (new_pos[None, :] <= query_pos[:, None]) & (new_pos[None, :] >= lo)
        if HAS_WINDOW:
            visible = visible & (new_pos[None, :] > query_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(scores, v, m_i, l_i, acc, IEEE)

    if DIRECT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # nothing visible: zeros
        tl.store(OUT + b * stride_ob + h * stride_oh + offs_t[:, None] * stride_ot + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=t_mask[:, None] & d_mask[None, :])
    else:  # the partials of the real queries only (T of them, not BLOCK_T)
        part = batch_head.to(tl.int64) * num_splits + split
        tl.store(PART_ACC + (part * tokens + offs_t[:, None]) * BLOCK_D + offs_d[None, :], acc, mask=t_mask[:, None])
        tl.store(PART_STATS + (part * 2) * tokens + offs_t, m_i, mask=t_mask)
        tl.store(PART_STATS + (part * 2 + 1) * tokens + offs_t, l_i, mask=t_mask)


@triton.jit
def _decode_attention_combine_kernel(
    PART_ACC,  # [B * H, splits, T, BLOCK_D] fp32
    PART_STATS,  # [B * H, splits, 2, T] fp32
    OUT,  # [B, T, H, D], contiguous
    stride_ob, stride_ot, stride_oh,
    heads,
    tokens,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    batch_head = tl.program_id(0).to(tl.int64)
    b = batch_head // heads
    h = batch_head % heads
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_mask = offs_t < tokens
    first = batch_head * num_splits
    m_max = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    for s in range(num_splits):
        m_max = tl.maximum(m_max, tl.load(PART_STATS + ((first + s) * 2) * tokens + offs_t, mask=t_mask,
                                          other=float("-inf")))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    l_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
    for s in range(num_splits):
        m_s = tl.load(PART_STATS + ((first + s) * 2) * tokens + offs_t, mask=t_mask, other=float("-inf"))
        weight = tl.exp2(m_s - m_safe)
        l_sum += weight * tl.load(PART_STATS + ((first + s) * 2 + 1) * tokens + offs_t, mask=t_mask, other=0.0)
        acc += weight[:, None] * tl.load(PART_ACC + ((first + s) * tokens + offs_t[:, None]) * BLOCK_D + offs_d[None, :],
                                         mask=t_mask[:, None], other=0.0)
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)[:, None]  # nothing visible: zeros
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_t[:, None] * stride_ot + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=(offs_t[:, None] < tokens) & (offs_d[None, :] < HEAD_DIM))


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def key_range(max_len: int, window: int | None, tokens: int) -> int:
    """The most keys one query of a decode call can see: the cache (or its window) and the new tokens."""
    return (min(max_len, window) if window is not None else max_len) + tokens


def choose_splits(batch_heads: int, keys: int, block_n: int, device: torch.device | None, *,
                  processors: int | None = None) -> int:
    """Splits along the keys: about two programs per multiprocessor, never more than one tile of keys
    per split. Depends on host values only (shapes, window), never on cache_lens. `processors` overrides
    the device's multiprocessor count (bench/static_report.py asks what an H200 would choose)."""
    if processors is None:
        processors = _multiprocessors(device.index or 0) if device is not None and device.type == "cuda" else 4
    tiles = triton.cdiv(max(keys, 1), block_n)
    return max(1, min(tiles, triton.cdiv(2 * processors, max(batch_heads, 1)), 128))  # an empty batch: 1


def decode_attention_fwd(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
                         k: torch.Tensor | None, v: torch.Tensor | None, window: int | None, scale: float,
                         kv_start: torch.Tensor | None, num_splits: int | None = None) -> torch.Tensor:
    """q [B, T, H, D]; caches [B, S_max, H, D]; cache_lens (and kv_start) int32 [B], any stride, on q's
    device;
    k, v [B, T, H, D] or None (then nothing is written). Arguments are assumed checked by
    fusedgpt.ops.decode_attention. Returns a contiguous [B, T, H, D]."""
    batch, tokens, heads, dim = q.shape
    max_len = k_cache.shape[1]
    out = torch.empty((batch, tokens, heads, dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    block_t = max(16, triton.next_power_of_2(tokens))
    block_d = max(16, triton.next_power_of_2(dim))
    block_n = 64
    splits = num_splits or choose_splits(batch * heads, key_range(max_len, window, tokens), block_n, q.device)
    direct = splits == 1  # nothing to combine: the split kernel writes out
    parts = 0 if direct else batch * heads * splits
    part_acc = torch.empty((parts, tokens, block_d), dtype=torch.float32, device=q.device)
    part_stats = torch.empty((parts, 2, tokens), dtype=torch.float32, device=q.device)
    has_new = k is not None
    _decode_attention_split_kernel[(splits, batch * heads)](
        q, k_cache, v_cache, cache_lens, k if has_new else q, v if has_new else q,
        kv_start if kv_start is not None else cache_lens, part_acc, part_stats, out, *out.stride()[:3],
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3],
        *(k.stride()[:3] if has_new else (0, 0, 0)), *(v.stride()[:3] if has_new else (0, 0, 0)),
        cache_lens.stride(0), kv_start.stride(0) if kv_start is not None else 0, heads, tokens, max_len, window if window is not None else 0, scale * LOG2_E, splits,
        HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_T=block_t, BLOCK_N=block_n, HAS_NEW=has_new,
        HAS_WINDOW=window is not None, HAS_KV_START=kv_start is not None, IEEE=q.dtype == torch.float32,
        DIRECT=direct, num_warps=4,
    )
    if direct:
        return out
    _decode_attention_combine_kernel[(batch * heads,)](
        part_acc, part_stats, out, *out.stride()[:3], heads, tokens, splits,
        HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_T=triton.next_power_of_2(tokens), num_warps=4,  # T rows, not 16
    )
    return out
