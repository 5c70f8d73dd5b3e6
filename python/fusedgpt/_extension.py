"""Loads the compiled CUDA extension `fusedgpt._C`, if this install has one, and remembers why not.

Importing `fusedgpt._C` runs its TORCH_LIBRARY registrations (csrc/ops.cpp and csrc/<family>/*.cu),
which define the `torch.ops.fusedgpt.*` CUDA ops. Without it the Triton and PyTorch backends still work.
"""

from __future__ import annotations

import functools
import importlib


@functools.cache
def _load() -> tuple[bool, str]:
    try:
        importlib.import_module("fusedgpt._C")
    except ImportError as error:  # not built, or built against another torch (undefined symbols)
        return False, (f"the CUDA extension fusedgpt._C could not be imported ({error}); it is not built when "
                       "FUSEDGPT_SKIP_CUDA_BUILD=1, without nvcc, or with a CPU-only torch, and must be rebuilt "
                       "after a torch upgrade (pip install --no-build-isolation -e .)")
    return True, ""


def extension_available() -> bool:
    """True when the CUDA extension is built and loaded (its ops are registered)."""
    return _load()[0]


def extension_unavailable_reason() -> str:
    """Why the extension is not available ('' when it is)."""
    return _load()[1]


def extension_cuda_archs() -> list[str]:
    """GPU architectures the extension was compiled for, e.g. ['80', '90', '90ptx'] (sm_80 and sm_90
    machine code, compute_90 PTX) ([] without it)."""
    if not extension_available():
        return []
    import torch

    return [arch for arch in torch.ops.fusedgpt.cuda_archs().split(",") if arch]
