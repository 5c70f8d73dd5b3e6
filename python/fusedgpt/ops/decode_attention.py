"""decode_attention: attention of a few new tokens per sequence over a static KV cache, with the
KV-cache append fused into the same launch, split along the keys so a single long sequence fills the GPU.

Contract (CONVENTIONS.md): `decode_attention_reference` is the specification; `decode_attention`
validates, follows `decode_attention_backend` (the one decision of which backend serves a call, which
the generation loop also asks whether its decode step can be captured) and runs it. What each backend
supports: fusedgpt.ops._limits. GPU paths, custom ops that declare the cache mutation:
    fusedgpt::decode_attention          hand-written CUDA (csrc/decode_attention/)
    fusedgpt::decode_attention_triton   Triton (triton_kernels/decode_attention.py)
Key splits: the Triton kernel's from the host (fusedgpt.triton_kernels.decode_attention.choose_splits); the
CUDA op, given num_splits = 0, sizes them itself from its kernel's occupancy and the SM count.

Out-of-range policy (as kv_append): new tokens that would not fit (cache_lens[b] + T > S_max) are not
written, but are still attended to. The caller learns of it as a ValueError when cache_lens is a CPU
tensor, or with check=True (one device sync); inside a captured step the caller owns the bound.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fusedgpt._extension import extension_available
from fusedgpt.ops._backend import BackendChoice, decide
from fusedgpt.ops._checks import (check_cache_writes, check_head_tensors, check_int32_per_sequence, check_like,
                                  check_same_heads, check_window_and_scale, needs_autograd)
from fusedgpt.ops._limits import CUDA_DECODE_ATTENTION_DTYPES, MAX_NEW_TOKENS
from fusedgpt.ops.attention import (attention_kernel_limits, attention_reference, default_scale, torch_dtypes,
                                    visible_positions)
from fusedgpt.ops.kv_append import append_index, kv_append_reference, write_rows
from fusedgpt.triton_kernels.decode_attention import decode_attention_fwd

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


class _Visibility(NamedTuple):
    """The torch path's index work for one step, shared by every layer's call (see DecodeAttentionPlan):
    slots: how many cache slots take part (the first ones); rows (B * K,): the gather of key/value rows out
    of [those slots; new tokens] (K per sequence), None to read them as they are; mask (B or 1, 1, T, K)
    or None (every query sees every key); seen (B, 1, T, 1): whether a query sees any key (None: each sees
    one); append: kv_append's (index, fits) for the write after attending, or None; length: when every
    sequence has this one length, known on the host, the new tokens are written into slots
    length .. length + T - 1 first and the first `slots` = length + T are the keys (else None)."""

    slots: int
    rows: Tensor | None
    mask: Tensor | None
    seen: Tensor | None
    append: tuple | None
    length: int | None = None


def _torch_visibility(cache_lens: Tensor, kv_start: Tensor | None, max_len: int, tokens: int, appending: bool,
                      window: int | None, used: int | None = None) -> _Visibility:
    """The specification's visibility for the torch path, computed on the device (no host reads). Keys:
    the cache's first `used` slots (slot j is position j, filled below cache_lens[b]; None: all S_max of
    them, the bound when the lengths are known only on the device), then the T new tokens at positions
    cached + t when appending. A slot past a sequence's length may hold anything (NaN in a fresh cache): a
    NaN score stays NaN under the mask and a zero weight times NaN is NaN, so no such slot is read: its
    row in the gather is a filled one (the stand-in), which the mask hides."""
    batch, device = cache_lens.shape[0], cache_lens.device
    used = max_len if used is None else used
    cached = cache_lens.clamp(0, max_len)[:, None]  # (B, 1); corrupt lengths clamped
    steps = torch.arange(tokens, device=device)  # (T,)
    if appending:
        slots = torch.arange(used + tokens, device=device)  # (K,), K = used + T
        is_new = slots >= used
        key_pos = torch.where(is_new, slots + (cached - used), slots)  # (B, K)
        filled = is_new | (slots < cached)  # (B, K)
        query_pos, stand_in = cached + steps, used  # (B, T); the first new token is always filled
    else:
        slots = key_pos = torch.arange(used, device=device)  # (K,), K = used
        filled = slots < cached  # (B, K)
        query_pos, stand_in = cached - tokens + steps, 0  # slot 0 is filled whenever a query sees a key
    num_keys = slots.shape[0]
    rows = (torch.where(filled, slots, stand_in)
            + torch.arange(0, batch * num_keys, num_keys, device=device)[:, None]).flatten()  # (B * K,)
    first_key = kv_start[:, None, None] if kv_start is not None else None
    mask = filled[:, None, :] & visible_positions(query_pos[:, :, None], key_pos[..., None, :], causal=True,
                                                  window=window, first_key=first_key)  # (B, T, K)
    seen = mask.any(dim=-1)[:, None, :, None] if kv_start is not None or not appending else None
    append = append_index(cache_lens, batch, tokens, max_len) if appending else None
    return _Visibility(used, rows, mask[:, None], seen, append)


def _host_visibility(lengths: list[int], starts: list[int] | None, kv_start: Tensor | None, tokens: int,
                     window: int | None, device: torch.device) -> _Visibility | None:
    """The visibility of an appending step whose lengths were read on the host (CPU lengths, or check=True:
    decode_attention reads them to check them), when every sequence has the same length L (one sequence
    always does): the cache slots 0 .. L - 1 are all filled and in range, so the new tokens go straight into
    slots L .. L + T - 1 and the keys are the first L + T slots, read in place, as transformers' own cache
    is; a mask only where padding (kv_start, on the host as `starts` or on the device), the window or the
    causal order of several new tokens hides a key. None when the lengths differ (_torch_visibility)."""
    length = lengths[0]
    if any(other != length for other in lengths):
        return None
    keys = length + tokens
    padded = kv_start is not None and (starts is None or any(start > 0 for start in starts))
    if tokens == 1 and not padded and (window is None or window >= keys):
        return _Visibility(keys, None, None, None, None, length)
    first_key = kv_start[:, None, None] if padded else None  # (B, 1, 1), on the device already
    mask = visible_positions(length + torch.arange(tokens, device=device)[:, None], torch.arange(keys, device=device),
                             causal=True, window=window, first_key=first_key)  # (B or 1... , T, K)
    mask = mask.view(-1, 1, tokens, keys)  # (B or 1, 1, T, K)
    # Each query sees itself (key L + t) unless padding starts after it.
    blind = padded and (starts is None or any(start > length for start in starts))
    return _Visibility(keys, None, mask, mask.any(dim=-1, keepdim=True) if blind else None, None, length)


def _decode_attention_torch(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, k: Tensor | None,
                            v: Tensor | None, window: int | None, scale: float, kv_start: Tensor | None,
                            visibility: _Visibility | None = None) -> Tensor:
    """The "torch" backend: torch's scaled_dot_product_attention over the cache's slots followed by the new
    tokens (read from k, v themselves, so a block that does not fit is still attended to), with the
    specification's visibility (_torch_visibility, or the step's, computed once); then the append by
    kv_append's torch path. It reads nothing back to the host, so a decode step on it can be traced or
    captured."""
    batch = q.shape[0]
    if batch == 0:
        return q.new_empty(q.shape)
    if visibility is None:
        visibility = _torch_visibility(cache_lens.to(q.device), kv_start.to(q.device) if kv_start is not None
                                       else None, k_cache.shape[1], q.shape[1], k is not None, window)
    if visibility.length is not None:  # the new tokens go in first: the keys are the cache's slots as they are
        length = visibility.length
        k_cache[:, length:length + k.shape[1]] = k
        v_cache[:, length:length + v.shape[1]] = v
    keys, values = k_cache[:, :visibility.slots], v_cache[:, :visibility.slots]
    if k is not None and visibility.length is None:
        keys, values = torch.cat([keys, k], dim=1), torch.cat([values, v], dim=1)
    if visibility.rows is not None:
        keys, values = (t.reshape(-1, *t.shape[2:]).index_select(0, visibility.rows).view(t.shape)
                        for t in (keys, values))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=visibility.mask, scale=scale)  # (B, H, T, D)
    if visibility.seen is not None:  # a query that sees no key: zeros
        out = torch.where(visibility.seen, out, 0.0)
    if visibility.append is not None:
        write_rows(k_cache, v_cache, k, v, *visibility.append)
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


def _check_lengths_in_range(cache_lens: Tensor, tokens: int, max_len: int, appending: bool) -> list[int]:
    """Host check of cache_lens (reads them: a device sync when they live on a GPU); returns their values."""
    limit = max_len - tokens if appending else max_len
    values = cache_lens.tolist()
    bad = [b for b, value in enumerate(values) if not 0 <= value <= limit]
    if bad:
        listed = ", ".join(f"cache_lens[{b}] = {values[b]}" for b in bad[:8])
        need = f"appending {tokens} tokens to a cache of length {max_len} needs" if appending else "needs"
        raise ValueError(f"fusedgpt.ops.decode_attention: {listed} out of range: {need} "
                         f"0 <= cache_lens[b] <= {limit}")
    return values


def _checks_lengths_on_host(cache_lens: Tensor, check: bool) -> bool:
    """Whether decode_attention reads cache_lens on the host to check them (not while torch.compile traces)."""
    return not torch.compiler.is_compiling() and (check or cache_lens.device.type == "cpu")


def _decide(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, k: Tensor | None, v: Tensor | None,
            kv_start: Tensor | None, check: bool, backend: str | None, explain: bool = True) -> BackendChoice:
    """The decision for checked arguments (decode_attention_backend's, which decode_attention follows)."""
    def unsupported():
        return attention_kernel_limits(q, (q, k_cache, v_cache, k, v), cuda_op_built=_CUDA_OP_BUILT,
                                       cuda_dtypes=torch_dtypes(CUDA_DECODE_ATTENTION_DTYPES))
    if _checks_lengths_on_host(cache_lens, check):
        host_read = f"cache_lens ({'check=True' if check else 'on the CPU'}) are checked on the host"
    elif any(t is not None and t.device != q.device for t in (cache_lens, kv_start)):
        host_read = f"cache_lens or kv_start are copied from the CPU to {q.device}"
    else:
        host_read = None
    return decide("decode_attention", q.device, backend, unsupported=unsupported, size=k_cache.numel(),
                  autograd=needs_autograd(q, k, v), host_read=host_read, explain=explain,
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


def _layout(tensor: Tensor | None):
    """What a plan's checks and decision read of a tensor (shape, strides, dtype, device, 16-byte
    alignment, whether it needs autograd), for DecodeAttentionPlan.run's match."""
    if tensor is None:
        return None
    alignment = None if torch.compiler.is_compiling() else tensor.data_ptr() % 16  # traced tensors have no memory
    return tensor.shape, tensor.stride(), tensor.dtype, tensor.device, alignment, tensor.requires_grad


class DecodeAttentionPlan:
    """decode_attention split in two, as FlashInfer's decode wrappers split plan() and run(): the checks,
    the backend decision, the host check of the lengths and the torch path's index work happen once per
    decode step in decode_attention_plan(...); plan.run(...) then serves every layer's call of that step,
    whose tensors have the planned layout (same shape, strides, dtype, device and alignment: each layer's
    caches and projections, as a model lays them out) but may differ from layer to layer, and checks only
    that, and that k and v do not overlap the caches. Made for one step: cache_lens and kv_start must not
    change until its last run (the torch path has read them on the device)."""

    def __init__(self, q, k_cache, v_cache, cache_lens, k, v, window, kv_start, backend, num_splits, lengths=None):
        self.backend, self.window, self.num_splits = backend, window, num_splits
        if backend == "cuda" and num_splits is None:  # 0: the CUDA op sizes its splits from occupancy
            self.num_splits = 0
        self.cache_lens = cache_lens.to(q.device)
        self.kv_start = kv_start.to(q.device) if kv_start is not None else None
        self.layout = None  # set by decode_attention_plan (the one-shot decode_attention runs no match)
        self.visibility = None
        if backend == "torch" and q.shape[0]:
            # Lengths read on the host anyway (CPU lengths, or check=True) bound the slots that take part.
            if lengths is not None and k is not None:
                starts = kv_start.tolist() if kv_start is not None and kv_start.device.type == "cpu" else None
                self.visibility = _host_visibility(lengths, starts, self.kv_start, q.shape[1], window, q.device)
            if self.visibility is None:
                used = None if lengths is None else max(max(lengths), 0 if k is not None else 1)
                self.visibility = _torch_visibility(self.cache_lens, self.kv_start, k_cache.shape[1], q.shape[1],
                                                    k is not None, window, used)

    def run(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor | None = None, v: Tensor | None = None, *,
            scale: float | None = None) -> Tensor:
        """decode_attention(q, k_cache, v_cache, cache_lens, k=k, v=v, window, scale, kv_start, ...) with the
        plan's lengths, window and backend; a tensor whose layout differs from the planned one is a
        ValueError naming it (make a plan for it)."""
        for name, tensor, planned in zip(("q", "k_cache", "v_cache", "k", "v"), (q, k_cache, v_cache, k, v),
                                         self.layout):
            if (tensor is None) != (planned is None) or (tensor is not None and _layout(tensor) != planned):
                got = "None" if tensor is None else f"shape {tuple(tensor.shape)}, strides {tensor.stride()}, {tensor.dtype}"
                raise ValueError(f"fusedgpt.ops.DecodeAttentionPlan.run: {name} does not have the planned layout "
                                 f"({got}); make a plan for it with decode_attention_plan")
        check_window_and_scale("decode_attention", None, scale)
        if k is not None:
            check_cache_writes("decode_attention", [("k_cache", k_cache), ("v_cache", v_cache)],
                               [("k", k), ("v", v), ("q", q)])
        return self._run(q, k_cache, v_cache, k, v, scale)

    def _run(self, q, k_cache, v_cache, k, v, scale) -> Tensor:
        """The planned call on checked tensors."""
        scale = default_scale(q.shape[-1]) if scale is None else float(scale)
        cache_lens, kv_start, window = self.cache_lens, self.kv_start, self.window
        if self.backend == "reference":
            return decode_attention_reference(q, k_cache, v_cache, cache_lens, k=k, v=v, window=window,
                                              scale=scale, kv_start=kv_start)
        if self.backend == "torch":
            return _decode_attention_torch(q, k_cache, v_cache, cache_lens, k, v, window, scale, kv_start,
                                           self.visibility)
        if self.backend == "cuda":
            return torch.ops.fusedgpt.decode_attention(q, k_cache, v_cache, cache_lens, k, v, window, scale,
                                                       kv_start, self.num_splits)
        return _decode_attention_triton(q, k_cache, v_cache, cache_lens, k, v, window, scale, kv_start,
                                        self.num_splits)


def _plan(q, k_cache, v_cache, cache_lens, k, v, window, scale, kv_start, check, backend,
          num_splits) -> DecodeAttentionPlan:
    _check(q, k_cache, v_cache, cache_lens, k, v, window, scale, kv_start)
    _check_num_splits(num_splits)
    lengths = None
    if _checks_lengths_on_host(cache_lens, check):
        lengths = _check_lengths_in_range(cache_lens, q.shape[1], k_cache.shape[1], appending=k is not None)
    chosen = _decide(q, k_cache, v_cache, cache_lens, k, v, kv_start, check, backend, explain=False).backend
    return DecodeAttentionPlan(q, k_cache, v_cache, cache_lens, k, v, window, kv_start, chosen, num_splits,
                               lengths)


def decode_attention_plan(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, *,
                          k: Tensor | None = None, v: Tensor | None = None, window: int | None = None,
                          kv_start: Tensor | None = None, check: bool = False, backend: str | None = None,
                          num_splits: int | None = None) -> DecodeAttentionPlan:
    """The plan of a decode step's decode_attention calls (see DecodeAttentionPlan), made from one of
    them: the arguments are decode_attention's (less scale, which each run takes), checked and decided
    as it checks and decides them."""
    plan = _plan(q, k_cache, v_cache, cache_lens, k, v, window, None, kv_start, check, backend, num_splits)
    plan.layout = tuple(_layout(t) for t in (q, k_cache, v_cache, k, v))
    return plan


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
    says which backend a call gets, why, and whether it is capturable; decode_attention_plan(...) makes
    the checks and decisions once for the calls of every layer of a decode step."""
    plan = _plan(q, k_cache, v_cache, cache_lens, k, v, window, scale, kv_start, check, backend, num_splits)
    return plan._run(q, k_cache, v_cache, k, v, scale)
