"""Benchmark of fusedgpt.ops.kv_append (new keys AND values written into a static [B, S_max, H, D] KV cache
in one launch) against PyTorch slice copies, on decode shapes: B = 1 and 16 sequences, T = 1 and 16 new
tokens, (H, D) = (12, 64) (GPT-2 small) and (32, 128) (7B-class), S_max = 2048, every sequence appending
at position 1000; fp16 and bf16.

Providers:
  fusedgpt-cuda      fusedgpt.ops.kv_append(..., backend="cuda")   (skipped without the extension)
  fusedgpt-triton    fusedgpt.ops.kv_append(..., backend="triton")
  torch-eager        k_cache[:, p:p+T].copy_(k); v_cache[:, p:p+T].copy_(v)  (two launches; a slice copy
                     can only do this because every sequence appends at the SAME position p, which
                     kv_append does not need)
  torch-compile      torch.compile of that eager slice copy (fullgraph=True, default mode)
  torch-copy-k-only  k_cache[:, p:p+T].copy_(k) alone: the issue's bar is that kv_append, K and V in one
                     launch, is no slower than this single copy of K
  empty-kernel       an empty Triton kernel under CUDA-graph replay: the latency floor

Effective bytes: read k and v (and the int32 positions), write as much into the caches; torch-copy-k-only
moves half of that (its GB/s uses its own bytes; the ratios compare times). Every case also reports
us_graph (latency per call under CUDA-graph replay), the number that matters for a decode step.
Results: bench/results/<device>.csv (family "kv_append") and a PNG.

    python bench/bench_kv_append.py [--quick] [--dtypes fp16,bf16] [--out-dir bench/results]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import common` from any working dir

import torch  # noqa: E402

import common  # noqa: E402
import results  # noqa: E402
import timing  # noqa: E402
from fusedgpt.ops import kv_append  # noqa: E402

FAMILY = "kv_append"
COPY_K_ONLY = "torch-copy-k-only"
PROVIDERS = ("fusedgpt-cuda", "fusedgpt-triton", "torch-eager", "torch-compile", COPY_K_ONLY,
             common.EMPTY_KERNEL_PROVIDER)
BATCH_SIZES = (1, 16)
NEW_TOKEN_COUNTS = (1, 16)
HEAD_SHAPES = ((12, 64), (32, 128))  # (heads, head_dim)
MAX_LEN = 2048
POSITION = 1000
# The caches are rotated too, as many copies as fit in this budget (K and V caches together); the
# small k, v inputs get the usual >= 128 MiB of copies.
CACHE_ROTATION_BUDGET_BYTES = 1 << 30
DEVICE = "cuda"


def benchmark_cases(quick: bool) -> list[dict]:
    """(batch, new_tokens, heads, head_dim) per case."""
    if quick:
        return [{"batch": 1, "new_tokens": 1, "heads": 12, "head_dim": 64},
                {"batch": 16, "new_tokens": 16, "heads": 32, "head_dim": 128}]
    return [{"batch": batch, "new_tokens": tokens, "heads": heads, "head_dim": head_dim}
            for batch in BATCH_SIZES for (heads, head_dim) in HEAD_SHAPES for tokens in NEW_TOKEN_COUNTS]


def slice_copy_kv(k_cache, v_cache, k, v, position: int) -> None:
    """The strongest plain PyTorch when every sequence appends at the same position."""
    tokens = k.shape[1]
    k_cache[:, position:position + tokens].copy_(k)
    v_cache[:, position:position + tokens].copy_(v)


def slice_copy_k_only(k_cache, v_cache, k, v, position: int) -> None:
    tokens = k.shape[1]
    k_cache[:, position:position + tokens].copy_(k)


def provider_function(provider: str):
    """(k_cache, v_cache, k, v, positions int32 [B] on the device, position int) -> None (writes the caches)."""
    if provider in ("fusedgpt-cuda", "fusedgpt-triton"):
        backend = provider.removeprefix("fusedgpt-")
        return lambda k_cache, v_cache, k, v, positions, position: kv_append(k_cache, v_cache, k, v, positions,
                                                                            backend=backend)
    if provider == "torch-eager":
        return lambda k_cache, v_cache, k, v, positions, position: slice_copy_kv(k_cache, v_cache, k, v, position)
    if provider == "torch-compile":
        compiled = common.compile_fresh(slice_copy_kv)
        return lambda k_cache, v_cache, k, v, positions, position: compiled(k_cache, v_cache, k, v, position)
    if provider == COPY_K_ONLY:
        return lambda k_cache, v_cache, k, v, positions, position: slice_copy_k_only(k_cache, v_cache, k, v,
                                                                                    position)
    raise ValueError(provider)


def describe_case(case: dict) -> str:
    return f"B={case['batch']} T={case['new_tokens']} H={case['heads']} D={case['head_dim']}"


def run_case(case: dict, dtype: torch.dtype, providers: list[str], unavailable: dict[str, str]) -> list[dict]:
    batch, tokens, heads, head_dim = case["batch"], case["new_tokens"], case["heads"], case["head_dim"]
    label = f"B{batch} T{tokens} H{heads} D{head_dim}"
    fields = {"batch": batch, "new_tokens": tokens, "heads": heads, "head_dim": head_dim, "max_len": MAX_LEN,
              "position": POSITION}
    k = torch.randn(batch, tokens, heads, head_dim, dtype=dtype, device=DEVICE)  # (B, T, H, D)
    v = torch.randn(batch, tokens, heads, head_dim, dtype=dtype, device=DEVICE)  # (B, T, H, D)
    positions = torch.full((batch,), POSITION, dtype=torch.int32, device=DEVICE)  # (B,)
    cache_template = torch.zeros(batch, MAX_LEN, heads, head_dim, dtype=dtype, device=DEVICE)  # (B, S_max, H, D)

    new_bytes = k.numel() * k.element_size()  # one of k, v
    input_copies = timing.rotation_copy_count(2 * new_bytes)
    cache_bytes = cache_template.numel() * cache_template.element_size()
    cache_copies = max(1, min(input_copies, CACHE_ROTATION_BUDGET_BYTES // (2 * cache_bytes)))
    input_sets = timing.rotated_copies([k, v], input_copies)  # [(k_i, v_i)]
    cache_sets = timing.rotated_copies([cache_template, cache_template], cache_copies)  # [(k_cache_j, v_cache_j)]
    del cache_template

    all_bytes = 4 * new_bytes + positions.numel() * positions.element_size()
    rows = []
    for provider, function, fields in common.providers_to_time(
            rows, family=FAMILY, case=label, dtype=dtype, providers=providers, unavailable=unavailable,
            fields=fields, make_function=provider_function, with_graph=True):

        def step(index: int, function=function) -> None:
            k_cache, v_cache = cache_sets[index % len(cache_sets)]
            k_i, v_i = input_sets[index % len(input_sets)]
            function(k_cache, v_cache, k_i, v_i, positions, POSITION)

        def verify(function=function, writes_v=provider != COPY_K_ONLY) -> str:
            k_cache, v_cache = cache_sets[0]
            k_cache.zero_()
            v_cache.zero_()
            function(k_cache, v_cache, *input_sets[0], positions, POSITION)  # input_sets[0] holds k, v
            problems = []
            if not torch.equal(k_cache[:, POSITION:POSITION + tokens], k):
                problems.append("k not written")
            if writes_v and not torch.equal(v_cache[:, POSITION:POSITION + tokens], v):
                problems.append("v not written")
            if k_cache[:, :POSITION].any() or k_cache[:, POSITION + tokens:].any():
                problems.append("k_cache written outside [p, p+T)")
            return "ok" if not problems else "MISMATCH " + ", ".join(problems)

        bytes_moved = all_bytes if provider != COPY_K_ONLY else 2 * new_bytes
        rows.append(common.measure(family=FAMILY, case=label, provider=provider, dtype=dtype, fields=fields,
                                   bytes_moved=bytes_moved, step=step, with_graph=True, verify=verify))
    del input_sets, cache_sets
    torch.cuda.empty_cache()
    return rows


def print_bar(rows: list[dict]) -> None:
    """The issue's bar, per case: best fusedgpt kv_append (K and V) vs the slice copy of K alone."""
    lines = []
    for (_, case, dtype), providers in results.rows_by_case(rows).items():
        line = {"case": case, "dtype": dtype}
        reference = providers.get(COPY_K_ONLY, {})
        for time_key, label in (("ms", "do_bench"), ("us_graph", "graph")):
            best = common.best_fusedgpt(providers, time_key)
            if best is None or not reference.get(time_key):
                line[label] = "n/a"
                continue
            ratio = reference[time_key] / best[time_key]
            verdict = "PASS" if ratio >= 1.0 else "FAIL"
            line[label] = f"{verdict} {ratio:.2f}x ({best['provider'].removeprefix('fusedgpt-')})"
        lines.append(line)
    print(f"\nBar: fusedgpt kv_append (K and V) no slower than {COPY_K_ONLY} "
          "(copy-k time / kv_append time >= 1):")
    common.print_table(lines, [("case", "case", 0), ("dtype", "dtype", 0), ("do_bench", "do_bench", 0),
                               ("graph", "graph", 0)])


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__)
    args = parser.parse_args(argv)
    dtypes = common.parse_dtypes(args.dtypes)
    providers = common.parse_choices(args.providers, PROVIDERS)
    rows = common.run_benchmark(FAMILY, args, dtypes, providers, benchmark_cases(args.quick), describe_case,
                                run_case)
    print_bar(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
