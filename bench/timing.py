"""How the bench/bench_<family>.py scripts time a call, on triton.testing (CONVENTIONS.md, "Benchmarks").

  - `time_ms`: do_bench's median. do_bench zeroes a 256 MB buffer before every timed call, so each call
    starts from a cold L2 whatever the size of its inputs.
  - `graph_us`: do_bench_cudagraph's median: as many calls as fit in its time budget are captured back to
    back in one CUDA graph and replayed, so this is the GPU-side latency of a call once the CPU launch
    cost is gone, what a graph-captured decode step of 1..16 tokens pays. do_bench_cudagraph does not clear
    L2 between calls; instead the inputs are rotated. `rotated_copies` makes enough copies that one pass
    over them exceeds max(128 MiB, 2.5 x L2) (`rotation_copy_count`), and a script times a zero-argument
    call that takes the next copy on every call (a counter), so each call captured in the graph reads
    a copy of its own.
  - `empty_kernel_step`: an empty Triton kernel, timed like any provider: the floor a one-kernel op
    can reach.

torch.cuda is touched only inside functions, so the scripts' --help works without a GPU.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl
import triton.testing

# do_bench's budgets: ms of warm-up and of timed calls (triton's defaults, written out).
DO_BENCH_WARMUP_MS = 25
DO_BENCH_REP_MS = 100
# do_bench_cudagraph's budget: calls per graph = this / the estimated ms of one call (triton's default).
GRAPH_REP_MS = 20

# Rotation: enough copies that one pass over them exceeds L2 (50 MB on an H100, 60 MB on an H200) 2.5 times.
MIN_ROTATION_BYTES = 128 * 2**20
MAX_ROTATION_COPIES = 65536
# Each copy starts on a 256-byte boundary: vectorised kernels and inductor's alignment assumptions see
# the alignment of a fresh allocation.
COPY_ALIGNMENT_BYTES = 256


def time_ms(function: Callable[[], object]) -> float:
    """Median GPU time of one call of function() in milliseconds (do_bench; L2 cleared before each call)."""
    return float(triton.testing.do_bench(function, warmup=DO_BENCH_WARMUP_MS, rep=DO_BENCH_REP_MS,
                                         return_mode="median"))


def graph_us(function: Callable[[], object]) -> float:
    """Median microseconds per call of function() under CUDA-graph replay (do_bench_cudagraph)."""
    return float(triton.testing.do_bench_cudagraph(function, rep=GRAPH_REP_MS, return_mode="median")) * 1000.0


@triton.jit
def _empty_kernel(
    SCRATCH,  # [1] float32: the one element this kernel stores, so the launch is not optimised away
):
    tl.store(SCRATCH, 0.0)


def empty_kernel_step() -> Callable[[int], None]:
    """A step (see common.measure) that launches the empty kernel."""
    scratch = torch.zeros(1, dtype=torch.float32, device="cuda")

    def step(index: int) -> None:
        _empty_kernel[(1,)](scratch)

    return step


def l2_cache_bytes() -> int:
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(properties, "L2_cache_size", 0) or 50 * 2**20)


def rotation_copy_count(bytes_per_copy: int, *, max_copies: int = MAX_ROTATION_COPIES) -> int:
    """How many copies of `bytes_per_copy` bytes of inputs make one pass exceed max(128 MiB, 2.5 x L2)."""
    target = max(MIN_ROTATION_BYTES, int(2.5 * l2_cache_bytes()))
    return max(1, min(max_copies, math.ceil(target / max(1, bytes_per_copy))))


def rotated_copies(tensors: Sequence[torch.Tensor], copies: int) -> list[tuple[torch.Tensor, ...]]:
    """`copies` copies of `tensors` (each contiguous): entry i is a tuple of views, one per tensor, holding
    that tensor's values. Each tensor's copies live in one buffer of their own (tensors never alias one
    another), each copy 256-byte aligned."""
    per_tensor_views = []
    for tensor in tensors:
        if not tensor.is_contiguous():
            raise ValueError("rotated_copies: the template tensors must be contiguous")
        numel = tensor.numel()
        elements_per_alignment = max(1, COPY_ALIGNMENT_BYTES // tensor.element_size())
        padded = max(1, math.ceil(numel / elements_per_alignment)) * elements_per_alignment
        buffer = torch.empty((copies, padded), dtype=tensor.dtype, device=tensor.device)
        buffer[:, :numel].copy_(tensor.reshape(1, numel).expand(copies, numel))
        per_tensor_views.append([row[:numel].view(tensor.shape) for row in buffer.unbind(0)])
    return list(zip(*per_tensor_views))
