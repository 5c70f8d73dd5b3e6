"""Runs every fusedgpt GPU op once on small fp16 inputs, for compute-sanitizer (memcheck, racecheck) to
watch: bench/run_gpu.sh runs it as

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python bench/sanitize_ops.py

(without PyTorch's caching allocator every tensor is its own cudaMalloc, so memcheck sees an access one
element past a tensor's end instead of landing in a pooled neighbour). The shapes are the ones where
bounds go wrong: hidden 1600 and 1001 (not a multiple of the 8-element vector), a row-strided input,
no weight/bias, a head dim of 50, a transposed cache, and kv_append positions out of range (negative,
and past S_max - T), which must be skipped without a single write; for the attention kernels (whose
shared-memory tiles are what racecheck watches) 77 queries (a partial tile), every head dim the CUDA
kernels have, a window, left padding, fewer queries than keys, and decode over caches filled to 0, to a
tile's edge and to S_max - T, strided caches and several splits. Results are also checked against the
references, loosely (the tests hold the real tolerances). Prints OK and exits 0 when all is well.

    python bench/sanitize_ops.py [--backends cuda,triton]
"""

from __future__ import annotations

import argparse
import sys

import torch

import fusedgpt
from fusedgpt.ops import (attention, attention_reference, bias_act, bias_act_reference, decode_attention,
                          decode_attention_reference, kv_append, layer_norm, layer_norm_reference)
from fusedgpt.ops._limits import CUDA_ATTENTION_HEAD_DIMS

DTYPE = torch.float16
DEVICE = "cuda"  # tests/test_bench.py runs the attention exercises on the CPU (Triton under the interpreter)
TOLERANCE = 2e-2


