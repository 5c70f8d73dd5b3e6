"""Argument checks shared by the public ops: each error names the op, the argument, what was expected
and what was received (TypeError for a wrong type or dtype, ValueError for a wrong value or shape)."""

from __future__ import annotations

import math

import torch

from fusedgpt.ops._backend import triton_interpreter_enabled

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(op: str, name: str, value, *, rank: int | None = None, min_rank: int | None = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"fusedgpt.ops.{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if rank is not None and value.dim() != rank:
        raise ValueError(f"fusedgpt.ops.{op}: {name} must have rank {rank}, got shape {tuple(value.shape)}")
    if min_rank is not None and value.dim() < min_rank:
        raise ValueError(f"fusedgpt.ops.{op}: {name} must have rank >= {min_rank}, got shape {tuple(value.shape)}")


def check_float(op: str, name: str, value: torch.Tensor, *, also_float64: bool = True) -> None:
    """float16/bfloat16/float32 (float64 too for the reference path, which the tests use)."""
    allowed = FLOAT_DTYPES + ((torch.float64,) if also_float64 else ())
    if value.dtype not in allowed:
        raise TypeError(f"fusedgpt.ops.{op}: {name} must be one of {[str(d) for d in allowed]}, got {value.dtype}")


def check_like(op: str, name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor, *,
               shape: bool = False) -> None:
    """Same dtype and device as `ref` (and the same shape when `shape`)."""
    if value.dtype != ref.dtype:
        raise TypeError(f"fusedgpt.ops.{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {value.dtype}")
    if value.device != ref.device:
        raise ValueError(f"fusedgpt.ops.{op}: {name} must be on the device of {ref_name} ({ref.device}), "
                         f"got {value.device}")
    if shape and value.shape != ref.shape:
        raise ValueError(f"fusedgpt.ops.{op}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                         f"got {tuple(value.shape)}")


def check_vector(op: str, name: str, value, length: int, ref_name: str, ref: torch.Tensor) -> None:
    """An optional per-channel parameter: None, or shape [length] with ref's dtype and device."""
    if value is None:
        return
    check_tensor(op, name, value)
    if value.shape != (length,):
        raise ValueError(f"fusedgpt.ops.{op}: {name} must have shape [{length}] (the last dim of {ref_name}), "
                         f"got {tuple(value.shape)}")
    check_like(op, name, value, ref_name, ref)


def check_unit_last_stride(op: str, name: str, value: torch.Tensor) -> None:
    if value.dim() >= 1 and value.stride(-1) != 1 and value.shape[-1] != 1:
        raise ValueError(f"fusedgpt.ops.{op}: {name} must have a contiguous last dimension (stride 1), "
                         f"got strides {value.stride()}")


def needs_autograd(*tensors) -> bool:
    """The kernels are inference-only: calls that must be differentiated take the reference."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


INTERPRETER_BFLOAT16 = ("Triton's interpreter (TRITON_INTERPRET=1) gets bfloat16 wrong (tl.dot is off by orders "
                       "of magnitude, stores truncate instead of rounding); bfloat16 CPU tensors use the reference")


def kernel_limits(x: torch.Tensor) -> dict[str, str]:
    """What the cuda and triton kernels cannot serve for input x (the reference serves everything)."""
    if x.dtype == torch.float64:
        reason = "the kernels take float16, bfloat16 or float32, got float64"
        return {"cuda": reason, "triton": reason}
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and triton_interpreter_enabled():
        return {"triton": INTERPRETER_BFLOAT16}
    return {}


def check_int32_per_sequence(op: str, name: str, value, batch: int, device: torch.device, *,
                             allow_cpu: bool) -> None:
    """An int32 [B] tensor of per-sequence positions or lengths, on `device` (or on the CPU if allowed)."""
    check_tensor(op, name, value, rank=1)
    if value.dtype != torch.int32:
        raise TypeError(f"fusedgpt.ops.{op}: {name} must be int32, got {value.dtype}")
    if value.shape[0] != batch:
        raise ValueError(f"fusedgpt.ops.{op}: {name} must have shape [{batch}] (one per sequence), "
                         f"got {tuple(value.shape)}")
    if value.device != device and not (allow_cpu and value.device.type == "cpu"):
        where = f"on the CPU or on {device}" if allow_cpu else f"on {device}"
        raise ValueError(f"fusedgpt.ops.{op}: {name} must be {where}, got {value.device}")


def check_window_and_scale(op: str, window, scale) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"fusedgpt.ops.{op}: window must be a positive int or None, got {window!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"fusedgpt.ops.{op}: scale must be a number or None, got {type(scale).__name__}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"fusedgpt.ops.{op}: scale must be finite, got {scale}")


def check_head_tensors(op: str, named: list[tuple[str, torch.Tensor]]) -> None:
    """[B, S, H, D] tensors of the attention-side ops: rank 4, float, unit stride on D."""
    for name, tensor in named:
        check_tensor(op, name, tensor, rank=4)
        check_float(op, name, tensor)
        check_unit_last_stride(op, name, tensor)
        if tensor.shape[2] == 0 or tensor.shape[3] == 0:
            raise ValueError(f"fusedgpt.ops.{op}: {name} must have at least one head of at least one channel "
                             f"([B, S, H, D] with H, D >= 1), got shape {tuple(tensor.shape)}")


def check_same_heads(op: str, name: str, value: torch.Tensor, seq: str, ref_name: str, ref: torch.Tensor) -> None:
    """value [B, <seq>, H, D] with ref's B, H and D (its sequence length may differ)."""
    batch, _, heads, dim = ref.shape
    if (value.shape[0], value.shape[2], value.shape[3]) != (batch, heads, dim):
        raise ValueError(f"fusedgpt.ops.{op}: {name} must have shape [B, {seq}, H, D] = [{batch}, {seq}, {heads}, "
                         f"{dim}] to match {ref_name}, got {tuple(value.shape)}")


def _byte_range(tensor: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) bytes the tensor's elements occupy (non-negative strides: torch has no others)."""
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr(), tensor.data_ptr() + (last + 1) * tensor.element_size()


def overlaps_itself(tensor: torch.Tensor) -> bool:
    """Whether two elements of the tensor may share memory: an expanded (stride 0) dim, or strides that
    interleave. Exact for every layout made by expand, view, transpose, slicing and unfold-free as_strided
    with sorted-nesting strides; conservative (True) for exotic as_strided views."""
    extent = 1
    for stride, size in sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size > 1):
        if stride < extent:
            return True
        extent += (size - 1) * stride
    return False


def check_cache_writes(op: str, caches: list[tuple[str, torch.Tensor]], news: list[tuple[str, torch.Tensor]]) -> None:
    """The caches an op writes in place own their memory: no cache element shares memory with another
    (expanded caches would take every sequence's writes in one place), the two caches are not the same
    memory, and no new key/value tensor overlaps a cache (the kernels read and write in one pass, so the
    result would depend on their order). Host-only (pointers and strides, no device read); skipped while
    torch.compile traces, where tensors have no memory."""
    if torch.compiler.is_compiling():
        return
    for name, cache in caches:  # a contiguous tensor never overlaps itself: the common case, checked in C++
        if cache.numel() and not cache.is_contiguous() and overlaps_itself(cache):
            raise ValueError(f"fusedgpt.ops.{op}: {name} has elements that share memory (shape {tuple(cache.shape)}, "
                             f"strides {cache.stride()}: an expanded or overlapping view); the writes would land on "
                             f"each other. Pass a cache that owns its memory (e.g. {name}.contiguous())")
    (first, first_cache), (second, second_cache) = caches
    if first_cache.numel() and first_cache.data_ptr() == second_cache.data_ptr():
        raise ValueError(f"fusedgpt.ops.{op}: {first} and {second} are the same memory; keys and values need a "
                         "cache each")
    cache_ranges = [(cache_name, _byte_range(cache)) for cache_name, cache in caches if cache.numel()]
    for name, new in news:
        if not new.numel():
            continue
        start, end = _byte_range(new)
        for cache_name, (cache_start, cache_end) in cache_ranges:
            if start < cache_end and cache_start < end:
                raise ValueError(f"fusedgpt.ops.{op}: {name} shares memory with {cache_name} (is it a view of the "
                                 f"cache?); the kernels read {name} while they write {cache_name}. Pass a copy "
                                 f"({name}.clone())")
