"""Backend selection shared by every op family (CONVENTIONS.md, "The op contract").

Order: the explicit `backend=` argument, then the FUSEDGPT_BACKEND environment variable, then the
automatic choice. Backends: "cuda" (the compiled extension), "triton", "torch" (the reference).
Automatic: on a GPU, the fastest measured backend for this family on this architecture (MEASURED_ORDER);
on the CPU, the Triton kernels under TRITON_INTERPRET=1 (how CI exercises them), else the reference.
"""

from __future__ import annotations

import os
import warnings

import torch

from fusedgpt._extension import extension_available, extension_unavailable_reason

BACKENDS = ("cuda", "triton", "torch")

# Fastest first, per family, compute capability and size, from bench/results/<device>.csv:
#   MEASURED_ORDER[family][(major, minor)] = [(largest size, order), ...]   ascending sizes; the last
#   entry's size may be None (no upper bound).
# The size of a call is the number of elements of its main input, as each op passes it (layer_norm and
# bias_act: x; kv_append: k; attention: q + k; decode_attention: the cache's keys up to S_max). A
# family, architecture or size without a measurement uses DEFAULT_ORDER.
MEASURED_ORDER: dict[str, dict[tuple[int, int], list[tuple[int | None, tuple[str, ...]]]]] = {}
# No GPU run has measured (or even executed) the CUDA kernels yet: they compile, and their argument
# checks are tested, but the Triton kernels have been verified against the reference (under the
# interpreter), so they come first until bench/results/ says otherwise.
DEFAULT_ORDER = ("triton", "cuda")

_warned_no_extension = False


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _requested(backend: str | None) -> str:
    requested = backend if backend is not None else os.environ.get("FUSEDGPT_BACKEND", "auto")
    if requested not in BACKENDS + ("auto",):
        source = "backend" if backend is not None else "FUSEDGPT_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS + ('auto',)}, got {requested!r}")
    return requested


def _unavailable(name: str, device: torch.device, unsupported: dict[str, str]) -> str | None:
    """Why `name` cannot run on `device` (None when it can)."""
    if name in unsupported:
        return unsupported[name]
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device}"
        if not extension_available():
            return extension_unavailable_reason()
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"the cuda kernels need sm_80 or newer, {device} is sm_{major}{minor}"
    if name == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreter_enabled()):
        return f"the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"
    return None


def measured_order(family: str, capability: tuple[int, int], size: int | None) -> tuple[str, ...]:
    """The measured fastest-first backends for a call of `size` elements (DEFAULT_ORDER if none)."""
    for largest, order in MEASURED_ORDER.get(family, {}).get(capability, []):
        if largest is None or size is None or size <= largest:
            return tuple(order)
    return DEFAULT_ORDER


def choose_backend(family: str, device: torch.device, backend: str | None = None, *,
                   unsupported: dict[str, str] | None = None, size: int | None = None) -> str:
    """The backend that runs `family` on `device`; raises ValueError when an explicit choice cannot.

    `unsupported` maps a kernel backend to why it cannot serve this particular call (e.g. float64);
    the automatic choice then skips it, and the reference ("torch") serves every case. `size` (elements
    of the main input) selects the measured order for that size (see MEASURED_ORDER)."""
    unsupported = unsupported or {}
    requested = _requested(backend)
    if requested != "auto":
        reason = _unavailable(requested, device, unsupported)
        if reason is not None:
            raise ValueError(f"fusedgpt.ops.{family}: backend {requested!r} cannot run this call: {reason}")
        return requested
    if device.type == "cpu":
        order = ("triton",) if triton_interpreter_enabled() else ()
    elif device.type == "cuda":
        order = measured_order(family, torch.cuda.get_device_capability(device), size)
        _warn_once_without_extension()
    else:
        order = ()
    for name in order:
        if _unavailable(name, device, unsupported) is None:
            return name
    return "torch"


def _warn_once_without_extension() -> None:
    global _warned_no_extension
    if not _warned_no_extension and not extension_available():
        warnings.warn(f"fusedgpt: {extension_unavailable_reason()}; the Triton kernels serve CUDA tensors",
                      stacklevel=4)
        _warned_no_extension = True