def compare(failures: list[str], what: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    if actual.shape != expected.shape:
        failures.append(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    elif not torch.allclose(actual.float(), expected.float(), rtol=TOLERANCE, atol=TOLERANCE):
        error = (actual.float() - expected.float()).abs().max().item()
        failures.append(f"{what}: max abs error {error:.3g} > {TOLERANCE}")


def exercise_layer_norm(backend: str, failures: list[str]) -> None:
    for hidden, with_residual, with_affine in ((768, True, True), (768, False, True), (1600, True, True),
                                               (1001, True, True), (1001, False, True), (1001, True, False)):
        x = torch.randn(5, hidden, dtype=DTYPE, device=DEVICE)
        residual = torch.randn(5, hidden, dtype=DTYPE, device=DEVICE) if with_residual else None
        weight = torch.randn(hidden, dtype=DTYPE, device=DEVICE) if with_affine else None
        bias = torch.randn(hidden, dtype=DTYPE, device=DEVICE) if with_affine else None
        what = f"layer_norm[{backend}] C={hidden} residual={with_residual} affine={with_affine}"
        outputs = layer_norm(x, weight, bias, 1e-5, residual, backend=backend)
        expected = layer_norm_reference(x, weight, bias, 1e-5, residual)
        if with_residual:
            compare(failures, what + " y", outputs[0], expected[0])
            compare(failures, what + " s", outputs[1], expected[1])
        else:
            compare(failures, what, outputs, expected)
    # Rows further apart than their length (a slice of a wider buffer), 3-D, hidden 1001.
    wide = torch.randn(2, 3, 1024, dtype=DTYPE, device=DEVICE)
    x, residual = wide[..., :1001], torch.randn(2, 3, 1001, dtype=DTYPE, device=DEVICE)
    weight = torch.randn(1001, dtype=DTYPE, device=DEVICE)
    bias = torch.randn(1001, dtype=DTYPE, device=DEVICE)
    outputs = layer_norm(x, weight, bias, 1e-5, residual, backend=backend)
    expected = layer_norm_reference(x, weight, bias, 1e-5, residual)
    compare(failures, f"layer_norm[{backend}] row-strided y", outputs[0], expected[0])
    compare(failures, f"layer_norm[{backend}] row-strided s", outputs[1], expected[1])


def exercise_bias_act(backend: str, failures: list[str]) -> None:
    for activation in ("gelu_tanh", "gelu", "relu"):
        for rows, width in ((3, 768), (7, 1001)):
            x = torch.randn(rows, width, dtype=DTYPE, device=DEVICE)
            bias = torch.randn(width, dtype=DTYPE, device=DEVICE)
            compare(failures, f"bias_act[{backend}] {activation} {rows}x{width}",
                    bias_act(x, bias, activation, backend=backend), bias_act_reference(x, bias, activation))
    x = torch.randn(2, 5, 1001, dtype=DTYPE, device=DEVICE)
    compare(failures, f"bias_act[{backend}] gelu_tanh no bias 2x5x1001",
            bias_act(x, None, "gelu_tanh", backend=backend), bias_act_reference(x, None, "gelu_tanh"))


def exercise_kv_append(backend: str, failures: list[str]) -> None:
    max_len, tokens = 32, 2
    # Sequence 0 and 1 fit (1 ends exactly at S_max); 2 starts past S_max - T; 3 is negative.
    positions = torch.tensor([5, max_len - tokens, max_len - tokens + 1, -1], dtype=torch.int32, device=DEVICE)
    batch = positions.numel()
    for heads, head_dim, transposed in ((4, 64, False), (3, 50, False), (4, 64, True)):
        if transposed:  # caches stored [B, H, S, D], viewed as [B, S, H, D]
            k_cache = torch.randn(batch, heads, max_len, head_dim, dtype=DTYPE, device=DEVICE).transpose(1, 2)
            v_cache = torch.randn(batch, heads, max_len, head_dim, dtype=DTYPE, device=DEVICE).transpose(1, 2)
        else:
            k_cache = torch.randn(batch, max_len, heads, head_dim, dtype=DTYPE, device=DEVICE)
            v_cache = torch.randn(batch, max_len, heads, head_dim, dtype=DTYPE, device=DEVICE)
        k = torch.randn(batch, tokens, heads, head_dim, dtype=DTYPE, device=DEVICE)  # (B, T, H, D)
        v = torch.randn(batch, tokens, heads, head_dim, dtype=DTYPE, device=DEVICE)  # (B, T, H, D)
        k_before, v_before = k_cache.clone(), v_cache.clone()
        kv_append(k_cache, v_cache, k, v, positions, backend=backend)  # device positions: no host check
        what = f"kv_append[{backend}] H={heads} D={head_dim} transposed={transposed}"
        for name, cache, before, new in (("k", k_cache, k_before, k), ("v", v_cache, v_before, v)):
            expected = before.clone()
            for b, start in enumerate(positions.tolist()):
                if 0 <= start <= max_len - tokens:
                    expected[b, start:start + tokens] = new[b]
            if not torch.equal(cache, expected):
                failures.append(f"{what}: {name}_cache differs from the expected append "
                                "(out-of-range sequences must be left untouched)")


def exercise_attention(backend: str, failures: list[str], head_dims=CUDA_ATTENTION_HEAD_DIMS, queries: int = 77) -> None:
    for head_dim in head_dims:
        for keys, window, padded in ((queries, None, False), (queries, 16, False), (queries + 19, None, True)):
            q = torch.randn(2, queries, 3, head_dim, dtype=DTYPE, device=DEVICE)  # (B, Sq, H, D)
            k, v = (torch.randn(2, keys, 3, head_dim, dtype=DTYPE, device=DEVICE) for _ in range(2))  # (B, Sk, H, D)
            kv_start = torch.tensor([0, 9], dtype=torch.int32, device=DEVICE) if padded else None
            what = f"attention[{backend}] D={head_dim} Sq={queries} Sk={keys} window={window} padded={padded}"
            compare(failures, what, attention(q, k, v, window=window, kv_start=kv_start, backend=backend),
                    attention_reference(q, k, v, window=window, kv_start=kv_start))


def exercise_decode_attention(backend: str, failures: list[str], head_dims=CUDA_ATTENTION_HEAD_DIMS) -> None:
    max_len, tokens = 80, 2
    lengths = torch.tensor([0, 64, max_len - tokens], dtype=torch.int32, device=DEVICE)  # empty, a tile's edge, full
    batch = lengths.numel()
    for head_dim in head_dims:
        for window, strided, splits in ((None, False, None), (8, False, 3), (None, True, 2)):
            shape = (batch, 3, max_len, head_dim) if strided else (batch, max_len, 3, head_dim)
            caches = [torch.randn(shape, dtype=DTYPE, device=DEVICE) for _ in range(2)]
            if strided:  # stored [B, H, S, D], viewed as [B, S, H, D]
                caches = [cache.transpose(1, 2) for cache in caches]
            q, k, v = (torch.randn(batch, tokens, 3, head_dim, dtype=DTYPE, device=DEVICE) for _ in range(3))
            expected_caches = [cache.clone() for cache in caches]
            expected = decode_attention_reference(q, *expected_caches, lengths, k=k, v=v, window=window)
            out = decode_attention(q, *caches, lengths, k=k, v=v, window=window, backend=backend, num_splits=splits)
            what = f"decode_attention[{backend}] D={head_dim} window={window} strided={strided} splits={splits}"
            compare(failures, what, out, expected)
            for name, cache, expected_cache in zip(("k_cache", "v_cache"), caches, expected_caches):
                if not torch.equal(cache, expected_cache):
                    failures.append(f"{what}: {name} differs from the reference's append")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="cuda", help="comma-separated among cuda, triton (default: cuda)")
    args = parser.parse_args(argv)
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    if not backends or any(name not in ("cuda", "triton") for name in backends):
        parser.error(f"--backends: expected names among cuda, triton, got {args.backends!r}")
    if not torch.cuda.is_available():
        print("FAILED: no CUDA GPU is visible")
        return 2
    if "cuda" in backends and not fusedgpt.extension_available():
        print(f"FAILED: the cuda backend cannot run: {fusedgpt.extension_unavailable_reason()}")
        return 2
    torch.manual_seed(0)
    failures: list[str] = []
    with torch.no_grad():
        for backend in backends:
            for exercise in (exercise_layer_norm, exercise_bias_act, exercise_kv_append, exercise_attention,
                             exercise_decode_attention):
                try:
                    exercise(backend, failures)
                    torch.cuda.synchronize()
                except Exception as error:
                    failures.append(f"{exercise.__name__}[{backend}] raised {type(error).__name__}: {error}")
    for failure in failures:
        print(f"FAILED: {failure}")
    if failures:
        return 1
    print(f"OK (backends: {', '.join(backends)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
