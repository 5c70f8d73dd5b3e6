"""Backend selection shared by every op family (CONVENTIONS.md, "The op contract").

Order: the explicit `backend=` argument, then the FUSEDGPT_BACKEND environment variable, then the
automatic choice. Backends: "cuda" (the compiled extension), "triton", "torch" (composite PyTorch).
Automatic: on a GPU, the fastest measured backend for this family on this architecture (MEASURED_ORDER);
on the CPU, the Triton kernels under TRITON_INTERPRET=1 (how CI exercises them), else "torch".

Each op family has one decision, fusedgpt.ops.<family>_backend(...) (built on decide() here), which
its public function follows and which callers (generation, patching) ask instead of re-deriving it: it
returns a BackendChoice. A call that needs autograd gets a backend with a backward (the family's
`trainable` ones), or "reference" (the specification) where none serves it.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, NamedTuple

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
                   unsupported: dict[str, str] | Callable[[], dict[str, str]] | None = None,
                   size: int | None = None) -> str:
    """The backend that runs `family` on `device`; raises ValueError when an explicit choice cannot.

    `unsupported` maps a kernel backend to why it cannot serve this particular call (e.g. float64), or is
    a function returning that map, called only when a kernel backend is in question (never for an
    automatic choice on the CPU without TRITON_INTERPRET=1: the ops' hot path on the CPU); the automatic
    choice then skips it, and the reference ("torch") serves every case. `size` (elements of the main
    input) selects the measured order for that size (see MEASURED_ORDER)."""
    requested = _requested(backend)
    if requested == "torch":
        return requested
    if requested != "auto":
        reason = _unavailable(requested, device, _evaluated(unsupported))
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
    if order:
        unsupported = _evaluated(unsupported)
        for name in order:
            if _unavailable(name, device, unsupported) is None:
                return name
    return "torch"


def _evaluated(unsupported) -> dict[str, str]:
    return (unsupported() if callable(unsupported) else unsupported) or {}


class BackendChoice(NamedTuple):
    """What an op's backend decision answers for one call.

    backend: "cuda", "triton" or "torch", or "reference" (the specification, which serves the calls that
    need autograd where no backend of the family has a backward). unsupported: backend -> why it
    cannot serve this call (empty when every backend could). host_read: what the call reads on the host
    or copies from it (host checks of index tensors: check=True, CPU positions or lengths; CPU index
    tensors copied to the device; a reference that reads lengths), or None: then a CUDA graph can
    capture the call and torch.compile trace it without a graph break (see `capturable`)."""

    backend: str
    unsupported: dict[str, str]
    host_read: str | None

    @property
    def capturable(self) -> bool:
        return self.host_read is None


AUTOGRAD_REASON = "the call needs autograd, which only the reference (the specification) serves"
NO_BACKWARD_REASON = "the call needs autograd, and this backend has no backward"


def decide(family: str, device: torch.device, backend: str | None, *,
           unsupported: dict[str, str] | Callable[[], dict[str, str]], size: int, autograd: bool,
           host_read: str | None = None, reference_host_read: str | None = None,
           explain: bool = True, trainable: tuple[str, ...] = ()) -> BackendChoice:
    """The decision of one call of `family`, for the ops' <family>_backend functions: choose_backend's
    answer, but for a call that needs autograd one of `trainable` (the backends whose ops have a backward:
    torch.library.register_autograd on the kernels' custom ops, or torch's own autograd) and "reference"
    when none of them can serve it, or the backend asked for by name has no backward (a requested name
    is still checked). unsupported: what the kernels cannot serve in this call, or a function returning
    it (see choose_backend); host_read: what the op itself reads on (or copies from) the host for this
    call; reference_host_read: what the family's reference reads on the host, if anything. explain=False
    (the ops themselves, which follow only .backend) leaves BackendChoice.unsupported empty instead of
    asking every other backend why it cannot serve the call."""
    if autograd:
        requested = _requested(backend)
        if not trainable or (requested != "auto" and requested not in trainable):
            return BackendChoice("reference", dict.fromkeys(BACKENDS, AUTOGRAD_REASON),
                                 reference_host_read or host_read)
        forward_only = unsupported

        def unsupported():
            reasons = dict(_evaluated(forward_only))
            for name in BACKENDS:
                if name not in trainable:
                    reasons[name] = NO_BACKWARD_REASON
            return reasons
    chosen = choose_backend(family, device, backend, unsupported=unsupported, size=size)
    if autograd and chosen not in trainable:  # the torch fallback, where it has no backward
        return BackendChoice("reference", dict.fromkeys(BACKENDS, AUTOGRAD_REASON), reference_host_read or host_read)
    reasons = {}
    if explain:
        unsupported = _evaluated(unsupported)
        for name in BACKENDS:
            reason = _unavailable(name, device, unsupported) if name != chosen else None
            if reason is not None:
                reasons[name] = reason
    return BackendChoice(chosen, reasons, host_read)


def _warn_once_without_extension() -> None:
    global _warned_no_extension
    if not _warned_no_extension and not extension_available():
        warnings.warn(f"fusedgpt: {extension_unavailable_reason()}; the Triton kernels serve CUDA tensors",
                      stacklevel=4)
        _warned_no_extension = True
