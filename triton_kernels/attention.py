"""Triton fused prefill attention (FlashAttention-2 style): causal, sliding-window and left-padded.

out[b, i, h] = softmax_j(scale * q[b, i, h] . k[b, j, h]) v[b, j, h] over the visible keys j, where the
Sq queries are the last Sq positions of the Sk keys (bottom-right aligned: query i sits at key position
p = Sk - Sq + i) and key j is visible iff
    kv_start[b] <= j                 (left padding)
    j <= p                           (causal)
    j > p - window                   (sliding window, causal only)
A query with no visible key gets zeros. The key loop covers only the blocks that can hold visible keys,
so a window costs O(S * W), not O(S^2). Softmax statistics are fp32 with exp2; fp32 inputs use IEEE
dots (no tf32), so float32 results are exact to rounding.

One program per (BLOCK_M queries, batch * head); the running max m, normaliser l and the fp32
accumulator stay in registers (online softmax)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634

# Tile configurations tried by the autotuner on a GPU (a single small one under the interpreter, which
# cannot benchmark). Filtered by head dim so registers stay bounded: [BLOCK_M, BLOCK_D] fp32 accumulator.
# Revisited with the static report (sm_90, triton 3.8; bench/results/static-sm_90.csv): every one keeps
# wgmma with no spill; BLOCK_N 128 at D = 64 is listed (247 registers: 1 CTA of 8 warps per SM). Two-stage
# variants of the 8-warp configs were tried and left out: they free shared memory (132 -> 99 KB at
# D = 128, 66 -> 50 KB at D = 64) but not occupancy, which registers bound (193 x 256 threads at D = 128:
# 1 CTA per SM either way; 127 x 256 at D = 64: 2). The GPU's autotuner picks among these per key.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=4),
]
_INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _prune_configs(configs, named_args, **kwargs):
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    kept = [c for c in configs if not (block_d >= 128 and c.kwargs["BLOCK_N"] >= 128)]
    return kept or configs


@triton.jit
def _tile_scores(q, k, IEEE: tl.constexpr):
    """q (M, D) . k (D, N) in fp32; exact (no tf32) for fp32 inputs. (Every product of the backward too.)"""
    if IEEE:
        return tl.dot(q, k, input_precision="ieee")
    return tl.dot(q, k)


@triton.jit
def _online_softmax_step(scores, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """Folds one key tile into the running softmax: scores (M, N) in log2 units with invisible keys at
    -inf, v (N, D). Returns the new running max m, normaliser l and unnormalised accumulator. A row that
    has seen no visible key keeps m = -inf, l = 0, acc = 0 (no NaN: its max is taken as 0)."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc += tl.dot(p, v, input_precision="ieee")
    else:
        acc += tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _attend_tiles(q, m_i, l_i, acc, k_base, v_base, stride_ks, stride_vs, offs_d, d_mask, query_pos, n_lo, n_hi,
                  start, kv_len, window, scale_log2, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  IEEE: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr):
    """Folds the key tiles n0 = n_lo, n_lo + BLOCK_N, ... < n_hi into the running softmax. MASKED=False:
    tiles inside every bound for every query of the block (no mask, no key-range check on the loads;
    EVEN_D: the head dim is a power of two, so no load needs a mask at all)."""
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[None, :] * stride_ks + offs_d[:, None]  # (BLOCK_D, BLOCK_N)
        v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :]  # (BLOCK_N, BLOCK_D)
        if MASKED:
            in_range = offs_n < kv_len
            k = tl.load(k_ptrs, mask=in_range[None, :] & d_mask[:, None], other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
        scores = _tile_scores(q, k, IEEE) * scale_log2
        if MASKED:
            visible = (offs_n[None, :] >= start) & in_range[None, :]
            if IS_CAUSAL:
                visible = visible & (offs_n[None, :] <= query_pos[:, None])
            if HAS_WINDOW:
                visible = visible & (offs_n[None, :] > query_pos[:, None] - window)
            scores = tl.where(visible, scores, float("-inf"))
            v = tl.load(v_ptrs, mask=in_range[:, None] & d_mask[None, :], other=0.0)
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
        m_i, l_i, acc = _online_softmax_step(scores, v, m_i, l_i, acc, IEEE)
    return m_i, l_i, acc


@triton.autotune(
    configs=_INTERPRETER_CONFIGS if _interpreting() else _GPU_CONFIGS,
    key=["HEAD_DIM", "IS_CAUSAL", "HAS_WINDOW", "HAS_KV_START", "IEEE", "len_bucket"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _attention_fwd_kernel(
    Q,  # [B, Sq, H, D], unit stride on D
    K,  # [B, Sk, H, D], unit stride on D
    V,  # [B, Sk, H, D], unit stride on D
    OUT,  # [B, Sq, H, D], contiguous
    LSE,  # [B * H, Sq] fp32: each row's log2-sum-exp2 of its scaled scores (unused unless STORE_LSE)
    KV_START,  # [B] int32, first non-padding key per sequence (unused unless HAS_KV_START)
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_kv_start,  # kv_start's stride (an expanded [B] has 0)
    heads,
    q_len,
    kv_len,
    window,
    scale_log2,  # scale * log2(e)
    len_bucket,  # Sk rounded up to a power of two: only in the autotuner's key (short and long sequences
                 # get their own best configuration)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    IS_CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_KV_START: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: exact dots
    STORE_LSE: tl.constexpr,  # for the backward (training)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    block_m = tl.program_id(0)
    if IS_CAUSAL:  # the last query blocks see the most keys: they start first, the short ones fill the tail
        block_m = tl.num_programs(0) - 1 - block_m
    batch_head = tl.program_id(1)
    b = (batch_head // heads).to(tl.int64)
    h = (batch_head % heads).to(tl.int64)
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    query_pos = offs_m + (kv_len - q_len)  # key coordinates of each query
    first_pos = block_m * BLOCK_M + (kv_len - q_len)
    last_pos = tl.minimum(block_m * BLOCK_M + BLOCK_M, q_len) - 1 + (kv_len - q_len)

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=(offs_m[:, None] < q_len) & d_mask[None, :], other=0.0)

    # Keys [lo, hi) can be visible to some query of this block; lo rounded down to a tile.
    start = 0
    if HAS_KV_START:
        start = tl.maximum(tl.load(KV_START + b * stride_kv_start), 0)
    lo = start
    if HAS_WINDOW:
        lo = tl.maximum(lo, first_pos - window + 1)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = kv_len
    if IS_CAUSAL:
        hi = tl.minimum(hi, last_pos + 1)
    # The tiles inside every bound for every query of the block (the common case off the diagonal and the
    # window's edge) run unmasked between the masked ones before (padding, window) and after (diagonal,
    # the end of the keys): Triton's tutorial's two-stage loop, in three stages.
    inner_lo = tl.cdiv(start, BLOCK_N) * BLOCK_N
    if HAS_WINDOW:
        inner_lo = tl.maximum(inner_lo, tl.cdiv(tl.maximum(last_pos - window + 1, 0), BLOCK_N) * BLOCK_N)
    inner_lo = tl.minimum(tl.maximum(inner_lo, lo), hi)
    inner_end = kv_len
    if IS_CAUSAL:
        inner_end = tl.minimum(inner_end, first_pos + 1)
    inner_hi = tl.minimum(tl.maximum((inner_end // BLOCK_N) * BLOCK_N, inner_lo), hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    if HAS_WINDOW or HAS_KV_START:  # else lo = inner_lo = 0: no tile before the interior
        m_i, l_i, acc = _attend_tiles(q, m_i, l_i, acc, k_base, v_base, stride_ks, stride_vs, offs_d, d_mask,
                                      query_pos, lo, inner_lo, start, kv_len, window, scale_log2, IS_CAUSAL,
                                      HAS_WINDOW, IEEE, BLOCK_N, HEAD_DIM == BLOCK_D, True)
    m_i, l_i, acc = _attend_tiles(q, m_i, l_i, acc, k_base, v_base, stride_ks, stride_vs, offs_d, d_mask, query_pos,
                                  inner_lo, inner_hi, start, kv_len, window, scale_log2, IS_CAUSAL, HAS_WINDOW, IEEE,
                                  BLOCK_N, HEAD_DIM == BLOCK_D, False)
    m_i, l_i, acc = _attend_tiles(q, m_i, l_i, acc, k_base, v_base, stride_ks, stride_vs, offs_d, d_mask, query_pos,
                                  inner_hi, hi, start, kv_len, window, scale_log2, IS_CAUSAL, HAS_WINDOW, IEEE,
                                  BLOCK_N, HEAD_DIM == BLOCK_D, True)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no visible key: acc is 0, the output too
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < q_len) & d_mask[None, :])
    if STORE_LSE:  # m + log2(l); +inf for a row that saw no key (its probabilities are then all 0)
        lse = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(LSE + batch_head.to(tl.int64) * q_len + offs_m, lse, mask=offs_m < q_len)


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None,
                  scale: float, kv_start: torch.Tensor | None, store_lse: bool = False):
    """q [B, Sq, H, D], k and v [B, Sk, H, D] (unit stride on D), kv_start int32 [B] (any stride) on q's
    device or None. Arguments are assumed checked by fusedgpt.ops.attention. Returns a contiguous
    [B, Sq, H, D]; with store_lse, (out, lse) with lse [B, H, Sq] fp32 in log2 units of the scaled scores
    (what attention_bwd recomputes the probabilities from)."""
    batch, q_len, heads, dim = q.shape
    kv_len = k.shape[1]
    out = torch.empty((batch, q_len, heads, dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, q_len) if store_lse else (0,), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or kv_len == 0:  # no key: zeros, and probabilities 0 for the backward
        out.zero_()
        lse.fill_(float("inf"))
        return (out, lse) if store_lse else out

    def grid(meta):
        return (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)

    _attention_fwd_kernel[grid](
        q, k, v, out, lse if store_lse else out, kv_start if kv_start is not None else q,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
        kv_start.stride(0) if kv_start is not None else 0, heads, q_len, kv_len, window if window is not None else 0, scale * LOG2_E,
        min(triton.next_power_of_2(kv_len), 1 << 16), HEAD_DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), IS_CAUSAL=causal, HAS_WINDOW=window is not None,
        HAS_KV_START=kv_start is not None, IEEE=q.dtype == torch.float32, STORE_LSE=store_lse,
    )
    return (out, lse) if store_lse else out


# ---- backward (FlashAttention-2's): probabilities recomputed from the saved log-sum-exp, no S x S tensor --

@triton.jit
def _visible(offs_m, offs_n, q_len, kv_len, start, window, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """(M, N): key offs_n visible to query offs_m (queries sit at key positions i + Sk - Sq)."""
    query_pos = offs_m + (kv_len - q_len)
    visible = (offs_m[:, None] < q_len) & (offs_n[None, :] >= start) & (offs_n[None, :] < kv_len)
    if IS_CAUSAL:
        visible = visible & (offs_n[None, :] <= query_pos[:, None])
    if HAS_WINDOW:
        visible = visible & (offs_n[None, :] > query_pos[:, None] - window)
    return visible


@triton.jit
def _probabilities(q, k, lse, visible, scale_log2, IEEE: tl.constexpr):
    """P (M, N) = 2^(scale log2(e) q k^T - lse), 0 where hidden (lse = +inf for a row that sees nothing)."""
    scores = _tile_scores(q, tl.trans(k), IEEE) * scale_log2
    return tl.where(visible, tl.exp2(scores - lse[:, None]), 0.0)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO,  # [B, S, H, D], unit stride on D
    LSE, DELTA,  # [B * H, Sq] fp32: the forward's log2-sum-exp2; rowsum(dO * O)
    DK, DV,  # [B, Sk, H, D], contiguous
    KV_START,  # [B] int32 (unused unless HAS_KV_START)
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_kv_start,
    heads, q_len, kv_len, window, scale_log2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KV_START: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One block of BLOCK_N keys: dV = P^T dO and dK = scale dS^T Q over the query blocks that can see
    them (causal: from the diagonal on; window: until the window has passed), dS = P (dO V^T - delta)."""
    block_n = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // heads).to(tl.int64)
    h = (batch_head % heads).to(tl.int64)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    kv_mask = (offs_n[:, None] < kv_len) & d_mask[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask,
                other=0.0)
    start = 0
    if HAS_KV_START:
        start = tl.maximum(tl.load(KV_START + b * stride_kv_start), 0)
    offset = kv_len - q_len
    m_lo = 0
    if IS_CAUSAL:
        m_lo = tl.maximum(block_n * BLOCK_N - offset, 0)
    m_lo = (m_lo // BLOCK_M) * BLOCK_M
    m_hi = q_len
    if HAS_WINDOW:  # query position p sees key j only while p < j + window
        m_hi = tl.minimum(m_hi, tl.maximum(block_n * BLOCK_N + BLOCK_N - 1 + window - offset, 0))
    if block_n * BLOCK_N + BLOCK_N <= start:  # every key of the block is padding
        m_hi = m_lo
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    row_base = batch_head.to(tl.int64) * q_len
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_mask = offs_m < q_len
        q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :],
                     mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        lse = tl.load(LSE + row_base + offs_m, mask=row_mask, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m, mask=row_mask, other=0.0)
        visible = _visible(offs_m, offs_n, q_len, kv_len, start, window, IS_CAUSAL, HAS_WINDOW)
        p = _probabilities(q, k, lse, visible, scale_log2, IEEE)  # (M, N)
        dv += _tile_scores(tl.trans(p.to(do.dtype)), do, IEEE)
        dp = _tile_scores(do, tl.trans(v), IEEE)  # (M, N)
        ds = p * (dp - delta[:, None])
        dk += _tile_scores(tl.trans(ds.to(q.dtype)), q, IEEE)
    dk = dk * scale
    out_offsets = b * kv_len * heads * HEAD_DIM + h * HEAD_DIM + offs_n[:, None] * (heads * HEAD_DIM) + offs_d[None, :]
    tl.store(DK + out_offsets, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_offsets, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, DO,  # [B, S, H, D], unit stride on D
    LSE, DELTA,  # [B * H, Sq] fp32
    DQ,  # [B, Sq, H, D], contiguous
    KV_START,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_kv_start,
    heads, q_len, kv_len, window, scale_log2, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KV_START: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One block of BLOCK_M queries: dQ = scale dS K over the key tiles the forward visited."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = (batch_head // heads).to(tl.int64)
    h = (batch_head % heads).to(tl.int64)
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_mask = offs_m < q_len
    q_mask = row_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :], mask=q_mask,
                other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :], mask=q_mask,
                 other=0.0)
    row_base = batch_head.to(tl.int64) * q_len
    lse = tl.load(LSE + row_base + offs_m, mask=row_mask, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=row_mask, other=0.0)
    start = 0
    if HAS_KV_START:
        start = tl.maximum(tl.load(KV_START + b * stride_kv_start), 0)
    first_pos = block_m * BLOCK_M + (kv_len - q_len)
    last_pos = tl.minimum(block_m * BLOCK_M + BLOCK_M, q_len) - 1 + (kv_len - q_len)
    lo = start
    if HAS_WINDOW:
        lo = tl.maximum(lo, first_pos - window + 1)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = kv_len
    if IS_CAUSAL:
        hi = tl.minimum(hi, last_pos + 1)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < kv_len) & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        visible = _visible(offs_m, offs_n, q_len, kv_len, start, window, IS_CAUSAL, HAS_WINDOW)
        p = _probabilities(q, k, lse, visible, scale_log2, IEEE)
        dp = _tile_scores(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _tile_scores(ds.to(k.dtype), k, IEEE)
    dq = dq * scale
    tl.store(DQ + b * q_len * heads * HEAD_DIM + h * HEAD_DIM + offs_m[:, None] * (heads * HEAD_DIM) + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


def attention_bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, causal: bool, window: int | None, scale: float,
                  kv_start: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous like q, k, v, from the output gradient `grad` [B, Sq, H, D] (unit stride on
    D), the forward's out and lse (attention_fwd(..., store_lse=True)). Work O(S * visible keys), memory
    O(S * D): nothing of size Sq x Sk is allocated (delta = rowsum(grad * out) is [B, H, Sq])."""
    batch, q_len, heads, dim = q.shape
    kv_len = k.shape[1]
    dq = torch.empty((batch, q_len, heads, dim), dtype=q.dtype, device=q.device)
    dk = torch.empty((batch, kv_len, heads, dim), dtype=k.dtype, device=k.device)
    dv = torch.empty((batch, kv_len, heads, dim), dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or kv_len == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = (grad.float() * out.float()).sum(dim=-1).transpose(1, 2).contiguous()  # (B, H, Sq)
    if _interpreting():
        block_m = block_n = 16
        warps = 4
    else:
        block_m, block_n = 64, 64
        warps = 4 if dim <= 64 else 8
    common = dict(HEAD_DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), IS_CAUSAL=causal,
                  HAS_WINDOW=window is not None, HAS_KV_START=kv_start is not None, IEEE=q.dtype == torch.float32,
                  BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=2)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad.stride()[:3],
               kv_start.stride(0) if kv_start is not None else 0, heads, q_len, kv_len,
               window if window is not None else 0, scale * LOG2_E, scale)
    start = kv_start if kv_start is not None else q
    _attention_bwd_dkdv_kernel[(triton.cdiv(kv_len, block_n), batch * heads)](
        q, k, v, grad, lse, delta, dk, dv, start, *strides, **common)
    _attention_bwd_dq_kernel[(triton.cdiv(q_len, block_m), batch * heads)](
        q, k, v, grad, lse, delta, dq, start, *strides, **common)
    return dq, dk, dv
