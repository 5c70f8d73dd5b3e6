"""Triton KV-cache append: k_cache[b, positions[b] + t] = k[b, t], likewise v, in one launch.

Positions are read on the device (no host sync; capturable in a CUDA graph). A sequence whose block of
T tokens would not fit (positions[b] < 0 or positions[b] + T > S_max) is skipped whole: no store for it
is performed, so nothing is ever written out of bounds."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_append_fwd_kernel(
    K_CACHE,  # [B, S_max, H, D], unit stride on D
    V_CACHE,  # [B, S_max, H, D], unit stride on D
    K,  # [B, T, H, D], unit stride on D
    V,  # [B, T, H, D], unit stride on D
    POSITIONS,  # [B] int32: tokens already cached per sequence
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_pos,  # positions' stride (an expanded [B] has 0)
    tokens,
    heads,
    dim,
    max_start,  # S_max - T
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bt = tl.program_id(0)
    b = (bt // tokens).to(tl.int64)
    t = bt % tokens
    head_ids = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    start = tl.load(POSITIONS + b * stride_pos)
    fits = (start >= 0) & (start <= max_start)
    mask = (head_ids[:, None] < heads) & (dims[None, :] < dim) & fits
    slot = (start + t).to(tl.int64)
    k = tl.load(K + b * stride_kb + t * stride_kt + head_ids[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(V + b * stride_vb + t * stride_vt + head_ids[:, None] * stride_vh + dims[None, :], mask=mask)
    tl.store(K_CACHE + b * stride_kcb + slot * stride_kcs + head_ids[:, None] * stride_kch + dims[None, :], k, mask=mask)
    tl.store(V_CACHE + b * stride_vcb + slot * stride_vcs + head_ids[:, None] * stride_vch + dims[None, :], v, mask=mask)


def kv_append_fwd(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  positions: torch.Tensor) -> None:
    """Writes k, v [B, T, H, D] into k_cache, v_cache [B, S_max, H, D] at positions (int32 [B], any stride, on the
    caches' device). Shapes are assumed checked by the caller (fusedgpt.ops.kv_append)."""
    batch, tokens, heads, dim = k.shape
    if batch == 0 or tokens == 0 or heads == 0 or dim == 0:
        return
    block_d = triton.next_power_of_2(dim)
    block_h = max(1, min(triton.next_power_of_2(heads), 4096 // block_d))
    grid = (batch * tokens, triton.cdiv(heads, block_h))
    _kv_append_fwd_kernel[grid](
        k_cache, v_cache, k, v, positions,
        *k_cache.stride()[:3], *v_cache.stride()[:3], *k.stride()[:3], *v.stride()[:3], positions.stride(0),
        tokens, heads, dim, k_cache.shape[1] - tokens,
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )
