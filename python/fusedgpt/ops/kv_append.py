"""kv_append: write new keys and values into a static KV cache in place, K and V in one launch.

Contract (CONVENTIONS.md): `kv_append_reference` is the specification; `kv_append` validates, follows
`kv_append_backend` (the one decision of which backend serves a call) and runs it. GPU paths: fusedgpt::kv_append (csrc/kv_append/kv_append.cu) and
fusedgpt::kv_append_triton (triton_kernels/kv_append.py): custom ops that declare the cache mutation
in their schema (Tensor(a!)) and return nothing.

Out-of-range policy: a sequence b whose block would not fit, positions[b] < 0 or
positions[b] + T > S_max, is skipped whole on every backend (nothing of it is written, never out of
bounds). The caller learns of it
  - at once, as a ValueError, when positions is a CPU tensor (checked on the host, no device sync;
    not inside torch.compile, which cannot read values);
  - as a ValueError with check=True, which reads device positions back (one device sync: not for a
    CUDA-graph-captured step);
  - otherwise not at all from this op: a caller that keeps device positions (a captured decode step)
    owns the bound, which it knows on the host from its own lengths (the generation loop checks
    prompt length + new tokens <= S_max before it starts).
"""

from __future__ import annotations

import torch

from fusedgpt._extension import extension_available
from fusedgpt.ops._backend import BackendChoice, decide
from fusedgpt.ops._checks import (check_cache_writes, check_head_tensors, check_int32_per_sequence, check_like,
                                  check_same_heads, kernel_limits)
from fusedgpt.triton_kernels.kv_append import kv_append_fwd

Tensor = torch.Tensor


def kv_append_reference(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> None:
    """The specification: for each b with 0 <= positions[b] <= S_max - T and each t < T,
    k_cache[b, positions[b] + t] = k[b, t] and v_cache[b, positions[b] + t] = v[b, t]; other sequences are
    left untouched. Reads positions on the host; the sync-free torch backend is kv_append_torch."""
    tokens = k.shape[1]
    max_start = k_cache.shape[1] - tokens
    for b, start in enumerate(positions.tolist()):
        if tokens and 0 <= start <= max_start:
            k_cache[b, start:start + tokens] = k[b]
            v_cache[b, start:start + tokens] = v[b]


def append_index(positions: Tensor, batch: int, tokens: int, max_len: int) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """Where kv_append's torch path writes, sync-free: (the (B, 1) batch and (B, T) slot index of
    cache[index], fits (B, 1, 1, 1): whether sequence b's block fits). A sequence that does not fit is
    pointed at in-range slots, whose own contents write_rows writes back."""
    device = positions.device
    max_start = max_len - tokens
    fits = ((positions >= 0) & (positions <= max_start))[:, None, None, None]
    slots = positions.clamp(0, max_start)[:, None] + torch.arange(tokens, device=device)  # (B, T)
    return (torch.arange(batch, device=device)[:, None], slots), fits


def write_rows(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, index: tuple[Tensor, Tensor],
               fits: Tensor) -> None:
    """cache[index] = new where the block fits (else its own contents), for both caches."""
    for cache, new in ((k_cache, k), (v_cache, v)):
        cache.index_put_(index, torch.where(fits, new.to(cache.dtype), cache[index]))


def kv_append_torch(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> None:
    """The "torch" backend (kv_append's; decode_attention's torch path shares append_index and
    write_rows): the specification's writes in the fewest sync-free PyTorch ops."""
    batch, tokens = k.shape[:2]
    if batch == 0 or tokens == 0:
        return
    index, fits = append_index(positions.to(k_cache.device), batch, tokens, k_cache.shape[1])
    write_rows(k_cache, v_cache, k, v, index, fits)


@torch.library.custom_op("fusedgpt::kv_append_triton", mutates_args=("k_cache", "v_cache"))
def _kv_append_triton(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> None:
    kv_append_fwd(k_cache, v_cache, k, v, positions)


def _kv_append_fake(k_cache, v_cache, k, v, positions):
    return None


_kv_append_triton.register_fake(_kv_append_fake)
if extension_available():
    torch.library.register_fake("fusedgpt::kv_append")(_kv_append_fake)


def _check(k_cache, v_cache, k, v, positions) -> None:
    op = "kv_append"
    check_head_tensors(op, [("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)])
    check_like(op, "v_cache", v_cache, "k_cache", k_cache, shape=True)
    check_like(op, "k", k, "k_cache", k_cache)
    check_like(op, "v", v, "k", k, shape=True)
    batch, max_len = k_cache.shape[:2]
    check_same_heads(op, "k", k, "T", "k_cache", k_cache)
    tokens = k.shape[1]
    if tokens > max_len:
        raise ValueError(f"fusedgpt.ops.kv_append: the cache is too small: k has {tokens} tokens but k_cache "
                         f"holds at most {max_len}")
    check_int32_per_sequence(op, "positions", positions, batch, k_cache.device, allow_cpu=True)
    check_cache_writes(op, [("k_cache", k_cache), ("v_cache", v_cache)], [("k", k), ("v", v)])


def _check_positions_in_range(positions: Tensor, tokens: int, max_len: int) -> None:
    """Host check of the positions' values (reads them: a device sync when they live on a GPU)."""
    max_start = max_len - tokens
    bad = ((positions < 0) | (positions > max_start)).nonzero().flatten().tolist()
    if bad:
        values = positions.tolist()
        listed = ", ".join(f"positions[{b}] = {values[b]}" for b in bad[:8])
        raise ValueError(f"fusedgpt.ops.kv_append: {listed} out of range: appending {tokens} tokens to a cache "
                         f"of length {max_len} needs 0 <= positions[b] <= {max_start}")


def _checks_positions_on_host(positions: Tensor, check: bool) -> bool:
    """Whether kv_append reads positions on the host to check them (not while torch.compile traces)."""
    return not torch.compiler.is_compiling() and (check or positions.device.type == "cpu")


def _decide(k_cache: Tensor, k: Tensor, positions: Tensor, check: bool, backend: str | None,
            explain: bool = True) -> BackendChoice:
    """The decision for checked arguments (kv_append_backend's, which kv_append follows). Nothing here is
    differentiated (the torch backend, kv_append_torch, is sync-free), so autograd changes nothing."""
    if _checks_positions_on_host(positions, check):
        host_read = f"positions ({'check=True' if check else 'on the CPU'}) are checked on the host"
    elif positions.device != k_cache.device:
        host_read = f"positions on {positions.device} are copied to {k_cache.device}"
    else:
        host_read = None
    return decide("kv_append", k_cache.device, backend, unsupported=lambda: kernel_limits(k_cache), size=k.numel(),
                  autograd=False, host_read=host_read, explain=explain)


def kv_append_backend(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, positions: Tensor, *,
                      check: bool = False, backend: str | None = None) -> BackendChoice:
    """Which backend kv_append(k_cache, v_cache, k, v, positions, ...) serves this call with, why each
    other backend cannot, and whether the call is capturable in a CUDA graph (see BackendChoice): not
    when it checks positions on the host (check=True or CPU positions). The arguments are kv_append's,
    checked as it checks them; nothing runs, nothing is read."""
    _check(k_cache, v_cache, k, v, positions)
    return _decide(k_cache, k, positions, check, backend)


def kv_append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, positions: Tensor, *, check: bool = False,
              backend: str | None = None) -> None:
    """Writes k, v into the caches at positions[b] .. positions[b] + T - 1, in place, in one launch.

    k_cache, v_cache: [B, S_max, H, D]; k, v: [B, T, H, D]; all of one float dtype and device, any strides
    with unit stride on D (so [B, H, S, D] caches transposed to [B, S, H, D] work). positions: int32 [B],
    the tokens already in each sequence's cache, on the caches' device (no host sync: capturable in a
    CUDA graph) or on the CPU (checked on the host, then copied). Returns nothing. The caches must own
    their memory (an expanded cache is refused) and k, v must not share memory with them (refused: the
    kernels read and write in one pass); both checks read only pointers and strides.
    A sequence that would not fit is skipped whole; see the module docstring for how the caller learns
    of it (CPU positions or check=True raise ValueError). kv_append_backend(...) says which backend a
    call gets, why, and whether it is capturable."""
    _check(k_cache, v_cache, k, v, positions)
    tokens, max_len = k.shape[1], k_cache.shape[1]
    if torch.compiler.is_compiling() and check:  # a traced graph cannot read values: the kernels' skip holds
        raise ValueError("fusedgpt.ops.kv_append: check=True reads positions on the host and cannot be "
                         "traced by torch.compile; check before the compiled region")
    if _checks_positions_on_host(positions, check):
        _check_positions_in_range(positions, tokens, max_len)
    chosen = _decide(k_cache, k, positions, check, backend, explain=False).backend
    positions = positions.to(k_cache.device)
    if chosen == "torch":
        kv_append_torch(k_cache, v_cache, k, v, positions)
    elif chosen == "cuda":
        torch.ops.fusedgpt.kv_append(k_cache, v_cache, k, v, positions)
    else:
        _kv_append_triton(k_cache, v_cache, k, v, positions)
