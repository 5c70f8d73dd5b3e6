"""decode_attention: attention of a few new tokens per sequence over a static KV cache, with the
KV-cache append fused into the same launch, split along the keys so a single long sequence fills the GPU.

Contract (CONVENTIONS.md): `decode_attention_reference` is the specification; `decode_attention`
validates, follows `decode_attention_backend` (the one decision of which backend serves a call, which
the generation loop also asks whether its decode step can be captured) and runs it. What each backend
supports: fusedgpt.ops._limits. GPU paths, custom ops that declare the cache mutation:
    fusedgpt::decode_attention          hand-written CUDA (csrc/decode_attention/)
    fusedgpt::decode_attention_triton   Triton (triton_kernels/decode_attention.py)
Both take the number of key splits from the host (fusedgpt.triton_kernels.decode_attention.choose_splits).

Out-of-range policy (as kv_append): new tokens that would not fit (cache_lens[b] + T > S_max) are not
written, but are still attended to. The caller learns of it as a ValueError when cache_lens is a CPU
tensor, or with check=True (one device sync); inside a captured step the caller owns the bound.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedgpt._extension import extension_available
from fusedgpt.ops._backend import BackendChoice, decide
from fusedgpt.ops._checks import (check_cache_writes, check_head_tensors, check_int32_per_sequence, check_like,
                                  check_same_heads, check_window_and_scale, needs_autograd)
from fusedgpt.ops._limits import CUDA_DECODE_ATTENTION_DTYPES, MAX_NEW_TOKENS
from fusedgpt.ops.attention import (attention_kernel_limits, attention_reference, default_scale, torch_dtypes,
                                    visible_positions)
from fusedgpt.ops.kv_append import kv_append_reference
from fusedgpt.triton_kernels.decode_attention import choose_splits, decode_attention_fwd

Tensor = torch.Tensor


def decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, *,
                               k: Tensor | None = None, v: Tensor | None = None, window: int | None = None,
                               scale: float | None = None, kv_start: Tensor | None = None) -> Tensor:
    """The specification (reads cache_lens on the host). Sequence b's keys are the cache's first
    cache_lens[b] entries followed, when k and v are given, by the T new tokens, which are also written
    into the caches at cache_lens[b] .. cache_lens[b] + T - 1 if they fit. The T queries are the last T
    positions of that sequence, causal among themselves; window and kv_start as in attention_reference."""
    batch, tokens = q.shape[:2]
    max_len = k_cache.shape[1]
    lengths = cache_lens.tolist()
    starts = kv_start.tolist() if kv_start is not None else [0] * batch
    outputs = []
    for b in range(batch):
        cached = min(max(lengths[b], 0), max_len)
        keys, values = k_cache[b:b + 1, :cached], v_cache[b:b + 1, :cached]  # (1, cached, H, D)
        if k is not None:
            keys, values = torch.cat([keys, k[b:b + 1]], dim=1), torch.cat([values, v[b:b + 1]], dim=1)
        missing = max(tokens - keys.shape[1], 0)  # queries before the sequence start see nothing
        if missing:
            keys = torch.cat([keys.new_zeros(1, missing, *keys.shape[2:]), keys], dim=1)
            values = torch.cat([values.new_zeros(1, missing, *values.shape[2:]), values], dim=1)
        start = torch.tensor([max(starts[b] + missing, missing)], dtype=torch.int32)
        outputs.append(attention_reference(q[b:b + 1], keys, values, causal=True, window=window, scale=scale,
                                           kv_start=start))
    if k is not None:
        kv_append_reference(k_cache, v_cache, k, v, cache_lens)
    if not outputs:  # an empty batch
        return q.new_empty(q.shape)
    return torch.cat(outputs, dim=0)  # (B, T, H, D)


@torch.library.custom_op("fusedgpt::decode_attention_triton", mutates_args=("k_cache", "v_cache"))
def _decode_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, k: Tensor | None,
                             v: Tensor | None, window: int | None, scale: float, kv_start: Tensor | None,
                             num_splits: int | None) -> Tensor:
    return decode_attention_fwd(q, k_cache, v_cache, cache_lens, k, v, window, scale, kv_start, num_splits)


@_decode_attention_triton.register_fake
def _decode_attention_fake(q, k_cache, v_cache, cache_lens, k, v, window, scale, kv_start, num_splits):
    return q.new_empty(q.shape)


_CUDA_OP_BUILT = extension_available() and hasattr(torch.ops.fusedgpt, "decode_attention")
if _CUDA_OP_BUILT:
    torch.library.register_fake("fusedgpt::decode_attention")(_decode_attention_fake)

SPLIT_GRANULE = 64  # keys: a split never gets less than this (see choose_splits)


def _decode_attention_torch(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, k: Tensor | None,
                            v: Tensor | None, window: int | None, scale: float, kv_start: Tensor | None) -> Tensor:
    """The "torch" backend: torch's scaled_dot_product_attention over the cache followed by the new tokens
    (read from k, v themselves, so a block that does not fit is still attended to), with the specification's
    visibility computed on the device; then the append, by kv_append's reference. It reads nothing back to
    the host, so a decode step on it can be traced or captured."""
    batch, tokens = q.shape[:2]
    max_len = k_cache.shape[1]
    if batch == 0:
        return q.new_empty(q.shape)
    device = q.device
    cached = cache_lens.to(device=device, dtype=torch.int64).clamp(0, max_len)  # (B,) corrupt lengths clamped
    steps = torch.arange(tokens, device=device)
    key_pos = torch.arange(max_len, device=device).expand(batch, max_len)  # (B, S_max): cache slot j is position j
    filled = key_pos < cached[:, None]
    # Slots past a sequence's length may hold anything (NaN in a fresh cache); a NaN score stays NaN under
    # the mask and a zero weight times NaN is NaN, so those keys and values are zeroed, not only masked.
    keys, values = (torch.where(filled[:, :, None, None], cache, 0.0) for cache in (k_cache, v_cache))
    if k is not None:  # the new tokens at positions cached + t
        key_pos = torch.cat([key_pos, cached[:, None] + steps], dim=1)  # (B, S_max + T)
        filled = torch.cat([filled, filled.new_ones(batch, tokens)], dim=1)
        keys, values = torch.cat([keys, k], dim=1), torch.cat([values, v], dim=1)
    query_pos = (cached[:, None] + (tokens if k is not None else 0) - tokens + steps)[:, :, None]  # (B, T, 1)
    first_key = kv_start.to(device=device, dtype=torch.int64)[:, None, None] if kv_start is not None else None
    mask = filled[:, None, :] & visible_positions(query_pos, key_pos[:, None, :], causal=True, window=window,
                                                  first_key=first_key)  # (B, T, K)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask[:, None], scale=scale)  # (B, H, T, D)
    out = torch.where(mask.any(dim=-1)[:, None, :, None], out, 0.0)  # no visible key: zeros
    if k is not None:
        kv_append_reference(k_cache, v_cache, k, v, cache_lens)
    return out.transpose(1, 2).contiguous()  # (B, T, H, D)


def _check(q, k_cache, v_cache, cache_lens, k, v, window, scale, kv_start) -> None:
    op = "decode_attention"
    tensors = [("q", q), ("k_cache", k_cache), ("v_cache", v_cache)]
    if (k is None) != (v is None):
        raise ValueError("fusedgpt.ops.decode_attention: give both k and v (to append), or neither")
    if k is not None:
        tensors += [("k", k), ("v", v)]
    check_head_tensors(op, tensors)
    for name, tensor in tensors:
        check_like(op, name, tensor, "q", q)
    check_like(op, "v_cache", v_cache, "k_cache", k_cache, shape=True)
    batch, tokens = q.shape[:2]
    check_same_heads(op, "k_cache", k_cache, "S_max", "q", q)
    if not 1 <= tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"fusedgpt.ops.decode_attention: q must hold 1 to {MAX_NEW_TOKENS} tokens per sequence, "
                         f"got {tokens} (use fusedgpt.ops.attention for prompts)")
    if k is not None:
        check_like(op, "k", k, "q", q, shape=True)
        check_like(op, "v", v, "q", q, shape=True)
        if tokens > k_cache.shape[1]:
            raise ValueError(f"fusedgpt.ops.decode_attention: the cache is too small: {tokens} new tokens, "
                             f"k_cache holds at most {k_cache.shape[1]}")
    for name, lengths in (("cache_lens", cache_lens), ("kv_start", kv_start)):
        if lengths is not None:
            check_int32_per_sequence(op, name, lengths, batch, q.device, allow_cpu=True)
    check_window_and_scale(op, window, scale)
    if k is not None:
        check_cache_writes(op, [("k_cache", k_cache), ("v_cache", v_cache)], [("k", k), ("v", v), ("q", q)])


def _check_lengths_in_range(cache_lens: Tensor, tokens: int, max_len: int, appending: bool) -> None:
    """Host check of cache_lens (reads them: a device sync when they live on a GPU)."""
    limit = max_len - tokens if appending else max_len
    bad = ((cache_lens < 0) | (cache_lens > limit)).nonzero().flatten().tolist()
    if bad:
        values = cache_lens.tolist()
        listed = ", ".join(f"cache_lens[{b}] = {values[b]}" for b in bad[:8])
        need = f"appending {tokens} tokens to a cache of length {max_len} needs" if appending else "needs"
        raise ValueError(f"fusedgpt.ops.decode_attention: {listed} out of range: {need} "
                         f"0 <= cache_lens[b] <= {limit}")


def _checks_lengths_on_host(cache_lens: Tensor, check: bool) -> bool:
    """Whether decode_attention reads cache_lens on the host to check them (not while torch.compile traces)."""
    return not torch.compiler.is_compiling() and (check or cache_lens.device.type == "cpu")


def _decide(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, k: Tensor | None, v: Tensor | None,
            kv_start: Tensor | None, check: bool, backend: str | None) -> BackendChoice:
    """The decision for checked arguments (decode_attention_backend's, which decode_attention follows)."""
    unsupported = attention_kernel_limits(q, (q, k_cache, v_cache, k, v), cuda_op_built=_CUDA_OP_BUILT,
                                          cuda_dtypes=torch_dtypes(CUDA_DECODE_ATTENTION_DTYPES))
    if _checks_lengths_on_host(cache_lens, check):
        host_read = f"cache_lens ({'check=True' if check else 'on the CPU'}) are checked on the host"
    elif any(t is not None and t.device != q.device for t in (cache_lens, kv_start)):
        host_read = f"cache_lens or kv_start are copied from the CPU to {q.device}"
    else:
        host_read = None
    return decide("decode_attention", q.device, backend, unsupported=unsupported, size=k_cache.numel(),
                  autograd=needs_autograd(q, k, v), host_read=host_read,
                  reference_host_read="it needs autograd: decode_attention_reference reads cache_lens on the host")


def decode_attention_backend(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, *,
                             k: Tensor | None = None, v: Tensor | None = None, window: int | None = None,
                             scale: float | None = None, kv_start: Tensor | None = None, check: bool = False,
                             backend: str | None = None, num_splits: int | None = None) -> BackendChoice:
    """Which backend decode_attention(q, k_cache, v_cache, cache_lens, ...) serves this call with, why each
    other backend cannot, and whether the call is capturable in a CUDA graph (see BackendChoice): not when
    it checks cache_lens on the host (check=True or CPU lengths), copies CPU lengths over, or needs
    autograd (the reference reads the lengths on the host); BackendChoice.host_read says which. The
    arguments are decode_attention's, checked as it checks them; nothing runs, nothing is read."""
    _check(q, k_cache, v_cache, cache_lens, k, v, window, scale, kv_start)
    _check_num_splits(num_splits)
    return _decide(q, k_cache, v_cache, cache_lens, k, v, kv_start, check, backend)


def _check_num_splits(num_splits) -> None:
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= 1024):
        raise ValueError(f"fusedgpt.ops.decode_attention: num_splits must be an int in [1, 1024] or None, "
                         f"got {num_splits!r}")


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, *, k: Tensor | None = None,
                     v: Tensor | None = None, window: int | None = None, scale: float | None = None,
                     kv_start: Tensor | None = None, check: bool = False, backend: str | None = None,
                     num_splits: int | None = None) -> Tensor:
    """Attention of T new tokens per sequence over the KV cache, with the append fused in.

    q [B, T, H, D], 1 <= T <= 16; k_cache, v_cache [B, S_max, H, D]; any strides with unit stride on D
    ([B, H, S, D] caches viewed as [B, S, H, D] work). cache_lens int32 [B]: tokens already cached when
    the call begins. k, v [B, T, H, D] (optional): written into the caches at cache_lens[b] ..
    cache_lens[b] + T - 1 by the same launch and attended to; the caller advances cache_lens afterwards.
    The queries are the last T positions of the resulting sequence, causal among themselves. window=W:
    a query at position p sees keys in (p - W, p] only, and only those are read. kv_start int32 [B]: keys
    before it are padding. scale defaults to D^-0.5. Returns a contiguous [B, T, H, D].
    No host synchronisation on the device path (launch shape from host values only), so a decode step is
    capturable in a CUDA graph and replayable with new cache_lens kept on the device.
    num_splits overrides the number of key splits (for tests and tuning). decode_attention_backend(...)
    says which backend a call gets, why, and whether it is capturable."""
    _check(q, k_cache, v_cache, cache_lens, k, v, window, scale, kv_start)
    _check_num_splits(num_splits)
    tokens, max_len = q.shape[1], k_cache.shape[1]
    if _checks_lengths_on_host(cache_lens, check):
        _check_lengths_in_range(cache_lens, tokens, max_len, appending=k is not None)
    chosen = _decide(q, k_cache, v_cache, cache_lens, k, v, kv_start, check, backend).backend
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    cache_lens = cache_lens.to(q.device)
    kv_start = kv_start.to(q.device) if kv_start is not None else None
    if chosen == "reference":
        return decode_attention_reference(q, k_cache, v_cache, cache_lens, k=k, v=v, window=window, scale=scale,
                                          kv_start=kv_start)
    if chosen == "torch":
        return _decode_attention_torch(q, k_cache, v_cache, cache_lens, k, v, window, scale, kv_start)
    if chosen == "cuda":
        batch, tokens, heads = q.shape[:3]
        key_range = (min(max_len, window) if window is not None else max_len) + tokens
        splits = num_splits or choose_splits(batch * heads * tokens, key_range, SPLIT_GRANULE, q.device)
        return torch.ops.fusedgpt.decode_attention(q, k_cache, v_cache, cache_lens, k, v, window, scale, kv_start,
                                                   splits)
    return _decode_attention_triton(q, k_cache, v_cache, cache_lens, k, v, window, scale, kv_start, num_splits)
